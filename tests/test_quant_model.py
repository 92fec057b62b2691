"""Model-level quantization: which modules, RTN / sequential GPTQ, activation quantization, the quantized directory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import QUANT_VOCAB, logits_of as _logits, packed_calib as _calib, tiny_lm as _tiny
from famex.errors import FamexError
from famex.quant import (
    dequantize,
    fake_quant,
    gptq_quantize,
    is_quantized,
    load_qparams,
    load_quantized,
    on_grid,
    parse_format,
    quantize_activation,
    quantize_model,
    save_quantized,
    target_modules,
)
from famex.quant.fake_quant import global_scale_from_amax
from famex.quant.model import detach_activation_quant, fused_global_scales

VOCAB = QUANT_VOCAB


def test_target_modules():
    llama = _tiny("llama")
    names = target_modules(llama)
    assert len(names) == 2 * 7 and names[0] == "model.layers.0.self_attn.q_proj" and "lm_head" not in names
    assert target_modules(llama, lm_head=True)[-1] == "lm_head"
    assert target_modules(llama, embeddings=True)[-1] == "model.embed_tokens"
    assert len(target_modules(_tiny("apertus"))) == 2 * 6  # q, k, v, o, up, down
    tied = _tiny("llama", tie=True)
    assert target_modules(tied, lm_head=True)[-1] == "model.embed_tokens"  # one tensor, quantized once


def test_rtn_weight_only_needs_no_data_and_touches_only_targets():
    model = _tiny("llama")
    original = copy.deepcopy(model)
    fmt = parse_format("int4")
    result = quantize_model(model, fmt, "rtn")
    assert sorted(result.qparams) == sorted(target_modules(model))
    for name, qp in result.qparams.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w, dequantize(qp, fmt)) and on_grid(w, qp, fmt)
        assert torch.equal(w, fake_quant(original.get_submodule(name).weight, fmt))  # plain RTN per module
    targets = set(result.qparams)
    for (name, p), (_, p0) in zip(model.named_parameters(), original.named_parameters()):
        if name.removesuffix(".weight") not in targets:
            assert torch.equal(p, p0), name
    assert model.config.famex_quantization == {"format": "int4", "method": "rtn", "norm_fusion": False}
    assert result.activation_modules == [] and not getattr(model, "famex_activation_hooks", [])


def test_nvfp4_global_scales_are_shared_by_fused_linears():
    model = _tiny("llama")
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in target_modules(model)}
    expected = fused_global_scales(model, parse_format("nvfp4a16"), target_modules(model))
    result = quantize_model(model, "nvfp4a16", "rtn")
    assert all(torch.equal(result.qparams[n].global_scale, g) for n, g in expected.items())
    prefix = "model.layers.1."
    qkv = [prefix + f"self_attn.{p}_proj" for p in "qkv"]
    gate_up = [prefix + "mlp.gate_proj", prefix + "mlp.up_proj"]
    for group in (qkv, gate_up, [prefix + "self_attn.o_proj"], [prefix + "mlp.down_proj"]):
        amax = max(float(weights[n].abs().max()) for n in group)
        for n in group:
            torch.testing.assert_close(result.qparams[n].global_scale, torch.tensor([448 * 6 / amax]), rtol=1e-6, atol=0)
            assert torch.equal(result.qparams[n].global_scale, result.qparams[group[0]].global_scale)


def _hessian(xs):
    H, n = None, 0
    for x in xs:
        x = x.reshape(-1, x.shape[-1])
        H = x.T @ x if H is None else H.addmm_(x.T, x)
        n += x.shape[0]
    return H / n


def test_sequential_gptq_feeds_quantized_blocks_forward():
    model = _tiny("llama")
    original = copy.deepcopy(model)
    batches = _calib()
    fmt = parse_format("int3")
    result = quantize_model(model, fmt, "gptq", calib=batches)
    qkv = lambda m, i: torch.cat([m.model.layers[i].self_attn.get_submodule(f"{p}_proj").weight for p in "qkv"]).detach()  # noqa: E731
    got = lambda i: torch.cat([result.qparams[f"model.layers.{i}.self_attn.{p}_proj"].codes for p in "qkv"])  # noqa: E731

    def inputs_of_block(m, i):
        outs = []
        with torch.no_grad():
            for b in batches:
                hs = m(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                       output_hidden_states=True).hidden_states[i]
                outs.append(m.model.layers[i].input_layernorm(hs))
        return outs

    # Block 0 reads the embeddings; block 1 reads what the *quantized* block 0 makes of them.
    ref0 = gptq_quantize(qkv(original, 0), _hessian(inputs_of_block(original, 0)), fmt)
    assert (ref0.codes == got(0)).float().mean() > 0.99
    ref1 = gptq_quantize(qkv(original, 1), _hessian(inputs_of_block(model, 1)), fmt)
    wrong1 = gptq_quantize(qkv(original, 1), _hessian(inputs_of_block(original, 1)), fmt)
    agree = (ref1.codes == got(1)).float().mean()
    assert agree > 0.99 and agree > (wrong1.codes == got(1)).float().mean()
    for name, qp in result.qparams.items():
        assert on_grid(model.get_submodule(name).weight, qp, fmt)
    assert result.calib_tokens == 3 * 2 * 32 and len(result.layer_seconds) == 2


@pytest.mark.parametrize("fmt", ["int3", "nvfp4a16"])
def test_gptq_beats_rtn_on_the_calibration_data(fmt):
    batches = _calib(n=4)
    ref = _logits(_tiny("apertus"), batches)
    errs = {}
    for method in ("rtn", "gptq"):
        model = _tiny("apertus")
        quantize_model(model, fmt, method, calib=batches)
        errs[method] = float((_logits(model, batches) - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"], errs


def test_w4a4_calibrates_input_scales_and_quantizes_activations():
    model = _tiny("llama")
    batches = _calib()
    with torch.no_grad():
        first_inputs = [model.model.layers[0].input_layernorm(model.model.embed_tokens(b["input_ids"])) for b in batches]
    fmt = parse_format("nvfp4")
    result = quantize_model(model, fmt, "rtn", calib=batches)
    igs = result.qparams["model.layers.0.self_attn.q_proj"].input_global_scale
    assert torch.equal(igs, global_scale_from_amax(torch.stack([x.abs().max() for x in first_inputs]).max()))
    for p in "kv":
        assert torch.equal(result.qparams[f"model.layers.0.self_attn.{p}_proj"].input_global_scale, igs)
    assert sorted(result.activation_modules) == sorted(target_modules(model))
    x = torch.randn(2, 5, 64)
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.equal(q_proj(x), F.linear(quantize_activation(x, fmt, igs), q_proj.weight))
        detach_activation_quant(model)
        assert torch.equal(q_proj(x), F.linear(x, q_proj.weight))


def test_fp8_quantizes_activations_per_token_without_calibration():
    model = _tiny("llama")
    result = quantize_model(model, "fp8", "rtn")
    down = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        assert torch.equal(down(x), F.linear(quantize_activation(x, parse_format("fp8")), down.weight))
    assert result.qparams["model.layers.1.mlp.down_proj"].input_global_scale is None


def test_quantized_directory_round_trip_weight_only(tmp_path):
    model = _tiny("apertus")
    batches = _calib()
    fmt = parse_format("int4")
    result = quantize_model(model, fmt, "gptq", calib=batches, norm_fusion=True)
    out = save_quantized(model, None, fmt, result.qparams, "gptq", tmp_path / "q", **result.info())
    assert is_quantized(out) and not is_quantized(tmp_path)
    record = json.loads((out / "quantization.json").read_text())
    assert record["format"] == fmt.to_dict() and record["format_name"] == "int4" and record["method"] == "gptq"
    assert record["norm_fusion"] is True and record["modules"] == sorted(result.qparams)
    assert record["activation_scheme"] == "none" and record["activation_modules"] == []
    assert record["calib_tokens"] == 3 * 2 * 32 and record["options"]["block_size"] == 128
    flat = load_file(str(out / "qparams.safetensors"))
    assert flat["model.layers.0.mlp.up_proj.codes"].dtype == torch.uint8
    assert flat["model.layers.0.mlp.up_proj.scale"].dtype == torch.bfloat16
    # A plain transformers load (no famex) computes the weight-only quantized model exactly.
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert torch.equal(_logits(plain, batches), _logits(model, batches))
    loaded, info = load_quantized(out)
    assert info["format"] == fmt and torch.equal(_logits(loaded, batches), _logits(model, batches))
    qps = load_qparams(out)
    for name, qp in result.qparams.items():
        assert torch.equal(qps[name].codes, qp.codes) and torch.equal(qps[name].scale, qp.scale)
    with pytest.raises(FamexError, match="already quantized"):
        quantize_model(loaded, "int4", "rtn")


def test_quantized_directory_round_trip_w4a4(tmp_path):
    model = _tiny("llama")
    batches = _calib()
    result = quantize_model(model, "nvfp4", "gptq", calib=batches)
    out = save_quantized(model, None, "nvfp4", result.qparams, "gptq", tmp_path / "q", **result.info())
    flat = load_file(str(out / "qparams.safetensors"))
    name = "model.layers.1.self_attn.k_proj"
    assert flat[f"{name}.scale"].dtype == torch.float8_e4m3fn and flat[f"{name}.codes"].dtype == torch.uint8
    assert flat[f"{name}.global_scale"].shape == (1,) and flat[f"{name}.input_global_scale"].shape == (1,)
    loaded, info = load_quantized(out)
    assert info["activation_modules"] == sorted(result.activation_modules)
    assert torch.equal(_logits(loaded, batches), _logits(model, batches))
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert not torch.equal(_logits(plain, batches), _logits(model, batches))  # activations do matter


def test_tied_embeddings_are_quantized_once(tmp_path):
    model = _tiny("llama", tie=True)
    result = quantize_model(model, "int8", "rtn", lm_head=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "model.embed_tokens" in result.qparams and "lm_head" not in result.qparams
    assert result.tied == {"lm_head": "model.embed_tokens"}
    out = save_quantized(model, None, "int8", result.qparams, "rtn", tmp_path / "q", **result.info())
    loaded, info = load_quantized(out)
    assert info["tied"] == {"lm_head": "model.embed_tokens"}
    batches = _calib(n=1)
    assert torch.equal(_logits(loaded, batches), _logits(model, batches))


def test_bad_inputs(tmp_path):
    with pytest.raises(FamexError, match=r"model\.layers\.0\.self_attn\.q_proj: 96 input features .* group size 64"):
        quantize_model(_tiny("llama", hidden=96), "int4", "rtn")
    with pytest.raises(FamexError, match="GPTQ needs calibration"):
        quantize_model(_tiny(), "int4", "gptq")
    with pytest.raises(FamexError, match="static activation scales"):
        quantize_model(_tiny(), "nvfp4", "rtn")
    bad = _calib(n=1)
    bad[0]["input_ids"][0, 0] = VOCAB + 5
    with pytest.raises(FamexError, match="another tokenizer"):
        quantize_model(_tiny(), "int4", "gptq", calib=bad)
    with pytest.raises(FamexError, match="unknown quantization method"):
        quantize_model(_tiny(), "int4", "awq")
    with pytest.raises(FamexError, match="unknown quantization format"):
        quantize_model(_tiny(), "int17", "rtn")
    model = _tiny()
    quantize_model(model, "int4", "rtn")
    with pytest.raises(FamexError, match="already quantized"):
        quantize_model(model, "int4", "rtn")
    model = _tiny()
    result = quantize_model(model, "int4", "rtn")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(FamexError, match="up_proj are not the values"):
        save_quantized(model, None, "int4", result.qparams, "rtn", tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(FamexError, match="not a quantized model directory"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("fmt, method", [("int4", "rtn"), ("int4", "gptq"), ("nvfp4", "rtn")])
def test_block_by_block_on_a_device_equals_in_place(fmt, method):
    """``device=``: each decoder block is moved there, quantized, moved back. torch.device("cpu", 0) is
    not the model's device as torch compares them, so the whole moving path runs here on the CPU;
    the result must be bit-identical (on a GPU, bench/gpu.sh runs it)."""
    batches = _calib(n=2)
    a, b = _tiny("llama"), _tiny("llama")
    ra = quantize_model(a, fmt, method, calib=batches)
    rb = quantize_model(b, fmt, method, calib=batches, device=torch.device("cpu", 0))
    assert ra.qparams.keys() == rb.qparams.keys()
    for name in ra.qparams:
        for f in ("codes", "scale", "input_global_scale"):
            x, y = getattr(ra.qparams[name], f), getattr(rb.qparams[name], f)
            assert (x is None and y is None) or torch.equal(x, y), (name, f)
    assert torch.equal(_logits(a, batches), _logits(b, batches))


def test_quantize_stage_refuses_a_missing_cuda_device():
    from famex.models import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(FamexError, match="no CUDA device is available; use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
