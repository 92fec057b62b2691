"""`famex quantize --method rtn|gptq`: the stage directory, calibration on packed chunks with cross-document
masks, GPTQ act-order by default, and refusals (tokenizer, already quantized, format, shapes, missing data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from famex.errors import FamexError
from famex.quant import load_qparams, load_quantized, parse_format, quantize_model
from famex.stage import read_meta


# Tiny models: one torch thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def famex(*args):
    env = dict(os.environ, FAMEX_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "famex", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised tiny Apertus student with the teacher's tokenizer, as a plain model directory."""
    from transformers import AutoTokenizer

    from famex.models import build_student, save_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_student("tiny-apertus", len(tok), tok, seed=3)
    with torch.no_grad():  # norms away from 1, so norm fusion has something to do
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    path = tmp_path_factory.mktemp("model") / "student"
    save_model(model, path, tokenizer_dir)
    return path


def famex_ok(out, model_dir, fmt="int8"):
    r = famex("quantize", "--model", str(model_dir), "--format", fmt, "--method", "rtn", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _load(path):
    from famex.models import load_model

    return load_model(path)


def test_rtn_stage_writes_the_quantized_directory_at_its_top_level(model_dir, tmp_path):
    out = tmp_path / "rtn"
    r = famex("quantize", "--model", str(model_dir), "--format", "int4", "--method", "rtn", "--norm-fusion", "--out", str(out))
    assert r.returncode == 0, r.stderr
    meta = read_meta(out)
    assert meta["stage"] == "quantize" and meta["status"] == "complete" and meta["config"]["method"] == "rtn"
    assert meta["inputs"]["model"]["path"] == str(model_dir.resolve())
    model, info = load_quantized(out)
    assert info["format_name"] == "int4" and info["method"] == "rtn" and info["norm_fusion"] is True
    assert (out / "tokenizer.json").is_file()

    reference = _load(model_dir)
    ref = quantize_model(reference, "int4", "rtn", norm_fusion=True)
    for name in ref.qparams:
        assert torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight), name
    # int4 = MLX affine group 64 with a bf16 scale and a bf16 bias per group: 4 + 32 / 64 bits per weight.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bits_per_weight"] == 4.5 and metrics["params_quantized"] == sum(
        reference.get_submodule(n).weight.numel() for n in ref.qparams)

    before = (out / "model.safetensors").stat().st_mtime_ns
    again = famex("quantize", "--model", str(model_dir), "--format", "int4", "--method", "rtn", "--norm-fusion", "--out", str(out))
    assert again.returncode == 0 and (out / "model.safetensors").stat().st_mtime_ns == before
    other = famex("quantize", "--model", str(model_dir), "--format", "int3", "--method", "rtn", "--norm-fusion", "--out", str(out))
    assert other.returncode == 2 and "format: 'int4' -> 'int3'" in other.stderr


def test_embeddings_are_quantized_only_when_asked(model_dir, tmp_path):
    out = tmp_path / "rtn-emb"
    r = famex("quantize", "--model", str(model_dir), "--format", "int8", "--method", "rtn", "--embeddings", "--out", str(out))
    assert r.returncode == 0, r.stderr
    model, info = load_quantized(out)
    original = _load(model_dir).get_input_embeddings().weight.detach().clone()
    reference = _load(model_dir)
    ref = quantize_model(reference, "int8", "rtn", embeddings=True)
    assert any("embed" in n for n in ref.qparams)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, reference.get_input_embeddings().weight)
    assert not torch.equal(emb, original)  # moved onto the int8 grid
    default, _ = load_quantized(famex_ok(tmp_path / "rtn", model_dir))
    assert torch.equal(default.get_input_embeddings().weight, original)  # not asked: high precision
    qad = famex("quantize", "--model", str(model_dir), "--format", "int4", "--method", "qad", "--embeddings",
                "--logits", "x", "--data", "y", "--out", str(tmp_path / "q"))
    assert qad.returncode != 0 and "--embeddings / --lm-head are for rtn / gptq" in qad.stderr


