"""Quantize, dequantize and fake-quantize tensors in a `QuantFormat`, as pure functions.

Everything here works on plain tensors: ``quantize(w, fmt)`` returns the codes and scales a runtime
stores (`QParams`), ``dequantize`` turns them back into fp32 weights, ``fake_quant`` does both
without materializing codes, ``fake_quant_ste`` is the differentiable version QAD trains through,
and ``quantize_activation`` is the runtime's activation quantization (dynamic per-token FP8, or
NVFP4 with a static global scale). The arithmetic follows the runtimes operation by operation
(see `famex.quant.formats` for the conventions), in fp32:

- compressed-tensors: ``scaled = x / (scale / global)``, clamp, round (round-half-even for int,
  the round-to-nearest-even cast for FP8, round-to-nearest-even onto E2M1 for FP4), ``value = code * (scale / global)``;
- MLX affine: ``code = clip(rint((x - bias) / scale), 0, 2^b - 1)``, ``value = scale * code + bias``.

Weights are ``[out_features, in_features]``; groups run along the input dimension. Scales are
returned in their storage dtype (fp32 / bf16 / fp16 / float8_e4m3fn) so an exporter writes them
as they are. What this module does not do: pick which layers to quantize, GPTQ, or pack codes into
a checkpoint's bit layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famex.errors import FamexError
from famex.quant.formats import QuantFormat

__all__ = [
    "QParams", "quantize", "dequantize", "fake_quant", "fake_quant_ste", "on_grid", "quantize_activation",
    "store_scale", "ste_bounds", "compute_scales", "compute_global_scale", "global_scale_from_amax", "effective_scale", "grid_round",
    "to_grid_units", "from_grid_units", "encode_codes", "decode_codes", "group_view", "element_range",
    "FP4_VALUES", "FP8_MAX", "FP4_MAX", "SCALE_TORCH_DTYPES",
]

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""E2M1 magnitudes; a code's low 3 bits index this table and bit 3 is the sign (compressed-tensors and MLX)."""

SCALE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "e4m3": torch.float8_e4m3fn}

# Index into FP4_VALUES by 2 * |value| (0, 1, 2, 3, 4, 6, 8, 12); the other entries are never read.
_FP4_INDEX = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


@dataclass
class QParams:
    """What a runtime stores for one quantized weight matrix ``[out, in]``.

    ``codes`` holds one element per weight, unpacked: int8 for symmetric int (signed), uint8 for
    affine int (``0..2^b-1``), float8_e4m3fn for FP8, uint8 E2M1 nibbles for FP4 (bit 3 = sign).
    ``scale`` (and ``bias`` for affine int) are ``[out, in // group]`` (``[out, 1]`` per channel) in
    the format's scale dtype. ``global_scale`` (NVFP4) and ``input_global_scale`` (NVFP4 W4A4
    activations) are fp32 ``[1]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    input_global_scale: torch.Tensor | None = None


def element_range(fmt: QuantFormat) -> tuple[float, float]:
    """Smallest and largest code value (before scaling)."""
    if fmt.kind == "int":
        if fmt.symmetric:
            return -(2.0 ** (fmt.bits - 1)), 2.0 ** (fmt.bits - 1) - 1
        return 0.0, 2.0**fmt.bits - 1
    top = FP8_MAX if fmt.kind == "fp8" else FP4_MAX
    return -top, top


def _half_last_step(fmt: QuantFormat) -> float:
    # Beyond max + half the last grid step every value saturates to max: that is where the grid ends.
    return {"int": 0.5, "fp8": 16.0, "fp4": 1.0}[fmt.kind]


def ste_bounds(fmt: QuantFormat) -> tuple[float, float]:
    """The range of ``x / scale`` (``(x - bias) / scale``) where `fake_quant_ste` passes gradients: the codes ± half the last step."""
    lo, hi = element_range(fmt)
    h = _half_last_step(fmt)
    return lo - h, hi + h


def _round_fp4(x: torch.Tensor) -> torch.Tensor:
    # Round-to-nearest-even onto E2M1, ties as compressed-tensors' cast_to_fp4 and MLX's to_fp4_e2m1.
    # E2M1 is a uniform grid of step 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]: dividing by the
    # (power-of-two) step and rounding half to even is exact and gives the same ties as the table
    # (1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), in a few passes instead of seven selects. |x| <= 6.
    a = x.abs()
    step = (0.5 + 0.5 * (a >= 2)) * (1 + (a >= 4))
    return torch.round(a / step).mul_(step).copysign_(x)


def grid_round(scaled: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round already-scaled values onto the format's element grid (saturating); returns fp32 codes as floats."""
    lo, hi = element_range(fmt)
    if fmt.kind == "int":
        r = torch.round(scaled).clamp_(lo, hi)
    elif fmt.kind == "fp8":
        r = scaled.clamp(lo, hi).to(torch.float8_e4m3fn).float()
    else:
        r = _round_fp4(scaled.clamp(lo, hi))
    return r + 0.0  # -0.0 -> +0.0, so codes and values agree bit for bit


