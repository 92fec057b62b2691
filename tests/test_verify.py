"""Integrity of a run tree: `famex verify`, digests read back, and stages refusing corrupted inputs.

One tiny run (data, logit store, a 2-step distilled tiny Apertus with a trainer checkpoint, RTN int4,
MLX export; ~15 s) is built once; every test damages a copy of one file and puts it back.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_docs, write_jsonl
from famex import integrity
from famex.cli import main as famex
from famex.errors import FamexError
from famex.stage import read_meta
from famex.verify import stage_dirs, verify, verify_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = ("data", "logits-train", "distill-a", "quantize-a-int4-rtn", "export-a-int4-rtn")


@pytest.fixture(scope="module")
def run_tree(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("verify")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    write_jsonl(root / "docs.jsonl", make_docs(40, seed=5))
    (root / "r.toml").write_text(f"""[run]
name = "tiny"

[teacher]
model = "{root / 'teacher'}"

[data]
input = ["{root / 'docs.jsonl'}"]
seq_len = 32
val_fraction = 0.15
workers = 1

[logits]
top_k = 4
workers = 1
tokens_per_shard = 256

[distill]
global_batch = 2
micro_batch = 2
iters = 2
lr = 2e-3
save_every = 1
eval_every = 0
prefetch = 0

[[student]]
name = "a"
preset = "tiny-apertus"

[quantize]
calib_tokens = 64

[[quantize.matrix]]
models = ["a"]
formats = ["int4"]
methods = ["rtn"]

