"""Quantization-aware distillation: the STE through parametrized linears, exact RTN / GPTQ starts, snapping
to the grid, QAD beating its RTN start, the export computing the trained model, exact resume after SIGKILL,
and bad input (another tokenizer, a format without an STE, NaN)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import logits_of as _logits, packed_calib, tiny_lm as _tiny
from famex.errors import FamexError
from famex.quant import dequantize, fake_quant, on_grid, parse_format, quantize, quantize_model
from famex.quant.checkpoint import load_qparams, load_quantized
from famex.quant.fake_quant import store_scale
from famex.quant.model import attach_activation_quant
from famex.quant.qad import attach_fake_quant, check_ste, fake_quant_modules, init_quantization, snap_to_grid
from famex.stage import read_meta



# Tiny models: one torch thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calib(n=2, rows=2, T=32, seed=0):
    return packed_calib(n, rows, T, seed, labels=False)


# --------------------------------------------------------------------------- the STE through the model


@pytest.mark.parametrize("name", ["int3", "int4-w4a16", "fp8", "nvfp4"])
def test_ste_gradient_through_a_parametrized_linear(name):
    """Gradient on the latent weight = the plain linear's gradient where the element is inside the
    representable range of the start's fixed scales, 0 where it saturates (pushed outside here)."""
    fmt = parse_format(name)
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 32, bias=False)
    qp = quantize(lin.weight, fmt)
    with torch.no_grad():
        lin.weight[:4] *= 3.0  # rows 0-3 now reach far beyond the grid their (fixed) scales allow
    attach_fake_quant(torch.nn.Sequential(lin), fmt, {"0": qp})
    x, r = torch.randn(5, 256), torch.randn(5, 32)
    (lin(x) * r).sum().backward()
    grad = lin.parametrizations.weight.original.grad

    # Reference: dL/dW of y = x W^T is r^T x; the representable range of each element, from its own
    # group's step: codes lo..hi extended by half the last grid step (int 0.5, E4M3 16, E2M1 1).
    latent = lin.parametrizations.weight.original.detach()
    g = fmt.group_size or 256
    step = qp.scale.float() if qp.global_scale is None else qp.scale.float() / qp.global_scale
    step = step.repeat_interleave(g, dim=1)
    units = latent / step if qp.bias is None else (latent - qp.bias.float().repeat_interleave(g, dim=1)) / step
    lo, hi, half = {"int3": (0, 7, 0.5), "int4-w4a16": (-8, 7, 0.5), "fp8": (-448, 448, 16), "nvfp4": (-6, 6, 1)}[name]
    inside = (units >= lo - half) & (units <= hi + half)
    assert (~inside).any() and inside.any()
    torch.testing.assert_close(grad, (r.T @ x) * inside, rtol=0, atol=1e-5)
    # The forward is the fake-quantized weight with the start's scales, not rescaled to the new weights.
    expected = fake_quant(latent, fmt, global_scale=qp.global_scale, scale=qp.scale, bias=qp.bias)
    assert torch.equal(lin.weight, expected)


def test_learned_scales_round_to_storage_and_get_gradients():
    fmt = parse_format("int3")  # MLX affine: bf16 scales and biases
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 16, bias=False)
    qp = quantize(lin.weight, fmt)
    p = attach_fake_quant(torch.nn.Sequential(lin), fmt, {"0": qp}, learn_scales=True)["0"]
    assert p.scale.ndim == 1 and p.scale.requires_grad  # flat: the trainer's no-weight-decay group
    with torch.no_grad():
        p.scale.mul_(1.0 + 3e-4)  # between two bf16 values
    scale_bf16 = store_scale(p.scale.detach().reshape(qp.scale.shape), fmt)
    assert not torch.equal(scale_bf16.float().reshape(-1), p.scale.detach())
    expected = fake_quant(lin.parametrizations.weight.original, fmt, scale=scale_bf16, bias=qp.bias)
    assert torch.equal(lin.weight, expected)
    (lin(torch.randn(3, 64)) ** 2).sum().backward()
    assert p.scale.grad.abs().sum() > 0 and p.bias.grad is not None
    codes = snap_to_grid(torch.nn.Sequential(lin))["0"]
    assert torch.equal(codes.scale, scale_bf16) and codes.scale.dtype == torch.bfloat16
    assert torch.equal(lin.weight, expected)


