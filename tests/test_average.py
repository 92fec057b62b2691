"""`famex average`: the mean of checkpoints of one distillation run, loadable by transformers; refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from famex.distill.average import AverageConfig, average
from famex.errors import FamexError
from famex.stage import read_meta


def test_average_of_trainer_checkpoints_and_the_final_model(tmp_path, tiny_data):
    from famex.distill.train import DistillConfig, distill
    from famex.distill.trainer import checkpoint_dirs

    run = tmp_path / "run"
    distill(DistillConfig(student="tiny-apertus", data=str(tiny_data), logits="none", out=str(run), iters=4, lr=3e-3,
                          global_batch=4, micro_batch=4, save_every=1, keep_last=3, eval_every=0))
    ckpts = [p for _, p in checkpoint_dirs(run)][-2:]
    out = tmp_path / "avg"
    env = dict(os.environ, FAMEX_QUIET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "famex", "average", *map(str, ckpts), str(run), "--out", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert read_meta(out)["stage"] == "average" and read_meta(out)["status"] == "complete"

    # Reference: the tensors of the three inputs, averaged one by one (the tied lm_head is the embedding).
    # A checkpoint is a DCP directory: torch's own converter reads it (model keys are "model.model.<name>").
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sources = []
    for p in ckpts:
        dcp_to_torch_save(p, tmp_path / f"{p.name}.pt")
        full = torch.load(tmp_path / f"{p.name}.pt", weights_only=False)["model"]
        sources.append({k.removeprefix("model."): v for k, v in full.items()})
    sources.append(load_file(str(run / "model.safetensors")))
    got = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in got and set(got) == set(sources[-1])
    for key, value in got.items():
        expected = (sources[0][key].float() + sources[1][key].float() + sources[2][key].float()) / 3
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    assert any(not torch.equal(got[k], sources[2][k]) for k in got)  # not a copy of the final model

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, got["model.embed_tokens.weight"])
    assert len(AutoTokenizer.from_pretrained(out)) == 49152
    assert json.loads((out / "metrics.json").read_text())["checkpoints"] == 3


def test_refusals(tmp_path, tiny_data):
    from famex.models import build_student, save_model

    a, b = tmp_path / "a", tmp_path / "b"
    save_model(build_student("tiny-apertus", 49152, seed=0), a)
    save_model(build_student("demo-apertus-s", 49152, seed=0), b)
    with pytest.raises(FamexError, match="different configs"):
        average(AverageConfig(checkpoints=[str(a), str(b)], out=str(tmp_path / "x")))
    with pytest.raises(FamexError, match="at least two"):
        AverageConfig(checkpoints=[str(a)], out="x").validate()
    q = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "famex", "quantize", "--model", str(a), "--format", "int4", "--method", "rtn",
                        "--out", str(q)], capture_output=True, text=True, env=dict(os.environ, FAMEX_QUIET="1"))
    assert r.returncode == 0, r.stderr
    with pytest.raises(FamexError, match="is quantized"):
        average(AverageConfig(checkpoints=[str(a), str(q)], out=str(tmp_path / "y")))
