"""Distributed training under torchrun (2 gloo ranks on CPU) against single-process runs.

The same global batch (8 sequences: 1 process × 4 micro-batches of 2, or 2 ranks × 2 × 2) with the
KD loss (0.9 · KL to a stored teacher top-k + 0.1 · CE) must give the same weights up to fp32
rounding: the ranks' gradients are summed by an all-reduce (DDP) or a reduce-scatter (FSDP) instead
of by accumulation in one process, the loss sums and token counts are all-reduced, and under FSDP
the clipping norm is a sum of per-shard squared norms — the same sums in another order. AdEMAMix
divides by sqrt(v): where a gradient is ~1e-9 (embedding rows of tokens a step barely saw) that
rounding becomes a visible step difference. Tolerance after 8 steps at lr 3e-3: every weight within
1e-4 absolute (seen: 2.3e-5, one embedding element), the mean difference under 1e-7 (seen: ~2e-9;
most tensors differ by < 3e-7 at most).

Three torchrun launches cover: FSDP tied with a val split (validation mid-run), FSDP untied
without one, DDP; a FSDP run SIGKILLed after a checkpoint, resumed on 2 ranks (bit-identical to
the uninterrupted run) and on 1 process (DCP reshards; within the tolerance); a rank failing after
its loop fails the stage instead of leaving it complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_docs, write_jsonl
from famex.stage import read_meta

REPO = Path(__file__).resolve().parents[1]
TOL, MEAN_TOL = 1e-4, 1e-7

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FAMEX_QUIET": "1"}


def torchrun(jobs: list[dict], tmp: Path, name: str, **popen) -> subprocess.Popen:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "distributed_jobs.py"), str(spec)]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, **popen)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (torchrun starts each worker in a session of its own)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parents.items() if p in frontier]
        tree += frontier
    for p in reversed(tree):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference (checked against MEAN_TOL on the mean on the way)."""
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in sorted(a)])
    assert diffs.mean().item() < MEAN_TOL, diffs.mean().item()
    return diffs.max().item()