# --------------------------------------------------------------------------- start and end


@pytest.mark.parametrize("name,init,nf,arch", [("int3", "rtn", True, "apertus"), ("nvfp4", "gptq", True, "apertus"),
                                               ("fp8", "rtn", False, "llama"), ("int4", "gptq", False, "llama")])
def test_qad_starts_exactly_at_rtn_or_gptq_and_snaps_to_what_it_computes(name, init, nf, arch, tmp_path):
    fmt, calib = parse_format(name), _calib()
    reference = _tiny(arch)
    model = copy.deepcopy(reference)
    quantize_model(reference, fmt, init, calib, norm_fusion=nf, act_order=init == "gptq")
    result = init_quantization(model, fmt, init, calib, nf, act_order=init == "gptq")
    attach_fake_quant(model, fmt, result.qparams, result.activation_modules)
    assert torch.equal(_logits(model, calib), _logits(reference, calib))
    if init == "rtn":  # RTN keeps the unquantized weights as latent weights
        assert not all(on_grid(model.get_submodule(n).parametrizations.weight.original, qp, fmt)
                       for n, qp in result.qparams.items())

    # Training moves latent weights across rounding boundaries and out of the range.
    with torch.no_grad():
        for p in fake_quant_modules(model):
            w = model.get_submodule(p).parametrizations.weight.original
            w.add_(torch.randn_like(w) * w.std())
    trained = _logits(model, calib)
    qparams = snap_to_grid(model)
    assert not fake_quant_modules(model)
    for n, qp in qparams.items():
        assert on_grid(model.get_submodule(n).weight, qp, fmt), n
        assert torch.equal(model.get_submodule(n).weight, dequantize(qp, fmt))
    attach_activation_quant(model, fmt, qparams, result.activation_modules)
    assert torch.equal(_logits(model, calib), trained)

    from famex.quant.checkpoint import save_quantized

    save_quantized(model, None, fmt, qparams, "qad", tmp_path / "q", activation_modules=result.activation_modules,
                   norm_fusion=nf)
    loaded, info = load_quantized(tmp_path / "q")
    assert info["method"] == "qad"
    torch.testing.assert_close(_logits(loaded, calib), trained, rtol=0, atol=1e-5)


def test_format_without_ste_is_refused():
    with pytest.raises(FamexError, match="no straight-through estimator"):
        check_ste(SimpleNamespace(kind="mxfp6", activations="none", name="mxfp6"))
    for name in ("int2", "int8-w8a16", "fp8", "nvfp4", "nvfp4a16"):
        check_ste(parse_format(name))


# --------------------------------------------------------------------------- the stage


