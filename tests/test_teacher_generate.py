"""The `famex logits` stage: a tiny random teacher over the packed chunks of a tiny data directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_docs, write_jsonl
from famex.errors import FamexError
from famex.teacher import codec, store
from famex.teacher.generate import LogitsConfig, generate, topk_of_logits

REPO = Path(__file__).resolve().parents[1]
STORE_FILES = ("manifest.json", "permutation.bin")


# Tiny models: one torch thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A data directory with a word-level tokenizer of a few hundred words, so the teacher is tiny."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from famex.data.prepare import DataConfig, prepare

    root = tmp_path_factory.mktemp("smalldata")
    docs = make_docs(240, seed=2)
    words = sorted({w for d in docs for w in d.replace(".", " . ").replace(",", " , ").replace(";", " ; ").split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(root / "tokenizer")
    src = write_jsonl(root / "docs.jsonl", docs)
    out = root / "data"
    prepare(DataConfig(input=[str(src)], out=str(out), tokenizer=str(root / "tokenizer"), seq_len=32, val_fraction=0.1, workers=1))
    return out


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, small_data):
    """A 2-layer random Llama with the data's tokenizer, saved as a plain HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(small_data / "tokenizer")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init: less flat, more like a trained LM
        model.model.embed_tokens.weight.mul_(60)
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def config(data, teacher, out, **kw) -> LogitsConfig:
    base = dict(teacher=str(teacher), data=str(data), out=str(out), top_k=16, tokens_per_shard=256, workers=2)
    base.update(kw)
    cfg = LogitsConfig(**base)
    cfg.validate()
    return cfg