[export]
methods = ["rtn"]
dtype = "fp32"
""")
    assert famex(["run", str(root / "r.toml"), "--out", str(root / "run"), "--only", "data", "logits", "distill",
                  "quantize", "export", "--quiet"]) == 0
    run = root / "run"
    assert [p.name for p in stage_dirs(run)] == sorted(STAGES)
    return run


class Damaged:
    """Change one file, and put its bytes back (or restore it) on exit."""

    def __init__(self, path: Path):
        self.path = path
        self.before = path.read_bytes()

    def __enter__(self) -> "Damaged":
        return self

    def __exit__(self, *exc) -> None:
        self.path.write_bytes(self.before)


def stage_files(run: Path) -> list[Path]:
    return [p for s in STAGES for p in sorted((run / s).rglob("*")) if p.is_file() and not p.name.startswith(".")]


def test_a_fresh_run_verifies_clean_and_the_cli_says_so(run_tree, capsys):
    dirs, problems = verify(run_tree)
    assert len(dirs) == len(STAGES) and problems == []
    assert famex(["verify", str(run_tree)]) == 0
    assert capsys.readouterr().out == ""
    # Every file of every stage is in its meta.json's list (the trainer checkpoint included).
    for s in STAGES:
        listed = set(read_meta(run_tree / s)["files"])
        on_disk = {p.relative_to(run_tree / s).as_posix() for p in (run_tree / s).rglob("*") if p.is_file()} - {"meta.json"}
        assert listed == on_disk, s
    assert any(k.startswith("checkpoints/") and k.endswith(integrity.CHECKSUMS) for k in read_meta(run_tree / "distill-a")["files"])


def test_200_random_byte_flips_are_each_caught_or_parse_to_the_same_json(run_tree):
    rng = random.Random(19)
    files = stage_files(run_tree)
    assert len(files) > 40
    caught, harmless = 0, []
    for _ in range(200):
        path = rng.choice(files)
        with Damaged(path) as d:
            data = bytearray(d.before)
            at = rng.randrange(len(data))
            data[at] ^= rng.randrange(1, 256)
            path.write_bytes(bytes(data))
            stage = next(run_tree / s for s in STAGES if (run_tree / s) in path.parents)
            problems = verify_stage(stage)
            if problems:
                assert any(str(path) in line for line in problems), (path, at, problems)
                caught += 1
            else:
                # Only meta.json is checked by content (its digest) rather than by bytes; a flip it
                # misses must leave the same JSON object (whitespace, or a \\u escape's hex case).
                assert path.name == "meta.json", (path, at)
                assert json.loads(bytes(data)) == json.loads(d.before), (path, at)
                harmless.append(f"{path.relative_to(run_tree)}@{at}: {d.before[at:at + 1]!r}->{bytes(data[at:at + 1])!r}")
    assert verify(run_tree)[1] == []
    assert caught + len(harmless) == 200 and caught >= 190, harmless
    print(f"200 flips: {caught} caught, {len(harmless)} harmless: {harmless}")


def test_truncated_deleted_appended_and_extra_files_are_named(run_tree):
    shard = run_tree / "logits-train" / "shard-00001.fxl"
    with Damaged(shard):
        shard.write_bytes(shard.read_bytes()[:-10])
        assert verify_stage(run_tree / "logits-train") == [f"{shard}: {shard.stat().st_size} bytes, {shard.stat().st_size + 10} "
                                                           "recorded (truncated or appended to)"]
    weights = run_tree / "distill-a" / "model.safetensors"
    with Damaged(weights):
        weights.write_bytes(weights.read_bytes() + b"\0")
        assert any(str(weights) in p and "appended" in p for p in verify_stage(run_tree / "distill-a"))
    tok = run_tree / "data" / "tokenizer" / "tokenizer_config.json"
    with Damaged(tok):
        tok.unlink()
        assert verify_stage(run_tree / "data") == [f"{tok}: missing"]
    # meta.json is checked by what it parses to: indentation turned into a tab is the same object, harmless.
    meta = run_tree / "distill-a" / "meta.json"
    with Damaged(meta) as d:
        at = d.before.index(b"\n  ") + 1
        meta.write_bytes(d.before[:at] + b"\t" + d.before[at + 1:])
        assert json.loads(meta.read_bytes()) == json.loads(d.before) and verify_stage(run_tree / "distill-a") == []
        meta.write_bytes(d.before.replace(b'"digest"', b'"digesT"', 1))  # the digest's own key damaged
        problems = verify_stage(run_tree / "distill-a")
        assert len(problems) == 1 and problems[0].startswith(f"{meta}: field 'digesT' looks like a damaged 'digest' key")
    extra = run_tree / "quantize-a-int4-rtn" / "stray.bin"
    extra.write_bytes(b"x")
    try:
        assert verify_stage(run_tree / "quantize-a-int4-rtn") == [f"{extra}: a file no checksum list names"]
    finally:
        extra.unlink()


def rewrite_json(path: Path, **fields) -> None:
    """Edit fields to other valid values and write the JSON back as famex would (digest left as it was)."""
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def test_a_manifest_field_edited_to_another_valid_value_is_refused_naming_it(run_tree):
    from famex.teacher.store import LogitStore

    manifest = run_tree / "logits-train" / "manifest.json"
    assert LogitStore(run_tree / "logits-train").manifest["dtype"] == "float32"
    for field, value in (("dtype", "bfloat16"), ("split", "val"), ("k", 8)):
        with Damaged(manifest):
            rewrite_json(manifest, **{field: value})
            with pytest.raises(FamexError, match=rf"manifest.json: field '{field}' differs from its recorded digest"):
                LogitStore(run_tree / "logits-train")
            assert any(str(manifest) in p for p in verify_stage(run_tree / "logits-train"))
    # The same for a stage's meta.json and a quantized model's quantization.json.
    meta = run_tree / "data" / "meta.json"
    with Damaged(meta):
        rewrite_json(meta, seq_len=64)
        with pytest.raises(FamexError, match="data/meta.json: field 'seq_len' differs"):
            read_meta(run_tree / "data")
        assert famex(["verify", str(run_tree)]) == 1
    from famex.quant.checkpoint import load_qparams

    qjson = run_tree / "quantize-a-int4-rtn" / "quantization.json"
    with Damaged(qjson):
        rewrite_json(qjson, method="gptq")
        with pytest.raises(FamexError, match="quantization.json: field 'method' differs"):
            load_qparams(run_tree / "quantize-a-int4-rtn")


def test_readers_check_the_bulk_files_they_read(run_tree):
    from famex.data.packing import PackedChunks
    from famex.quant.checkpoint import load_qparams
    from famex.teacher.store import LogitStore

    tokens = run_tree / "data" / "train" / "tokens-00000.npy"
    with Damaged(tokens) as d:
        tokens.write_bytes(d.before[:-1] + bytes([d.before[-1] ^ 1]))
        chunks = PackedChunks(run_tree / "data")  # opening it maps the shard; the first read hashes it
        with pytest.raises(FamexError, match="tokens-00000.npy: sha256 differs from meta.json's tokens_sha256"):
            chunks[0]
    qparams = run_tree / "quantize-a-int4-rtn" / "qparams.safetensors"
    with Damaged(qparams) as d:
        qparams.write_bytes(d.before[:-1] + bytes([d.before[-1] ^ 1]))
        with pytest.raises(FamexError, match="qparams.safetensors: sha256 differs from quantization.json's field qparams_sha256"):
            load_qparams(run_tree / "quantize-a-int4-rtn")
    store = LogitStore(run_tree / "logits-train")
    shard = run_tree / "logits-train" / store.manifest["shards"][0]["file"]
    with Damaged(shard) as d:
        shard.write_bytes(d.before[:-1] + bytes([d.before[-1] ^ 1]))
        with pytest.raises(FamexError, match="fails its checksum"):
            list(LogitStore(run_tree / "logits-train").stream())
    ckpt = next((run_tree / "distill-a" / "checkpoints").iterdir())
    with Damaged(ckpt / "trainer.pt") as d:
        (ckpt / "trainer.pt").write_bytes(d.before + b"\0")
        with pytest.raises(FamexError, match="trainer.pt: .* bytes, .* recorded"):
            integrity.check_checksums(ckpt, "delete it")


def test_a_stage_reading_a_corrupted_input_fails_before_writing_anything(run_tree, tmp_path):
    from famex.quant.stage import QuantizeConfig, quantize_stage as quantize

    weights = run_tree / "distill-a" / "model.safetensors"
    out = tmp_path / "q"
    with Damaged(weights) as d:
        data = bytearray(d.before)
        data[len(data) // 2] ^= 0x10  # a weight's bits: still a loadable model, wrong numbers
        weights.write_bytes(bytes(data))
        with pytest.raises(FamexError, match="distill-a/model.safetensors: sha256 differs"):
            quantize(QuantizeConfig(model=str(run_tree / "distill-a"), out=str(out), format="int4", method="rtn",
                                    calib=str(run_tree / "data"), calib_tokens=64))
    assert not out.exists()
    # A data directory whose token shard no longer matches: `famex logits` stops before its meta.json says complete.
    from famex.teacher.generate import LogitsConfig, generate

    tokens = run_tree / "data" / "train" / "tokens-00000.npy"
    out = tmp_path / "store"
    with Damaged(tokens) as d:
        tokens.write_bytes(d.before[:-1] + bytes([d.before[-1] ^ 1]))
        with pytest.raises(FamexError, match="tokens_sha256"):
            generate(LogitsConfig(teacher=str(run_tree.parent / "teacher"), data=str(run_tree / "data"), out=str(out), top_k=4,
                                  workers=1, tokens_per_shard=256))
    assert read_meta(out) is None or read_meta(out)["status"] != "complete"
    assert not (out / "manifest.json").exists()


def test_an_unfinished_or_unchecksummed_stage_is_a_problem(run_tree, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(run_tree / "export-a-int4-rtn", copy)
    meta = read_meta(copy)
    old = {k: v for k, v in meta.items() if k not in ("files", integrity.DIGEST)}  # as famex wrote it before checksums
    (copy / "meta.json").write_text(json.dumps(old))
    assert verify_stage(copy) == [f"{copy / 'meta.json'}: no digest and files recorded (written before famex recorded "
                                  "checksums) — cannot be verified; rerun the stage into a new directory to get them"]
    (copy / "meta.json").write_text(json.dumps(integrity.with_digest({**old, "status": "running"})))
    assert verify_stage(copy) == [f"{copy}: status 'running', not 'complete' — rerun the stage that makes it"]
    assert famex(["verify", str(tmp_path / "nothing")]) == 2