def to_grid_units(x: torch.Tensor, eff: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x / step`` (``(x - bias) / step`` for affine int): the value `grid_round` rounds."""
    return x / eff if bias is None else (x - bias) / eff


def from_grid_units(r: torch.Tensor, eff: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``code * step`` (``+ bias`` for affine int): the weight a rounded code stands for."""
    return r * eff if bias is None else r * eff + bias


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 global scale ``448 * 6 / amax`` (fp32 ``[1]``); 1 where amax is 0 or not finite (compressed-tensors)."""
    amax = amax.detach().float().reshape(-1).amax().clamp(min=torch.finfo(torch.float32).tiny)
    g = FP8_MAX * FP4_MAX / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def compute_global_scale(*weights: torch.Tensor) -> torch.Tensor:
    """One NVFP4 global scale for tensors that a runtime fuses (q/k/v, gate/up)."""
    return global_scale_from_amax(torch.stack([w.detach().float().abs().amax() for w in weights]))


def _store_scale(s: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round fp32 scales to the storage dtype; zeros become the dtype's eps (compressed-tensors' rule)."""
    dtype = SCALE_TORCH_DTYPES[fmt.scale_dtype]
    if dtype == torch.float8_e4m3fn:
        stored = s.clamp(-FP8_MAX, FP8_MAX).to(dtype)
        eps = 0.125
    else:
        stored = s.to(dtype)
        eps = torch.finfo(dtype).eps
    return torch.where(stored.float() == 0, eps, stored.float()).to(dtype)


def store_scale(s: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Scales rounded to ``fmt``'s storage dtype as `quantize` stores them (zeros become the dtype's eps); for QAD's learned scales."""
    return _store_scale(s, fmt)


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 step a code is multiplied by: ``scale`` or, with a global scale, ``scale / global``."""
    s = scale.float()
    return s if global_scale is None else s / global_scale.float()


def group_view(w: torch.Tensor, fmt: QuantFormat, what: str = "weight") -> torch.Tensor:
    """``w`` ``[out, in]`` as ``[out, in // group, group]``; `FamexError` naming ``what`` if the group does not divide ``in``."""
    if w.ndim != 2:
        raise FamexError(f"{what}: expected a 2-D [out, in] matrix, got shape {tuple(w.shape)}")
    out, n = w.shape
    g = fmt.group_size or n
    if n % g:
        raise FamexError(
            f"{what}: {n} input features are not divisible by the group size {g} of format {fmt.name}; "
            f"use a group size that divides {n} or a per-channel format (-ch)"
        )
    return w.reshape(out, n // g, g)


def compute_scales(w: torch.Tensor, fmt: QuantFormat, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and MLX biases) of ``w`` ``[out, in]`` per group, in the storage dtype: ``(scale, bias)``."""
    wg = group_view(w.detach().float(), fmt)
    if fmt.kind == "int" and not fmt.symmetric:
        return _mlx_affine_scales(wg, fmt)
    amax = wg.abs().amax(dim=-1)
    if fmt.kind == "int":
        s = amax / ((2.0**fmt.bits - 1) / 2)
    elif fmt.kind == "fp8":
        s = amax / FP8_MAX
    else:
        if global_scale is None:
            raise FamexError(f"format {fmt.name} needs a global scale (compute_global_scale) to compute group scales")
        s = (amax / FP4_MAX) * global_scale.float()
    return _store_scale(s, fmt), None


def _mlx_affine_scales(wg: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    # mlx::core affine quantize: the edge of larger magnitude is hit exactly and 0 stays on the grid.
    n_bins = 2.0**fmt.bits - 1
    w_min, w_max = wg.amin(dim=-1), wg.amax(dim=-1)
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)
    nz = q0 != 0
    scale = torch.where(nz, edge / torch.where(nz, q0, 1.0), scale)
    bias = torch.where(nz, edge, 0.0)
    dtype = SCALE_TORCH_DTYPES[fmt.scale_dtype]
    return _store_scale(scale, fmt), bias.to(dtype)


def _resolve(w: torch.Tensor, fmt: QuantFormat, global_scale, scale, bias):
    """Fill in whatever quantization parameters were not given, from ``w``."""
    if scale is None:
        if fmt.global_scale and global_scale is None:
            global_scale = compute_global_scale(w)
        return (global_scale, *compute_scales(w, fmt, global_scale))
    if fmt.global_scale and global_scale is None:
        raise FamexError(f"format {fmt.name}: given group scales only mean something with their global scale; pass it too")
    if not fmt.symmetric and bias is None:
        raise FamexError(f"format {fmt.name} is affine: pass the bias together with the scale")
    return global_scale, scale, bias


def quantize(
    w: torch.Tensor,
    fmt: QuantFormat,
    global_scale: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> QParams:
    """Quantize ``w`` ``[out, in]``; scales come from ``w`` unless given (``scale``/``bias`` as `QParams` holds them)."""
    w32 = w.detach().float()
    wg = group_view(w32, fmt)
    global_scale, scale, bias = _resolve(w32, fmt, global_scale, scale, bias)
    eff = effective_scale(scale, global_scale).unsqueeze(-1)
    b = None if bias is None else bias.float().unsqueeze(-1)
    r = grid_round(to_grid_units(wg, eff, b), fmt).reshape(w32.shape)
    return QParams(codes=encode_codes(r, fmt), scale=scale, bias=bias, global_scale=global_scale)


def encode_codes(r: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Rounded codes (floats from `grid_round`) → the storage dtype `QParams.codes` documents."""
    if fmt.kind == "int":
        return r.to(torch.int8 if fmt.symmetric else torch.uint8)
    if fmt.kind == "fp8":
        return r.to(torch.float8_e4m3fn)
    idx = _FP4_INDEX.to(r.device)[(r.abs() * 2).long()]
    return idx | ((r < 0).to(torch.uint8) << 3)


def decode_codes(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """`QParams.codes` → code values as fp32 (E2M1 nibbles through their table)."""
    if fmt.kind != "fp4":
        return codes.float()
    table = torch.tensor(FP4_VALUES, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def dequantize(qp: QParams, fmt: QuantFormat) -> torch.Tensor:
    """fp32 weights ``[out, in]`` from codes and scales — what the runtime multiplies with."""
    r = decode_codes(qp.codes, fmt)
    out, n = r.shape
    G = qp.scale.shape[-1]
    eff = effective_scale(qp.scale, qp.global_scale).unsqueeze(-1)
    b = None if qp.bias is None else qp.bias.float().unsqueeze(-1)
    return from_grid_units(r.reshape(out, G, n // G), eff, b).reshape(out, n)


def fake_quant(
    w: torch.Tensor,
    fmt: QuantFormat,
    global_scale: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(w))`` without building codes (fp32, no gradient)."""
    w32 = w.detach().float()
    wg = group_view(w32, fmt)
    global_scale, scale, bias = _resolve(w32, fmt, global_scale, scale, bias)
    eff = effective_scale(scale, global_scale).unsqueeze(-1)
    b = None if bias is None else bias.float().unsqueeze(-1)
    return from_grid_units(grid_round(to_grid_units(wg, eff, b), fmt), eff, b).reshape(w32.shape)


def fake_quant_ste(
    w: torch.Tensor,
    fmt: QuantFormat,
    global_scale: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fake_quant` with a straight-through estimator, for quantization-aware training.

    Forward: exactly ``fake_quant(w, fmt, ...)`` (fp32). Backward with respect to ``w``: the
    gradient passes unchanged (factor exactly 1) for every element inside the representable range
    at its scale — ``x / scale`` (``(x - bias) / scale`` for affine int) within
    ``[min_code - h, max_code + h]``, ``h`` half the grid's last step (0.5 for int, 1 for E2M1,
    16 for E4M3) — and is zero outside it, where the element saturates and moving it further
    changes nothing. Scales computed from ``w`` (the default) are constants for the gradient; a
    ``scale`` (or ``bias``) passed in that requires grad gets the LSQ gradient
    (``code - x/scale`` inside the range, the saturated code outside; ``bias``: 0 inside, 1 outside).
    """
    wf = w.float()
    wg = group_view(wf, fmt)
    with torch.no_grad():
        global_scale, scale_c, bias_c = _resolve(wf.detach(), fmt, global_scale, scale, bias)
    scale = scale_c if scale is None else scale
    bias = bias_c if bias is None else bias
    eff = effective_scale(scale, global_scale).unsqueeze(-1)
    b = None if bias is None else bias.float().unsqueeze(-1)
    lo, hi = ste_bounds(fmt)
    with torch.no_grad():
        eff_d = eff.detach()
        b_d = None if b is None else b.detach()
        s_d = to_grid_units(wg.detach(), eff_d, b_d)
        r = grid_round(s_d, fmt)
        v = from_grid_units(r, eff_d, b_d)
        inside = (s_d >= lo) & (s_d <= hi)
    out = v + (wg - wg.detach()) * inside
    if eff.requires_grad or (b is not None and b.requires_grad):
        s_p = to_grid_units(wg.detach(), eff, b)
        r_ste = torch.where(inside, s_p - s_p.detach() + r, r)
        g = from_grid_units(r_ste, eff, b)
        out = out + (g - g.detach())
    return out.reshape(wf.shape)


def on_grid(w: torch.Tensor, qp: QParams, fmt: QuantFormat) -> bool:
    """True when every element of ``w`` is exactly a grid value of the scales in ``qp``."""
    if tuple(w.shape) != tuple(qp.codes.shape):
        return False
    snapped = fake_quant(w, fmt, global_scale=qp.global_scale, scale=qp.scale, bias=qp.bias)
    return bool(torch.equal(snapped, w.detach().float()))


def quantize_activation(x: torch.Tensor, fmt: QuantFormat, input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize activations ``[..., features]`` as the runtime does for this format.

    ``fp8-token``: dynamic, one scale ``amax / 448`` per token (last dimension). ``nvfp4``: groups
    of 16 along the last dimension, e4m3 scales ``e4m3(amax_group / 6 * input_global_scale)`` and
    the static ``input_global_scale`` calibrated beforehand (`global_scale_from_amax` of the
    calibration amax). Computed in fp32, returned in ``x``'s dtype. When ``x`` requires grad the
    gradient passes straight through (identity), so QAD can train through quantized activations.
    """
    if fmt.activations == "none":
        return x
    xf = x.detach().float()
    if fmt.activations == "fp8-token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
        s = amax / FP8_MAX
        s = torch.where(s == 0, torch.finfo(torch.float32).eps, s)
        r = grid_round(xf / s, _FP8_ELEMENTS)
        y = r * s
    else:
        if input_global_scale is None:
            raise FamexError(
                f"format {fmt.name} quantizes activations with a static global scale: calibrate it "
                "(quantize_model with calibration data) before running the model"
            )
        d = xf.shape[-1]
        if d % 16:
            raise FamexError(f"NVFP4 activations need features divisible by 16, got {d}")
        xg = xf.unflatten(-1, (d // 16, 16))
        gs = input_global_scale.float()
        s = _store_scale((xg.abs().amax(dim=-1, keepdim=True) / FP4_MAX) * gs, _NVFP4_ELEMENTS)
        eff = s.float() / gs
        y = (grid_round(xg / eff, _NVFP4_ELEMENTS) * eff).flatten(-2)
    if x.requires_grad:
        xg = x.float()
        y = y + (xg - xg.detach())  # forward value unchanged, identity gradient
    return y.to(x.dtype)


_FP8_ELEMENTS = QuantFormat("fp8", 8, None, True, "fp32")
_NVFP4_ELEMENTS = QuantFormat("fp4", 4, 16, True, "e4m3", global_scale=True)
