"""Number formats as data: what a quantized weight (and activation) looks like, and their names.

A `QuantFormat` is one frozen record — element kind, bits, group, symmetry, scale dtype, global
scale, activation scheme — so adding a format is adding a row to `PRESETS`, not a subclass. The
conventions are the runtimes' own, checked against their sources, so that an exporter can write
exactly the grid famex computes and the runtime computes exactly famex's fake-quant values:

- **affine int (MLX, ``mlx.core.quantize(mode="affine")``)**: per group, float ``scale`` and float
  ``bias``, unsigned codes ``0..2^b-1``, ``w = scale * code + bias``. MLX picks ``scale`` and
  ``bias`` so that one edge of the group (the one of larger magnitude) is exact and 0 is on the
  grid; ``scale`` may be negative. The presets store scales and biases in bf16, as mlx_lm.convert
  does for a bf16 model; famex rounds them first and computes the codes with the rounded values,
  so the stored numbers give famex's weights exactly.
- **symmetric int (compressed-tensors ``pack-quantized``)**: ``scale = amax / ((2^b - 1) / 2)``,
  signed codes ``-2^(b-1)..2^(b-1)-1`` (so ``+amax`` clips to ``2^(b-1)-1``), ``w = scale * code``.
  The same grid is an MLX affine grid with ``bias = -2^(b-1) * scale``.
- **FP8 E4M3 (compressed-tensors ``float-quantized``, FP8_DYNAMIC)**: per output channel
  ``scale = amax / 448``; codes are ``float8_e4m3fn`` values; activations dynamic per token.
- **NVFP4 (compressed-tensors ``nvfp4-pack-quantized``)**: E2M1 codes in groups of 16, one E4M3
  scale per group and one fp32 global scale per tensor: ``global = 448 * 6 / amax``,
  ``scale = e4m3(global * amax_group / 6)``, ``w = e2m1 * (scale / global)``; q/k/v (and gate/up)
  share one global scale because vLLM fuses them. W4A4 activations: the same grid per token and
  group of 16, with a static global scale calibrated as ``448 * 6 / amax`` over calibration data.

This module does not quantize anything (see `famex.quant.fake_quant`) and does not know about
checkpoint layouts (that is the exporters' job).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from famex.errors import FamexError

__all__ = ["QuantFormat", "PRESETS", "parse_format", "format_names", "KINDS", "SCALE_DTYPES", "ACTIVATIONS"]

KINDS = ("int", "fp8", "fp4")
SCALE_DTYPES = ("fp32", "bf16", "fp16", "e4m3")
ACTIVATIONS = ("none", "fp8-token", "nvfp4")


@dataclass(frozen=True)
class QuantFormat:
    """How weights (and optionally activations) are quantized. Compare formats with ``==``."""

    kind: str
    """Element kind: ``int`` (uniform integer grid), ``fp8`` (E4M3) or ``fp4`` (E2M1)."""
    bits: int
    """Bits per element: 2–8 for ``int``, 8 for ``fp8``, 4 for ``fp4``."""
    group_size: int | None
    """Consecutive input columns sharing one scale; ``None`` = one scale per output channel."""
    symmetric: bool
    """``True``: ``w = scale * code`` (signed codes). ``False``: MLX affine ``w = scale * code + bias``."""
    scale_dtype: str
    """Dtype the scales (and biases) are stored in and rounded to: fp32, bf16, fp16, or e4m3 (NVFP4)."""
    global_scale: bool = False
    """Two-level scaling (NVFP4): an fp32 per-tensor global scale divides the e4m3 group scales."""
    activations: str = "none"
    """Activation quantization: ``none``, ``fp8-token`` (dynamic per token) or ``nvfp4`` (static global)."""

    def __post_init__(self) -> None:
        def bad(why: str) -> FamexError:
            return FamexError(f"invalid quantization format {self!r}: {why}")

        if self.kind not in KINDS:
            raise bad(f"kind must be one of {', '.join(KINDS)}")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise bad("int formats take 2 to 8 bits")
        if self.kind == "fp8" and self.bits != 8 or self.kind == "fp4" and self.bits != 4:
            raise bad(f"{self.kind} has {8 if self.kind == 'fp8' else 4} bits")
        if self.group_size is not None and self.group_size < 1:
            raise bad("group_size must be positive (or None for per-channel)")
        if not self.symmetric and self.kind != "int":
            raise bad("only int formats can be asymmetric (affine)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise bad(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
        if (self.scale_dtype == "e4m3") != self.global_scale:
            raise bad("e4m3 group scales go with an fp32 global scale (NVFP4) and only with it")
        if self.kind == "fp4" and (self.group_size != 16 or not self.global_scale):
            raise bad("fp4 here is NVFP4: groups of 16 with e4m3 scales and an fp32 global scale")
        if self.global_scale and self.kind != "fp4":
            raise bad("a global scale is only defined for NVFP4")
        if self.activations not in ACTIVATIONS:
            raise bad(f"activations must be one of {', '.join(ACTIVATIONS)}")
        if self.activations == "nvfp4" and self.kind != "fp4":
            raise bad("NVFP4 activations go with NVFP4 weights (W4A4)")

    @property
    def name(self) -> str:
        """The preset name if this is a preset, else the parametric name `parse_format` reads back."""
        for preset, fmt in PRESETS.items():
            if fmt == self:
                return preset
        return _parametric_name(self)

    @property
    def weight_only(self) -> bool:
        return self.activations == "none"

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight including the group scales (and biases); a per-tensor global scale is left out."""
        group = self.group_size or in_features
        scale_bits = {"fp32": 32, "bf16": 16, "fp16": 16, "e4m3": 8}[self.scale_dtype]
        per_group = scale_bits * (1 if self.symmetric else 2)
        return self.bits + per_group / group

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantFormat":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FamexError(f"unknown quantization format fields {sorted(unknown)}; known: {sorted(known)}")
        missing = {"kind", "bits", "group_size", "symmetric", "scale_dtype"} - set(d)
        if missing:
            raise FamexError(f"quantization format is missing {sorted(missing)}: {d}")
        return cls(**d)