def log_steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def word_tokenizer(docs: list[str], path: Path):
    """A word-level tokenizer over the words of ``docs`` (a vocabulary of ~100: tiny models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in docs for w in d.replace(".", " . ").replace(",", " , ").replace(";", " ; ").split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Word-level data (with and without a val split), a tiny teacher, its stores, an untied student."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from famex.data.prepare import DataConfig, prepare
    from famex.models.presets import preset_config
    from famex.teacher.generate import LogitsConfig, generate

    root = tmp_path_factory.mktemp("distributed")
    docs = make_docs(200, seed=5)
    chats = [{"messages": [{"role": "user", "content": f"what is item {i % 10} ?"},
                           {"role": "assistant", "content": f"item {i % 10} is {['red', 'green', 'blue'][i % 3]} ."}]}
             for i in range(60)]
    fast = word_tokenizer(docs, root / "tokenizer")
    chat_tok = word_tokenizer([m["content"] for c in chats for m in c["messages"]] + ["user assistant :"], root / "chat-tokenizer")
    chat_tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                              "{% if add_generation_prompt %}assistant : {% endif %}")
    chat_tok.save_pretrained(root / "chat-tokenizer")
    src = write_jsonl(root / "docs.jsonl", docs)
    data = {}
    for name, val in (("val", 0.15), ("noval", 0.0)):
        data[name] = root / f"data-{name}"
        prepare(DataConfig(input=[str(src)], out=str(data[name]), tokenizer=str(root / "tokenizer"), seq_len=32,
                           val_fraction=val, workers=1))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(30)
    teacher.save_pretrained(root / "teacher")
    fast.save_pretrained(root / "teacher")
    stores = {}
    for name, data_dir, split in (("val", data["val"], "train"), ("val-val", data["val"], "val"), ("noval", data["noval"], "train")):
        stores[name] = root / f"store-{name}"
        generate(LogitsConfig(teacher=str(root / "teacher"), data=str(data_dir), split=split, out=str(stores[name]),
                              top_k=8, tokens_per_shard=512, workers=1))
    data["chat"] = root / "data-chat"
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prepare(DataConfig(input=[str(root / "chat.jsonl")], out=str(data["chat"]), chat=True,
                       tokenizer=str(root / "chat-tokenizer"), seq_len=32, val_fraction=0.2, workers=1))
    from famex.models import build_student, save_model

    save_model(build_student("tiny-apertus", len(chat_tok), chat_tok, seed=2), root / "sft-start", chat_tok)
    config = preset_config("tiny-apertus", vocab_size=len(fast))
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    untied = AutoModelForCausalLM.from_config(config)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    untied.save_pretrained(root / "untied")
    return {"root": root, "data": data, "stores": stores, "untied": root / "untied", "sft_start": root / "sft-start"}


def kd_config(world, out: Path, *, parallel: str = "fsdp", untied: bool = False, **kw) -> dict:
    name = "noval" if untied else "val"
    cfg = {"student": str(world["untied"]) if untied else "tiny-apertus", "data": str(world["data"][name]),
           "logits": str(world["stores"][name]), "out": str(out), "iters": 8, "lr": 3e-3, "global_batch": 8,
           "micro_batch": 2, "save_every": 2, "eval_every": 4, "eval_chunks": 5, "log_every": 1, "parallel": parallel,
           "prefetch": 0}
    if not untied:
        cfg["val_logits"] = str(world["stores"]["val-val"])
    cfg.update(kw)
    return cfg


def sft_config(world, out: Path, parallel: str = "fsdp") -> dict:
    return {"model": str(world["sft_start"]), "data": str(world["data"]["chat"]), "out": str(out), "iters": 4, "lr": 3e-3,
            "global_batch": 8, "micro_batch": 2, "save_every": 2, "eval_every": 2, "log_every": 1, "parallel": parallel,
            "prefetch": 0}


def single_sft(cfg: dict) -> Path:
    from famex.posttrain.sft import SftConfig, sft

    c = SftConfig(**cfg)
    c.validate()
    return sft(c)


def single(cfg: dict) -> Path:
    from famex.distill.train import DistillConfig, distill

    c = DistillConfig(**cfg)
    c.validate()
    return distill(c)


def test_two_ranks_fsdp_and_ddp_match_one_process_and_resume_exactly(world, tmp_path):
    runs = {name: tmp_path / name for name in ("fsdp", "fsdp-untied", "ddp", "killed", "failing", "sft-fsdp")}
    first = torchrun([
        {"stage": "distill", "config": kd_config(world, runs["fsdp"])},
        {"stage": "distill", "config": kd_config(world, runs["fsdp-untied"], untied=True)},
        {"stage": "distill", "config": kd_config(world, runs["ddp"], parallel="ddp")},
        {"stage": "sft", "config": sft_config(world, runs["sft-fsdp"])},
    ], tmp_path, "first")
    # While the 2-rank runs go, the single-process references (same global batch, 4 micro-batches).
    ref = single(kd_config(world, tmp_path / "one"))
    ref_untied = single(kd_config(world, tmp_path / "one-untied", untied=True))
    ref_sft = single_sft(sft_config(world, tmp_path / "one-sft"))
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err.decode()[-4000:]

    # SFT (assistant-masked CE, validation on the val split) under FSDP: the single-process run's weights.
    assert read_meta(runs["sft-fsdp"])["status"] == "complete"
    assert worst(weights(runs["sft-fsdp"]), weights(ref_sft)) < TOL
    assert [r["loss"] for r in log_steps(runs["sft-fsdp"])] == pytest.approx([r["loss"] for r in log_steps(ref_sft)], rel=1e-5)
    assert [r["val_ce"] for r in log_steps(runs["sft-fsdp"]) if "val_ce" in r] == pytest.approx(
        [r["val_ce"] for r in log_steps(ref_sft) if "val_ce" in r], rel=1e-5)

    for name, want in (("fsdp", ref), ("ddp", ref), ("fsdp-untied", ref_untied)):
        meta = read_meta(runs[name])
        assert meta["status"] == "complete", name
        assert worst(weights(runs[name]), weights(want)) < TOL, name
        got, exp = log_steps(runs[name]), log_steps(want)
        assert [r["step"] for r in got] == list(range(1, 9))
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in exp], rel=1e-5), name
        assert got[-1]["kl"] > 0  # the KD term is on
    # Validation ran through the FSDP root, mid-run and at the end, over the same chunks as one process.
    val = [r for r in log_steps(runs["fsdp"]) if "val_ce" in r]
    assert [r["step"] for r in val] == [4, 8]
    assert [r["val_ce"] for r in val] == pytest.approx([r["val_ce"] for r in log_steps(ref) if "val_ce" in r], rel=1e-5)
    assert "val_kl" in val[-1]
    assert "val_ce" not in log_steps(runs["fsdp-untied"])[-1]
    # The untied student stayed untied, the tied one tied (transformers loads both as they are).
    assert "lm_head.weight" in weights(runs["fsdp-untied"]) and "lm_head.weight" not in weights(runs["fsdp"])
    ckpt = runs["fsdp"] / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in ckpt.glob("__*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank

    # SIGKILL a 2-rank FSDP run after a checkpoint, resume it on 2 ranks and (a copy) on 1 process.
    killed = torchrun([{"stage": "distill", "config": kd_config(world, runs["killed"])}], tmp_path, "killed")
    marker = runs["killed"] / "checkpoints" / "step-00000004" / "trainer.pt"
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None and not marker.exists():
        time.sleep(0.02)
    kill_tree(killed.pid)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read().decode()[-3000:]
    assert read_meta(runs["killed"])["status"] == "running"
    assert not (runs["killed"] / "model.safetensors").exists()
    shutil.copytree(runs["killed"], tmp_path / "killed-one")

    # The resumed run, then a run whose rank 1 fails after its loop (rank 0 has saved the model by then).
    last = torchrun([
        {"stage": "distill", "config": kd_config(world, runs["killed"])},
        {"stage": "distill", "config": kd_config(world, runs["failing"], iters=2, save_every=0), "fail_on_rank": 1},
    ], tmp_path, "last")
    resumed_one = single(kd_config(world, tmp_path / "killed-one"))
    _, err = last.communicate(timeout=600)
    assert last.returncode != 0 and "injected failure on rank 1" in err.decode(), err.decode()[-4000:]

    assert read_meta(runs["killed"])["status"] == "complete"
    a, b = weights(runs["killed"]), weights(runs["fsdp"])
    assert all(torch.equal(a[k], b[k]) for k in b), "a resumed 2-rank run must end bit-identical to the uninterrupted one"
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert timeless(log_steps(runs["killed"])) == timeless(log_steps(runs["fsdp"]))
    assert worst(weights(resumed_one), weights(ref)) < TOL  # 2-rank checkpoint resharded onto one process

    meta = read_meta(runs["failing"])
    assert meta["status"] == "failed" and meta["failed_rank"] == 1 and "injected failure" in meta["error"]


def test_rank_batches_give_every_rank_the_same_number_of_forwards():
    from famex.distill.trainer import rank_batches

    for n in range(0, 12):
        for world in (1, 2, 3):
            per_rank = [rank_batches(n, r, world, 2) for r in range(world)]
            assert len({len(b) for b in per_rank}) == 1, (n, world)
            counted = sorted(i for b in per_rank for idx, c in b if c for i in idx)
            assert counted == list(range(n)), (n, world)


def test_data_in_parts_equals_one_process(tmp_path):
    """`famex data` under torchrun (2 ranks) and as --shard I/N jobs writes, once merged, the directory
    one process writes: the same shard files byte for byte, the same progress.json, the same meta.json
    but for its timestamps."""
    docs = make_docs(400, seed=9) + [""]  # an empty document is counted, not written
    word_tokenizer(docs, tmp_path / "tok")
    inputs = [str(write_jsonl(tmp_path / f"in-{i}.jsonl", docs[i::5])) for i in range(5)]
    args = ["data", "--input", *inputs, "--tokenizer", str(tmp_path / "tok"), "--seq-len", "16", "--val-fraction", "0.2",
            "--segment-tokens", "300", "--workers", "1", "--quiet"]
    ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "famex", *args, "--out", str(tmp_path / "ranks")], cwd=REPO, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from famex.data.prepare import DataConfig, prepare

    def config(out: str, shard: str = "") -> DataConfig:
        cfg = DataConfig(input=inputs, tokenizer=str(tmp_path / "tok"), seq_len=16, val_fraction=0.2, segment_tokens=300,
                         workers=1, out=str(tmp_path / out), shard=shard)
        cfg.validate()
        return cfg

    prepare(config("one"))
    for i in (2, 0, 1):  # separate jobs, in any order; the last one merges
        prepare(config("jobs", f"{i}/3"))
        assert (read_meta(tmp_path / "jobs")["status"] == "complete") == (i == 1)
    assert not (tmp_path / "jobs" / "parts").exists()
    _, err = ranks.communicate(timeout=300)
    assert ranks.returncode == 0, err.decode()[-3000:]

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("meta.json", "metrics.json")}

    def meta(root: Path) -> dict:
        # Timestamps, the output path, metrics.json (its throughput) and the digests of those differ.
        m = {k: v for k, v in read_meta(root).items() if k not in ("started", "finished", "digest")}
        m["config"].pop("out")
        m["files"].pop("metrics.json")
        return m

    want = files(tmp_path / "one")
    assert len([k for k in want if k.startswith("train/tokens-")]) >= 5  # several shards, one or more per file
    for name in ("ranks", "jobs"):
        got = files(tmp_path / name)
        assert got.keys() == want.keys(), name
        assert [k for k in want if got[k] != want[k]] == [], name
        assert meta(tmp_path / name) == meta(tmp_path / "one"), name
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["docs_empty"] == 1