def _reference_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The cross-document causal mask written out element by element."""
    B, T = segment_ids.shape
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(q + 1):
                mask[b, 0, q, k] = bool(segment_ids[b, q] == segment_ids[b, k])
    return mask


def test_calibration_batches_are_packed_chunks_with_cross_document_masks(tiny_data):
    from famex.data.packing import PackedChunks
    from famex.quant.stage import calibration_batches

    chunks = PackedChunks(tiny_data, "train")
    batches = calibration_batches(chunks, 10 * chunks.seq_len - 5, seed=1, rows=4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]  # 10 whole chunks
    seen = set()
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            match = [i for i in range(len(chunks)) if torch.equal(chunks[i]["input_ids"], b["input_ids"][row])]
            assert match
            i = match[0]
            seen.add(i)
            assert torch.equal(b["position_ids"][row], chunks[i]["position_ids"])
            assert torch.equal(b["attention_mask"][row:row + 1], _reference_mask(chunks[i]["segment_ids"][None]))
    assert len(seen) == 10 and seen != set(range(10))  # drawn across the split, not its first chunks
    assert any(not b["attention_mask"].all(-1).all() for b in batches)
    assert len(calibration_batches(chunks, 10**9)) * 4 >= len(chunks)  # more than there is: all of it


def test_gptq_stage_uses_act_order_and_the_calibration_data(model_dir, tiny_data, tmp_path):
    from famex.data.packing import PackedChunks
    from famex.quant.stage import calibration_batches

    out = tmp_path / "gptq"
    r = famex("quantize", "--model", str(model_dir), "--format", "int3", "--method", "gptq", "--calib", str(tiny_data),
              "--calib-tokens", "640", "--out", str(out))
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "quantization.json").read_text())
    assert info["options"]["act_order"] is True and info["calib_tokens"] == 640
    # The same GPTQ from quantize_model directly on the same batches (act-order, static groups).
    reference = _load(model_dir)
    calib = calibration_batches(PackedChunks(tiny_data, "train"), 640, seed=0)
    ref = quantize_model(reference, "int3", "gptq", calib, act_order=True)
    stored = load_qparams(out)
    for name, qp in ref.qparams.items():
        assert torch.equal(stored[name].codes, qp.codes), name
    # Without act-order the result differs (the option reaches GPTQ).
    plain = famex("quantize", "--model", str(model_dir), "--format", "int3", "--method", "gptq", "--calib", str(tiny_data),
                  "--calib-tokens", "640", "--no-act-order", "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    assert any(not torch.equal(load_qparams(tmp_path / "plain")[n].codes, qp.codes) for n, qp in ref.qparams.items())


def test_w4a4_rtn_calibrates_activation_scales(model_dir, tiny_data, tmp_path):
    out = tmp_path / "nvfp4"
    missing = famex("quantize", "--model", str(model_dir), "--format", "nvfp4", "--method", "rtn", "--out", str(out))
    assert missing.returncode == 2 and "--calib DATA_DIR is required" in missing.stderr and not out.exists()
    r = famex("quantize", "--model", str(model_dir), "--format", "nvfp4", "--method", "rtn", "--calib", str(tiny_data),
              "--calib-tokens", "256", "--out", str(out))
    assert r.returncode == 0, r.stderr
    qparams = load_qparams(out)
    assert all(qp.input_global_scale is not None and float(qp.input_global_scale) > 0 for qp in qparams.values())
    _, info = load_quantized(out)
    assert info["activation_scheme"] == "nvfp4" and len(info["activation_modules"]) == len(qparams)


def test_refusals(model_dir, tiny_data, tmp_path):
    from transformers import AutoTokenizer

    from famex.quant.stage import QuantizeConfig, quantize_stage

    def run(**kw):
        cfg = QuantizeConfig(**{"model": str(model_dir), "format": "int4", "method": "gptq", "calib": str(tiny_data),
                                "out": str(tmp_path / "x"), **kw})
        cfg.validate()
        return quantize_stage(cfg)

    other = tmp_path / "other-tokenizer"
    shutil.copytree(model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<famex-extra>"])
    tok.save_pretrained(other)
    with pytest.raises(FamexError, match="tokenized with another tokenizer than the model"):
        run(model=str(other))
    with pytest.raises(FamexError, match="unknown quantization format 'int9'.*int4-w4a16"):
        run(format="int9")
    with pytest.raises(FamexError, match="64 input features are not divisible by the group size 128"):
        run(format="int4-g128")
    with pytest.raises(FamexError, match="--method must be one of rtn, gptq, qad"):
        run(method="awq")
    with pytest.raises(FamexError, match="are for --method qad"):
        run(logits=str(tmp_path))
    assert not (tmp_path / "x").exists()
    done = run(method="rtn", calib="", out=str(tmp_path / "q"))
    with pytest.raises(FamexError, match=r"already quantized \(int4 by rtn\)"):
        run(model=str(done), out=str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()


def test_recipe_interface():
    from famex.config import config_from_dict
    from famex.quant import stage

    cfg = config_from_dict(stage.CONFIG, {"model": "m", "format": "nvfp4", "method": "qad", "logits": "s", "data": "d",
                                          "out": "o", "norm_fusion": True})
    cfg.validate()
    assert stage.run is stage.quantize_stage and cfg.optimizer == "adamw" and cfg.schedule == "cosine"
    assert parse_format(cfg.format).activations == "nvfp4"