def _mlx_int(bits: int) -> QuantFormat:
    # Group 64 and bf16 scales/biases are what mlx_lm.convert writes for a bf16 model.
    return QuantFormat("int", bits, 64, symmetric=False, scale_dtype="bf16")


PRESETS: dict[str, QuantFormat] = {
    **{f"int{b}": _mlx_int(b) for b in (2, 3, 4, 5, 6, 8)},
    # compressed-tensors W4A16 / W8A16: symmetric; vLLM keeps these scales in the activation dtype.
    "int4-w4a16": QuantFormat("int", 4, 128, symmetric=True, scale_dtype="bf16"),
    "int8-w8a16": QuantFormat("int", 8, None, symmetric=True, scale_dtype="bf16"),
    # FP8_DYNAMIC: vLLM holds per-channel FP8 weight scales in fp32.
    "fp8": QuantFormat("fp8", 8, None, symmetric=True, scale_dtype="fp32", activations="fp8-token"),
    "nvfp4": QuantFormat("fp4", 4, 16, symmetric=True, scale_dtype="e4m3", global_scale=True, activations="nvfp4"),
    "nvfp4a16": QuantFormat("fp4", 4, 16, symmetric=True, scale_dtype="e4m3", global_scale=True),
}

_GRAMMAR = (
    "names: a preset ({presets}) or PRESET-OPTION[-OPTION...] with "
    "OPTION g<N> (group size) | ch (per channel) | sym | asym | fp32 | bf16 | fp16 (scale dtype) | "
    "a16 (weights only) | afp8 (dynamic per-token FP8 activations) | a4 (NVFP4 activations); "
    "e.g. int3-g128, int4-ch-sym, int6-g32, fp8-a16"
)


def format_names() -> list[str]:
    return list(PRESETS)


def _grammar_help() -> str:
    return _GRAMMAR.format(presets=", ".join(PRESETS))


def parse_format(name: str | QuantFormat) -> QuantFormat:
    """A preset name or a parametric name (``int3-g128``, ``int4-ch-sym``, ``fp8-a16``) → `QuantFormat`."""
    if isinstance(name, QuantFormat):
        return name
    key = str(name).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    # The base is the longest preset the name starts with (so presets take options: int4-w4a16-fp32).
    base = next((p for p in sorted(PRESETS, key=len, reverse=True) if key.startswith(p + "-")), None)
    if base is None:
        raise FamexError(f"unknown quantization format {name!r}; {_grammar_help()}")
    fmt = PRESETS[base]
    options = key[len(base) + 1:].split("-")
    for opt in options:
        g = re.fullmatch(r"g(\d+)", opt)
        if g and fmt.kind != "fp4":
            fmt = replace(fmt, group_size=int(g.group(1)))
        elif opt == "ch" and fmt.kind != "fp4":
            fmt = replace(fmt, group_size=None)
        elif opt in ("sym", "asym") and fmt.kind == "int":
            fmt = replace(fmt, symmetric=opt == "sym")
        elif opt in ("fp32", "bf16", "fp16") and fmt.kind != "fp4":
            fmt = replace(fmt, scale_dtype=opt)
        elif opt == "a16":
            fmt = replace(fmt, activations="none")
        elif opt == "afp8":
            fmt = replace(fmt, activations="fp8-token")
        elif opt == "a4" and fmt.kind == "fp4":
            fmt = replace(fmt, activations="nvfp4")
        else:
            raise FamexError(f"unknown quantization format {name!r}: option {opt!r} does not apply to {base}; {_grammar_help()}")
    return fmt


def _parametric_name(fmt: QuantFormat) -> str:
    if fmt.kind == "fp4":
        return "nvfp4" + ("-a16" if fmt.activations == "none" else "")
    if fmt.kind == "fp8":
        parts = ["fp8"]
        default = PRESETS["fp8"]
    else:
        parts = [f"int{fmt.bits}"]
        default = _mlx_int(fmt.bits)
    if fmt.group_size != default.group_size:
        parts.append("ch" if fmt.group_size is None else f"g{fmt.group_size}")
    if fmt.symmetric != default.symmetric:
        parts.append("sym" if fmt.symmetric else "asym")
    if fmt.scale_dtype != default.scale_dtype:
        parts.append(fmt.scale_dtype)
    if fmt.activations != default.activations:
        parts.append({"none": "a16", "fp8-token": "afp8", "nvfp4": "a4"}[fmt.activations])
    return "-".join(parts)