def store_bytes(path: Path) -> dict[str, bytes]:
    files = sorted(p.name for p in path.glob("shard-*.fxl")) + list(STORE_FILES)
    return {name: (path / name).read_bytes() for name in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data, tiny_teacher):
    """One uninterrupted compact run, the reference the other runs must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "store"
    generate(config(small_data, tiny_teacher, out))
    return out


@pytest.mark.parametrize("sync_free", [False, True])  # True: the CUDA path (no host syncs), run on CPU
def test_topk_of_logits_matches_an_fp64_reference(sync_free):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(50, 300, generator=g)
    logits[:5, 7] += 60  # peaked rows: left-out mass ~1e-20, beyond fp32's 1 - sum
    for temperature in (1.0, 0.7):
        ids, probs, mass = topk_of_logits(logits, 10, temperature, rows=16, sync_free=sync_free)
        p = torch.softmax(logits.double() / temperature, -1)
        ref_p, ref_ids = p.sort(-1, descending=True)
        assert torch.equal(ids, ref_ids[:, :10])
        assert torch.allclose(probs.double(), ref_p[:, :10], rtol=1e-5, atol=1e-12)
        ref_mass = ref_p[:, 10:].sum(-1)
        # 1 - sum(top-k) is good to ~1e-6 absolute; rows with little mass left are summed exactly
        assert torch.allclose(mass.double(), ref_mass, rtol=1e-4, atol=1e-6)
        small = ref_mass < 1e-3
        assert small.sum() >= 5 and torch.allclose(mass.double()[small], ref_mass[small], rtol=1e-4, atol=0)
        assert (mass[:5] > 0).all() and (mass[:5] < 1e-15).all()


def solo_logits(model, chunk: dict) -> torch.Tensor:
    """Each document of a packed chunk run alone (no packing, no mask): the independent reference."""
    out = torch.empty(len(chunk["input_ids"]), model.config.vocab_size)
    seg = chunk["segment_ids"]
    with torch.no_grad():
        for s in seg.unique():
            sel = seg == s
            out[sel] = model(input_ids=chunk["input_ids"][sel][None], position_ids=chunk["position_ids"][sel][None]).logits[0]
    return out


def test_paper_store_holds_the_teachers_top_k_of_every_packed_chunk(tmp_path, small_data, tiny_teacher):
    from transformers import AutoModelForCausalLM

    from famex.data.packing import PackedChunks, chunk_permutation

    out = tmp_path / "paper"
    generate(config(small_data, tiny_teacher, out, encoding="paper", seed=3))
    chunks = PackedChunks(small_data, "train")
    s = store.LogitStore(out)
    assert len(s) == len(chunks) and s.seq_len == chunks.seq_len == 32 and s.k == 16
    assert np.array_equal(s.permutation, chunk_permutation(len(chunks), 3))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, attn_implementation="sdpa").eval()
    checked = 0
    for sc in s.stream():
        ref = chunks[sc.data_index]
        assert torch.equal(sc.token_ids, ref["input_ids"])
        if sc.position % 7 == 0:  # a sample of chunks against the slow per-document reference
            p = torch.softmax(solo_logits(model, ref).double(), -1)
            top, ids = p.topk(16, -1)
            assert torch.equal(torch.sort(sc.ids, -1).values, torch.sort(ids, -1).values)
            assert torch.allclose(sc.probs.double(), p.gather(-1, sc.ids), rtol=1e-4, atol=1e-6)
            assert torch.allclose(sc.mass_left.double(), 1 - top.sum(-1), atol=1e-5)
            checked += 1
    assert checked >= 3
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "logits" and meta["status"] == "complete" and meta["config"]["top_k"] == 16
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer_hash"] == chunks.tokenizer_hash and m["split"] == "train" and m["data_hash"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokens"] == len(chunks) * 32
    assert metrics["kl_decoded_vs_exact"] < 1e-6  # paper keeps fp32 exactly
    assert store.verify(out)["chunks"] == len(chunks)


def test_compact_store_metrics_and_agreement_with_paper(tmp_path, small_data, tiny_teacher, reference):
    paper = tmp_path / "paper"
    generate(config(small_data, tiny_teacher, paper, encoding="paper"))
    metrics = json.loads((reference / "metrics.json").read_text())
    m = json.loads((reference / "manifest.json").read_text())
    assert metrics["bytes_per_token"] == pytest.approx(m["bytes"] / m["tokens"])
    assert metrics["bytes"] == sum(p.stat().st_size for p in reference.glob("shard-*.fxl"))
    assert 0 < metrics["kl_decoded_vs_exact"] < 1e-3 and metrics["kl_exact_vs_decoded"] > 0
    assert metrics["kl_decoded_vs_top_k"] >= metrics["kl_decoded_vs_exact"]
    assert 0 < metrics["mean_kept_k"] <= 16 and 0 < metrics["mass_kept"] <= metrics["mass_covered"] + 1e-3
    assert metrics["tokens_per_s"] > 0
    a, b = store.LogitStore(reference), store.LogitStore(paper)
    kls, back = [], []
    for ca, cb in zip(a.stream(), b.stream()):
        assert ca.data_index == cb.data_index
        pair = (cb.ids.numpy(), cb.probs.numpy(), cb.mass_left.numpy(), ca.ids.numpy(), ca.probs.numpy(), ca.mass_left.numpy())
        kls.append(codec.kl_decoded_vs_exact(*pair))
        back.append(codec.kl_exact_vs_decoded(*pair))
    kl = np.concatenate(kls).mean()
    assert kl < 1e-3 and kl == pytest.approx(metrics["kl_decoded_vs_exact"], rel=0.5)
    assert np.concatenate(back).mean() == pytest.approx(metrics["kl_exact_vs_decoded"], rel=0.5)
    assert metrics["mass_covered"] == pytest.approx(1 - np.mean([c.mass_left.double().mean() for c in b.stream()]), rel=1e-3)
    # smaller than paper even at this tiny vocabulary and k (the real ratio at k=256 is ~4.6x)
    assert metrics["bytes"] < 0.6 * json.loads((paper / "metrics.json").read_text())["bytes"]


def test_rerun_is_a_no_op_and_other_arguments_are_refused(small_data, tiny_teacher, reference):
    before = store_bytes(reference)
    generate(config(small_data, tiny_teacher, reference, workers=1, batch_size=3))  # speed-only options
    assert store_bytes(reference) == before
    with pytest.raises(FamexError, match=r"top_k: 16 -> 8.*delete"):
        generate(config(small_data, tiny_teacher, reference, top_k=8))


@pytest.mark.slow  # SIGKILL + resume, ~15-75 s on 2 cores: `make test-slow`
def test_killed_run_resumes_byte_identical(tmp_path, small_data, tiny_teacher, reference):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "famex", "logits", "--teacher", str(tiny_teacher), "--data", str(small_data),
            "--out", str(out), "--top-k", "16", "--tokens-per-shard", "256", "--workers", "2", "--quiet"]
    n_shards = len(list(reference.glob("shard-*.fxl")))
    proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("shard-*.fxl"))) < 2:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("shard-*.fxl")))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "manifest.json").exists() and 2 <= written < n_shards, "the run ended before it was killed"
    assert json.loads((out / "meta.json").read_text())["status"] == "running"
    done = sum(np.diff(store.read_header(p)["positions"])[0] for p in out.glob("shard-*.fxl")) * 32
    generate(config(small_data, tiny_teacher, out))  # the same arguments again
    assert not list(out.glob(".*.tmp"))
    assert store_bytes(out) == store_bytes(reference)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokens_generated"] == metrics["tokens"] - done  # finished shards were not redone


def test_two_gloo_ranks_equal_one_process(tmp_path, small_data, tiny_teacher, reference):
    out = tmp_path / "ranks"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "famex", "logits",
            "--teacher", str(tiny_teacher), "--data", str(small_data), "--out", str(out), "--top-k", "16",
            "--tokens-per-shard", "256", "--quiet"]
    res = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert store_bytes(out) == store_bytes(reference)
    assert json.loads((out / "meta.json").read_text())["status"] == "complete"


def test_full_disk_leaves_no_shard_that_looks_complete(tmp_path, small_data, tiny_teacher, reference, monkeypatch):
    out = tmp_path / "full"
    real = store.atomic_write_bytes

    def no_space(path, data):
        if Path(path).name == "shard-00002.fxl":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store, "atomic_write_bytes", no_space)
    with pytest.raises(FamexError, match=r"shard-00002\.fxl.*No space left.*rerun to resume"):
        generate(config(small_data, tiny_teacher, out))
    assert not (out / "shard-00002.fxl").exists() and not (out / "manifest.json").exists()
    assert json.loads((out / "meta.json").read_text())["status"] == "failed"
    monkeypatch.setattr(store, "atomic_write_bytes", real)
    generate(config(small_data, tiny_teacher, out))
    assert store_bytes(out) == store_bytes(reference)


def test_bad_inputs_are_refused_with_a_way_out(tmp_path, small_data, tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    empty = tmp_path / "nodata"
    empty.mkdir()
    with pytest.raises(FamexError, match="no meta.json.*famex data"):
        generate(config(empty, tiny_teacher, tmp_path / "a"))
    # a teacher whose tokenizer (and vocabulary) differs from the data's
    other = tmp_path / "other-teacher"
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(FamexError, match="does not use the tokenizer.*famex data --tokenizer"):
        generate(config(small_data, other, tmp_path / "b"))
    assert not (tmp_path / "b" / "meta.json").exists()  # nothing to refuse once the teacher is fixed
    with pytest.raises(FamexError, match="top-k"):
        generate(config(small_data, tiny_teacher, tmp_path / "c", top_k=10**6))


def test_a_store_of_an_older_format_is_refused_not_resumed(tmp_path, small_data, tiny_teacher, reference):
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    m = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    with pytest.raises(FamexError, match=r"format version 1.*delete"):
        generate(config(small_data, tiny_teacher, old))


def test_cli_verify(tmp_path, reference, capsys):
    from famex.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    assert main(["logits", "verify", str(copy)]) == 0
    assert "ok" in capsys.readouterr().out
    shard = copy / "shard-00001.fxl"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["logits", "verify", str(copy)]) == 2
    assert "shard-00001.fxl" in capsys.readouterr().err
    assert main(["logits", "check", str(copy)]) == 2


def test_metrics_report_the_kl_of_a_bf16_teacher_against_fp32(tmp_path, small_data, tiny_teacher, reference):
    """A bf16 teacher's store says how far its forward is from the fp32 one (slow reference: both
    forwards of the first chunk in the store order, KL over the full vocabulary, here in the test)."""
    from famex.data.packing import PackedChunks, model_inputs
    from famex.models import load_model
    from famex.teacher.store import LogitStore

    out = generate(config(small_data, tiny_teacher, tmp_path / "bf16", dtype="bfloat16"))
    metrics = json.loads((out / "metrics.json").read_text())
    chunks = PackedChunks(small_data, "train")
    chunk = chunks[LogitStore(out).data_index(0)]
    batch = {k: v[None] for k, v in chunk.items()}
    V = chunks.vocab_size
    with torch.no_grad():
        lo = load_model(tiny_teacher, dtype=torch.bfloat16)(**model_inputs(batch)).logits[0, :, :V].double()
        hi = load_model(tiny_teacher)(**model_inputs(batch)).logits[0, :, :V].double()
    p, q = torch.softmax(hi, -1), torch.softmax(lo, -1)
    want = (p * (p.log() - q.log())).sum(-1)
    assert metrics["kl_precision_dtype"] == "bfloat16" and metrics["kl_precision_positions"] == len(want)
    assert metrics["kl_bf16_vs_fp32_mean"] == pytest.approx(float(want.mean()), rel=2e-2, abs=1e-7)
    assert metrics["kl_bf16_vs_fp32_mean"] > 0
    # an fp32 teacher (the CPU default): 0 by definition
    assert json.loads((reference / "metrics.json").read_text())["kl_bf16_vs_fp32_mean"] == 0.0