def famex(*args, **kw):
    env = dict(os.environ, FAMEX_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "famex", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A tiny student trained for 30 steps (CE), and its own top-32 logits over train and val (the QAD teacher)."""
    from famex.distill.train import DistillConfig, distill
    from famex.teacher.generate import LogitsConfig, generate

    root = tmp_path_factory.mktemp("qad")
    distill(DistillConfig(student="tiny-apertus", data=str(tiny_data), logits="none", out=str(root / "student"), iters=30,
                          lr=3e-3, global_batch=4, micro_batch=4, save_every=0, eval_every=0))
    for split in ("train", "val"):
        generate(LogitsConfig(teacher=str(root / "student"), data=str(tiny_data), split=split,
                              out=str(root / f"logits-{split}"), top_k=32, workers=1))
    return SimpleNamespace(root=root, model=root / "student", data=tiny_data, train=root / "logits-train",
                           val=root / "logits-val")


def _qad_args(t, out, *extra):
    return ["quantize", "--method", "qad", "--model", str(t.model), "--logits", str(t.train), "--val-logits", str(t.val),
            "--data", str(t.data), "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-4", "--log-every", "1",
            "--eval-every", "0", "--out", str(out), *extra]


def _held_out_kl(model, t) -> float:
    from famex.data.packing import PackedChunks
    from famex.distill.train import open_store, validate_chunks

    val = PackedChunks(t.data, "val")
    return validate_chunks(model, val, open_store(str(t.val), val, "val store"), 0, 1, tail="bucket")


def test_qad_beats_its_rtn_start_and_the_export_computes_the_trained_model(trained, tmp_path):
    from famex.models import load_model
    from famex.quant.stage import QuantizeConfig, quantize_stage

    out = tmp_path / "qad"
    cfg = QuantizeConfig(method="qad", model=str(trained.model), format="int2", logits=str(trained.train),
                         val_logits=str(trained.val), data=str(trained.data), out=str(out), iters=20, global_batch=4,
                         micro_batch=4, lr=1e-4, save_every=0, eval_every=0)
    quantize_stage(cfg)
    meta, metrics = read_meta(out), json.loads((out / "metrics.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["optimizer"] == "adamw" and meta["config"]["schedule"] == "cosine"

    # The RTN start, made independently by quantize_model, against the QAD result, on held-out data.
    rtn = load_model(trained.model)
    quantize_model(rtn, "int2", "rtn")
    qad, info = load_quantized(out)
    before, after = _held_out_kl(rtn, trained), _held_out_kl(qad, trained)
    assert info["method"] == "qad" and info["init"] == "rtn" and info["tokens"] == 20 * 4 * 64
    assert after["kl"] < 0.6 * before["kl"], (before, after)
    assert metrics["start_val_kl"] == pytest.approx(before["kl"], rel=1e-4)

    # Every weight is on its grid; the trainer's last validation (the fake-quant model) is what the
    # exported dense checkpoint computes in plain transformers.
    qparams = load_qparams(out)
    assert len(qparams) == 2 * 6
    for name, qp in qparams.items():
        assert on_grid(qad.get_submodule(name).weight, qp, parse_format("int2")), name
    assert metrics["val_kl"] == pytest.approx(after["kl"], rel=1e-5)
    r = famex("export", "--model", str(out), "--to", "hf", "--dequantize", "--dtype", "fp32", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="sdpa")
    assert _held_out_kl(exported, trained)["kl"] == pytest.approx(metrics["val_kl"], rel=1e-5)

    # A finished stage is a no-op; other arguments are refused.
    before_mtime = (out / "model.safetensors").stat().st_mtime_ns
    quantize_stage(cfg)
    assert (out / "model.safetensors").stat().st_mtime_ns == before_mtime
    cfg.lr = 3e-4
    with pytest.raises(FamexError, match="lr: 0.0001 -> 0.0003"):
        quantize_stage(cfg)


@pytest.mark.slow  # SIGKILL + resume, ~15-75 s on 2 cores: `make test-slow`
def test_kill_and_resume_equals_an_uninterrupted_run(trained, tmp_path):
    # W4A4 with learned scales: the checkpoint must carry latent weights, scales, global and input scales.
    args = _qad_args(trained, "OUT", "--format", "nvfp4", "--init", "gptq", "--norm-fusion", "--learn-scales", "--iters", "8",
                     "--save-every", "2", "--calib-tokens", "512")
    ref = famex(*[str(tmp_path / "ref") if a == "OUT" else a for a in args])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, FAMEX_QUIET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "famex", *[str(out) if a == "OUT" else a for a in args]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-00000004" / "trainer.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_meta(out)["status"] == "running" and not (out / "quantization.json").exists()
    again = famex(*[str(out) if a == "OUT" else a for a in args])
    assert again.returncode == 0, again.stderr
    for f in ("model.safetensors", "qparams.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / f)), load_file(str(out / f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert json.loads((out / "quantization.json").read_text())["calib_tokens"] == 512
    assert read_meta(out)["start"] == read_meta(tmp_path / "ref")["start"]


def test_a_start_read_from_the_gptq_stage_trains_the_same_model_as_one_computed_here(trained, tmp_path):
    """--init-from a finished GPTQ directory: the QAD result equals, bit for bit, a QAD that ran the same GPTQ
    itself; a directory that is not that start (another format, calibration or an RTN start) is refused."""
    from famex.quant.stage import QuantizeConfig, quantize_stage

    common = dict(model=str(trained.model), format="int3", norm_fusion=True, calib_tokens=512, seed=1)
    quantize_stage(QuantizeConfig(method="gptq", calib=str(trained.data), out=str(tmp_path / "gptq"), **common))

    def qad(out, **kw):
        quantize_stage(QuantizeConfig(method="qad", logits=str(trained.train), val_logits=str(trained.val),
                                      data=str(trained.data), out=str(tmp_path / out), iters=4, global_batch=4, micro_batch=2,
                                      lr=1e-4, save_every=0, eval_every=0, **{**common, "init": "gptq", **kw}))
        return tmp_path / out

    here, reused = qad("here"), qad("reused", init_from=str(tmp_path / "gptq"))
    for f in ("model.safetensors", "qparams.safetensors"):
        a, b = load_file(str(here / f)), load_file(str(reused / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert read_meta(reused)["start"] == {"calib_tokens": 512, "from": str(tmp_path / "gptq")}
    assert json.loads((reused / "metrics.json").read_text())["val_kl"] == json.loads((here / "metrics.json").read_text())["val_kl"]
    with pytest.raises(FamexError, match=r"format 'int3' \(QAD wants 'int4'\)"):
        qad("a", format="int4", init_from=str(tmp_path / "gptq"))
    with pytest.raises(FamexError, match=r"calib_tokens 512 \(QAD wants 1024\)"):
        qad("b", calib_tokens=1024, init_from=str(tmp_path / "gptq"))
    with pytest.raises(FamexError, match="--init-from is for --init gptq"):
        qad("c", init="rtn", init_from=str(tmp_path / "gptq"))
    with pytest.raises(FamexError, match="no meta.json"):
        qad("d", init_from=str(tmp_path / "nowhere"))


def test_bad_input(trained, tmp_path):
    from famex.quant.stage import QuantizeConfig, quantize_stage

    def cfg(**kw):
        base = dict(method="qad", model=str(trained.model), format="int4", logits=str(trained.train), data=str(trained.data),
                    iters=2, global_batch=4, micro_batch=4, lr=1e-4, save_every=0, eval_every=0)
        return QuantizeConfig(**{**base, **kw})

    # A model whose tokenizer is not the one the store (and data) were made with.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(trained.model, other, ignore=shutil.ignore_patterns("checkpoints", "meta.json"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<famex-extra>"])
    tok.save_pretrained(other)
    with pytest.raises(FamexError, match="logit store .* another tokenizer than the model"):
        quantize_stage(cfg(model=str(other), out=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()
    # Already quantized: refused before anything is written.
    r = famex("quantize", "--model", str(trained.model), "--format", "int4", "--method", "rtn", "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    with pytest.raises(FamexError, match="already quantized"):
        quantize_stage(cfg(model=str(tmp_path / "q"), out=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()
    with pytest.raises(FamexError, match="needs --logits STORE_DIR"):
        cfg(logits="", out="x").validate()
    # NaN: the run stops at that step, keeps its last good checkpoint and writes no quantized model.
    out = tmp_path / "nan"
    with pytest.raises(FamexError, match=r"non-finite loss .* training stopped; the last good checkpoint is"):
        quantize_stage(cfg(out=str(out), iters=20, lr=1e30, grad_clip=0.0, save_every=1))
    assert read_meta(out)["status"] == "failed"
    assert (out / "checkpoints").is_dir() and not (out / "quantization.json").exists()
