"""Fake quantization against the runtimes' own code: mlx.core (affine int) and compressed-tensors (sym int, FP8, NVFP4).

Each reference is the real library computing the same thing, so these tests pin famex's grid to the
one the exporters write and the runtimes compute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from famex.errors import FamexError
from famex.quant.fake_quant import (
    FP4_VALUES,
    decode_codes,
    dequantize,
    fake_quant,
    fake_quant_ste,
    global_scale_from_amax,
    grid_round,
    on_grid,
    quantize,
    quantize_activation,
)
from famex.quant.formats import parse_format


def _weights(out=48, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.02
    w[1, :64] = w[1, :64].abs() + 0.01  # a group with no negative value
    w[2, :64] = 0.0  # an all-zero group
    w[3, 5] = 0.3  # an outlier
    return w


# ----------------------------------------------------------------------------- MLX affine


def _mlx_unpack(wq: np.ndarray, bits: int) -> torch.Tensor:
    words = torch.from_numpy(wq.astype(np.int64))
    per = 32 // bits
    shifts = torch.arange(per) * bits
    return ((words.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_int_matches_mlx_quantize(bits, group):
    mx = pytest.importorskip("mlx.core")
    w = _weights()
    fmt = parse_format(f"int{bits}-g{group}-fp32")
    qp = quantize(w, fmt)
    wq, scales, biases = mx.quantize(mx.array(w.numpy()), group_size=group, bits=bits)
    ref = torch.from_numpy(np.array(mx.dequantize(wq, scales, biases, group_size=group, bits=bits)))
    assert torch.equal(qp.scale, torch.from_numpy(np.array(scales)))
    assert torch.equal(qp.bias, torch.from_numpy(np.array(biases)))
    assert torch.equal(dequantize(qp, fmt), ref)
    assert torch.equal(fake_quant(w, fmt), ref)
    if bits in (2, 4, 8):
        assert torch.equal(qp.codes.long(), _mlx_unpack(np.array(wq), bits))


def test_bf16_affine_params_reproduce_famex_values_in_mlx():
    mx = pytest.importorskip("mlx.core")
    w = _weights()
    fmt = parse_format("int4")  # bf16 scales and biases, as mlx_lm.convert stores them
    qp = quantize(w, fmt)
    assert qp.scale.dtype == torch.bfloat16 and qp.bias.dtype == torch.bfloat16 and qp.codes.dtype == torch.uint8
    codes = qp.codes.long().reshape(w.shape[0], -1, 8)
    packed = (codes << (torch.arange(8) * 4)).sum(-1).numpy().astype(np.uint32)
    got = mx.dequantize(mx.array(packed), mx.array(qp.scale.float().numpy()), mx.array(qp.bias.float().numpy()), group_size=64, bits=4)
    assert torch.equal(torch.from_numpy(np.array(got)), dequantize(qp, fmt))
    assert on_grid(dequantize(qp, fmt), qp, fmt)


# ----------------------------------------------------------------------------- compressed-tensors


def _ct_fake_quant(w, args, global_scale=None):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.group_size:
        wg = w.unflatten(-1, (-1, args.group_size))
        lo, hi = wg.amin(-1), wg.amax(-1)
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale, zp = calculate_qparams(lo, hi, args, global_scale=global_scale)
    return fake_quantize(w, scale, zp, args, global_scale=global_scale), scale


@pytest.mark.parametrize(
    "scheme, name, scale_dtype",
    [
        ("W4A16", "int4-w4a16-fp32", None),
        ("W4A16", "int4-w4a16", torch.bfloat16),
        ("W8A16", "int8-g128-sym-fp32", None),
        ("W3A16", "int3-g128-sym-fp32", None),
        ("FP8_DYNAMIC", "fp8", None),
    ],
)
def test_symmetric_int_and_fp8_match_compressed_tensors(scheme, name, scale_dtype):
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    args = preset_name_to_scheme(scheme, ["Linear"]).weights
    if scale_dtype is not None:
        args = args.model_copy(update={"scale_dtype": scale_dtype})
    w = _weights()
    fmt = parse_format(name)
    ref, ref_scale = _ct_fake_quant(w, args)
    qp = quantize(w, fmt)
    assert torch.equal(qp.scale.float(), ref_scale.float())
    assert torch.equal(dequantize(qp, fmt), ref)
    assert torch.equal(fake_quant(w, fmt), ref)


def test_nvfp4_matches_compressed_tensors_and_its_decompressor():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import generate_gparam

    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    w = _weights()
    fmt = parse_format("nvfp4")
    g = generate_gparam(w.min(), w.max())
    ref, ref_scale = _ct_fake_quant(w, args, global_scale=g)
    qp = quantize(w, fmt)
    assert torch.equal(qp.global_scale, g)
    assert qp.scale.dtype == torch.float8_e4m3fn and torch.equal(qp.scale.float(), ref_scale.float())
    assert torch.equal(dequantize(qp, fmt), ref)
    # The stored codes, packed and unpacked by compressed-tensors and dequantized its way, give the same weights.
    packed = pack_fp4_to_uint8(decode_codes(qp.codes, fmt))
    unpacked = unpack_fp4_from_uint8(packed, *w.shape, dtype=torch.float32)
    assert torch.equal(ct_dequantize(unpacked, qp.scale.float(), args=args, global_scale=qp.global_scale), ref)


def test_fp4_rounding_is_nearest_even_on_every_tie():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    x = torch.arange(-7.0, 7.0001, 0.03125)
    table = torch.tensor(FP4_VALUES)
    signed = torch.cat([-table.flip(0), table[1:]])
    # Slow reference: nearest representable value; on a tie the one with an even E2M1 code (mantissa bit 0).
    ref = []
    for v in x.clamp(-6, 6).tolist():
        d = (signed - v).abs()
        best = torch.nonzero(d == d.min()).flatten().tolist()
        pick = [i for i in best if list(FP4_VALUES).index(abs(signed[i].item())) % 2 == 0] if len(best) > 1 else best
        ref.append(signed[pick[0]].item())
    fmt = parse_format("nvfp4")
    assert torch.equal(grid_round(x, fmt), torch.tensor(ref))
    assert torch.equal(grid_round(x, fmt), cast_to_fp4(x.clamp(-6, 6).clone()) + 0.0)


def test_activation_quant_matches_compressed_tensors():
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 4] = 0.0  # an all-zero token
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations
    s, zp = compute_dynamic_scales_and_zp(x, args, None)
    assert torch.equal(quantize_activation(x, parse_format("fp8")), fake_quantize(x, s, zp, args))

    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    g = generate_gparam(x.min(), x.max())
    s, zp = compute_dynamic_scales_and_zp(x, args, None, global_scale=g)
    got = quantize_activation(x, parse_format("nvfp4"), global_scale_from_amax(x.abs().amax()))
    assert torch.equal(got, fake_quantize(x, s, zp, args, global_scale=g))
    assert quantize_activation(x, parse_format("nvfp4a16")) is x
    with pytest.raises(FamexError, match="calibrate"):
        quantize_activation(x, parse_format("nvfp4"))


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int6", "int8", "int4-w4a16", "int3-ch-sym", "fp8", "nvfp4"])
def test_codes_scales_and_grid(name):
    w = _weights()
    fmt = parse_format(name)
    qp = quantize(w, fmt)
    deq = dequantize(qp, fmt)
    assert torch.equal(deq, fake_quant(w, fmt))
    assert on_grid(deq, qp, fmt)
    assert not on_grid(deq + 1e-3, qp, fmt)
    r = decode_codes(qp.codes, fmt)
    if fmt.kind == "int":
        lo, hi = (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1) if fmt.symmetric else (0, 2**fmt.bits - 1)
        assert r.min() >= lo and r.max() <= hi and torch.equal(r, r.round())
    groups = w.shape[1] // (fmt.group_size or w.shape[1])
    assert qp.scale.shape == (w.shape[0], groups)
    assert (deq - w).abs().max() < w.abs().max()  # sane, not a wrong scale by orders of magnitude
    if fmt.symmetric or (fmt.group_size or 256) <= 64:  # zero is a grid point there: zeros stay zeros
        assert torch.equal(deq[2, :64], torch.zeros(64))


def test_group_must_divide_in_features():
    with pytest.raises(FamexError, match="not divisible by the group size 64"):
        quantize(torch.randn(4, 96), parse_format("int4"))


@pytest.mark.parametrize(
    "name, lo, hi, half",
    [("int4", 0, 15, 0.5), ("int4-ch-sym", -8, 7, 0.5), ("fp8", -448, 448, 16), ("nvfp4", -6, 6, 1)],
)
def test_ste_forward_is_fake_quant_and_gradient_is_identity_inside(name, lo, hi, half):
    fmt = parse_format(name)
    w = _weights().requires_grad_(True)
    out = fake_quant_ste(w, fmt)
    assert torch.equal(out.detach(), fake_quant(w, fmt))
    upstream = torch.randn_like(w)
    (out * upstream).sum().backward()
    # The documented range, recomputed here from the stored scales: [lo - half step, hi + half step].
    qp = quantize(w, fmt)
    step = qp.scale.float() if qp.global_scale is None else qp.scale.float() / qp.global_scale
    g = fmt.group_size or w.shape[1]
    step = step.repeat_interleave(g, dim=1)
    x = w.detach() / step if qp.bias is None else (w.detach() - qp.bias.float().repeat_interleave(g, dim=1)) / step
    inside = (x >= lo - half) & (x <= hi + half)
    assert inside.float().mean() > 0.99  # scales from w itself: (nearly) everything is inside
    assert torch.equal(w.grad, torch.where(inside, upstream, 0.0))


def test_ste_gradient_is_zero_where_an_element_saturates():
    fmt = parse_format("int4-ch-sym-fp32")
    w = _weights().requires_grad_(True)
    scale = (w.detach().abs().amax(1, keepdim=True) / 7.5 / 3).clamp(min=1e-6)  # a third of the natural scale
    out = fake_quant_ste(w, fmt, scale=scale)
    out.sum().backward()
    x = w.detach() / scale
    inside = ((x >= -8.5) & (x <= 7.5)).float()  # the grid's codes -8..7, extended by half a step
    assert 0 < inside.mean() < 1
    assert torch.equal(w.grad, inside)
    assert torch.equal(out.detach(), fake_quant(w, fmt, scale=scale))


def test_ste_learned_scale_gets_the_lsq_gradient():
    fmt = parse_format("int4-ch-sym-fp32")
    w = _weights()
    scale = (w.abs().amax(1, keepdim=True) / 7.5 / 2).requires_grad_(True)
    fake_quant_ste(w, fmt, scale=scale).sum().backward()
    x = w / scale.detach()
    r = torch.round(x).clamp(-8, 7)
    inside = (x >= -8.5) & (x <= 7.5)
    expected = torch.where(inside, r - x, r).sum(1, keepdim=True)
    torch.testing.assert_close(scale.grad, expected, rtol=1e-5, atol=1e-4)


def test_activation_gradient_passes_straight_through():
    x = torch.randn(3, 32).requires_grad_(True)
    y = quantize_activation(x, parse_format("fp8"))
    assert torch.equal(y.detach(), quantize_activation(x.detach(), parse_format("fp8")))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
