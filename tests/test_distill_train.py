"""The distillation trainer: exact resume after SIGKILL, 2 gloo ranks = 1 rank, CE-only baseline,
non-finite loss handling, refusing changed arguments, and checkpoints that transformers loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from famex.distill.train import DistillConfig, distill
from famex.errors import FamexError
from famex.stage import read_meta

COMMON = ["--student", "tiny-apertus", "--logits", "none", "--lr", "3e-3", "--global-batch", "4",
          "--eval-every", "0", "--eval-chunks", "4", "--log-every", "1"]


def famex(*args, **kw):
    env = dict(os.environ, FAMEX_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "famex", *args], capture_output=True, text=True, env=env, **kw)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow  # SIGKILL + resume, ~15-75 s on 2 cores: `make test-slow`
def test_kill_and_resume_gives_identical_weights(tmp_path, tiny_data):
    args = ["distill", *COMMON, "--data", str(tiny_data), "--iters", "8", "--save-every", "2", "--micro-batch", "2"]
    ref = famex(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, FAMEX_QUIET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "famex", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-00000004" / "trainer.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_meta(out)["status"] == "running"
    assert not (out / "model.safetensors").exists(), "a killed run must not leave a final model"
    again = famex(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    a, b = weights(tmp_path / "ref"), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The resumed log is the uninterrupted one (no duplicated or missing steps).
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    # Only the last `keep_last` (3) checkpoints survive.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004", "step-00000006"][-3:]


def test_two_gloo_ranks_equal_one_rank(tmp_path, tiny_data):
    """Same global batch (4): 1 rank × 2 micro-batches of 2 vs 2 ranks × 1 micro-batch of 2.

    Gradients are the same sums taken in another order, so weights agree to fp32 rounding
    (tolerance 1e-5 absolute after 4 AdEMAMix steps at lr 3e-3; differences seen are ~1e-7).
    """
    base = ["distill", *COMMON, "--data", str(tiny_data), "--iters", "4", "--save-every", "0"]
    one = famex(*base, "--micro-batch", "2", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, FAMEX_QUIET="1", OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                          "-m", "famex", *base, "--micro-batch", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert read_meta(tmp_path / "two")["status"] == "complete"
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


def test_final_model_loads_in_transformers_and_learned(tmp_path, tiny_data):
    out = tmp_path / "s"
    cfg = DistillConfig(student="tiny-apertus", data=str(tiny_data), logits="none", out=str(out), iters=12, lr=3e-3,
                        global_batch=4, micro_batch=4, save_every=0, eval_every=0, log_every=1)
    distill(cfg)
    code = (
        "import sys, torch, json; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained(r'{out}'); t = AutoTokenizer.from_pretrained(r'{out}');"
        "print(json.dumps({'type': type(m).__name__, 'vocab': m.config.vocab_size, 'tok': len(t)}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info == {"type": "ApertusForCausalLM", "vocab": 49152, "tok": 49152}
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "ce" and metrics["val_loss"] < 10.8  # below a uniform model's ln(49152)
    # Rerunning a finished stage is a no-op; changing what matters is refused, naming the option.
    before = (out / "model.safetensors").stat().st_mtime_ns
    distill(cfg)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    cfg.lr = 1e-3
    with pytest.raises(FamexError, match=r"lr: 0.003 -> 0.001"):
        distill(cfg)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data):
    out = tmp_path / "nan"
    cfg = DistillConfig(student="tiny-apertus", data=str(tiny_data), logits="none", out=str(out), iters=20, lr=1e30,
                        global_batch=4, micro_batch=4, save_every=1, eval_every=0, grad_clip=0.0, optimizer="adamw")
    with pytest.raises(FamexError, match=r"non-finite loss .* at step \d+: training stopped; the last good checkpoint is"):
        distill(cfg)
    assert read_meta(out)["status"] == "failed"
    assert not (out / "model.safetensors").exists()


def test_order_seed_sets_the_ce_chunk_order_and_nothing_else(tmp_path, tiny_data):
    """A CE-only twin of a KD run sees the store's chunk order (`--order-seed` = the store's seed): the
    same weights as a run whose own --seed is that seed, other weights than a run in its own order."""
    from famex.data.packing import ChunkOrder, PackedChunks
    from famex.distill.train import DistillTask
    from famex.teacher.generate import _permutation

    chunks = PackedChunks(tiny_data, "train")
    task = DistillTask(chunks, None, seed=3)
    store_order = _permutation(len(chunks), 3)
    assert [int(task.order[i]) for i in range(len(chunks))] == [int(store_order[i]) for i in range(len(chunks))]
    assert sorted(int(ChunkOrder(len(chunks), 3)[i]) for i in range(len(chunks))) == list(range(len(chunks)))

    common = dict(data=str(tiny_data), logits="none", lr=3e-3, global_batch=4, micro_batch=4, save_every=0,
                  eval_every=0, log_every=1)
    start = tmp_path / "start"
    distill(DistillConfig(student="tiny-apertus", out=str(start), iters=1, **common))
    runs = {}
    for name, seeds in {"own-3": dict(seed=3), "order-3": dict(seed=0, order_seed=3), "own-0": dict(seed=0)}.items():
        runs[name] = weights(distill(DistillConfig(student=str(start), out=str(tmp_path / name), iters=3, **seeds,
                                                   **common)))
    assert all(torch.equal(runs["own-3"][k], runs["order-3"][k]) for k in runs["own-3"])
    assert not all(torch.equal(runs["own-0"][k], runs["order-3"][k]) for k in runs["own-0"])
