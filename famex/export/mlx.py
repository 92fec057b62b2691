"""Export a quantized-model directory as an MLX checkpoint that mlx-lm loads and runs (Apple silicon, or Linux CPU).

MLX's affine quantization (``mlx.core.quantize(mode="affine")``) stores per quantized module
``weight`` uint32 ``[out, in * bits / 32]``, ``scales`` and ``biases`` ``[out, in / group]`` and
computes ``w = scales * code + biases``. famex's affine int formats (the ``int2`` … ``int8``
presets) are that grid; a symmetric int grid is one too, with ``code + 2^(b-1)`` and
``biases = -2^(b-1) * scales`` (exact in any float dtype: a power-of-two multiple). The codes are
packed as MLX packs them: each row a little-endian bit stream, element ``j`` at bit ``j * bits``
(checked against ``mx.quantize`` in the tests). Scales and biases keep the dtype famex stored them
in (widened to the export's dtype when that is wider: MLX dequantizes in the scales' dtype);
nothing is re-derived from the weights.

``config.json`` is the source's plus what mlx-lm reads:

- ``quantization`` (and its copy ``quantization_config``, as ``mlx_lm.convert`` writes it):
  ``{"group_size", "bits", "mode": "affine"}`` plus one entry per module path whose bits or group
  differ from those (mixed recipes); a quantized embedding is an MLX ``QuantizedEmbedding`` (tied
  embeddings then serve as the quantized lm_head, ``as_linear``).
- ``rope_theta`` and ``rope_scaling``: transformers 5 keeps them inside ``rope_parameters``, and
  mlx-lm's readers would otherwise fall back to their defaults (Llama: 10000).
- Apertus: ``mlp_bias``, ``attention_bias``, ``qk_norm``, ``post_norm`` (mlx-lm's Apertus reader
  requires them; it also assumes ``head_dim = hidden_size / num_attention_heads``).

**Mixed precision** (`MIXED_RECIPES`): a second quantized-model directory of the same model at
more bits (``high``) supplies the modules a recipe names, as they are there (quantized at its
format, or unquantized if it left them so); every other module comes from the main directory.
Both were quantized from one model, so every tensor they leave unquantized must be equal; that is
checked. What this module does not do: quantize, or export NVFP4 / FP8 / per-channel / grouped
formats MLX's affine kernels lack (`FamexError` before anything is written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from famex.errors import FamexError
from famex.export.files import DTYPES, ModelSource, ShardWriter, cast_dense, copy_side_files, export_config, write_json
from famex.quant.fake_quant import QParams
from famex.quant.formats import QuantFormat
from famex.utils import progress

__all__ = [
    "SUPPORTED", "MLX_BITS", "MLX_GROUPS", "MIXED_RECIPES", "check_format", "pack_bits", "unpack_bits", "mlx_tensors",
    "mlx_params", "mlx_config", "mixed_modules", "plan", "export_mlx",
]

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUPS = (32, 64, 128)
SUPPORTED = (
    "weight-only int2, int3, int4, int5, int6, int8 (affine or symmetric) with group 32, 64 or 128 "
    "(int4, int3-g128, int6-g32, int4-w4a16, int4-g64-sym, ...)"
)
MIXED_RECIPES = {
    "mlx-lm": "like mlx-lm's mixed_X_Y recipes: v_proj and down_proj of the first and last eighth of the blocks "
              "and of every third block between, and lm_head",
    "edges": "the embeddings, lm_head and every linear of the first and the last block",
}


def check_format(fmt: QuantFormat | None) -> None:
    """`FamexError` (listing what MLX takes) unless MLX's affine kernels compute ``fmt`` exactly."""
    if fmt is None:
        return
    why = None
    if fmt.kind != "int":
        why = f"MLX's affine kernels hold integer grids, not {'NVFP4' if fmt.kind == 'fp4' else 'FP8'}"
    elif fmt.activations != "none":
        why = "mlx-lm does not quantize activations for affine formats"
    elif fmt.bits not in MLX_BITS:
        why = f"MLX has no {fmt.bits}-bit kernels"
    elif fmt.group_size not in MLX_GROUPS:
        why = "MLX quantizes in groups of 32, 64 or 128 input features" + (
            ", not per channel" if fmt.group_size is None else f", not {fmt.group_size}")
    if why:
        raise FamexError(f"format {fmt.name} cannot be exported to mlx: {why}. Supported: {SUPPORTED}")


def mlx_params(fmt: QuantFormat) -> dict[str, Any]:
    """The per-module quantization entry mlx-lm reads."""
    return {"group_size": fmt.group_size, "bits": fmt.bits, "mode": "affine"}


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[out, in]`` → uint32 ``[out, in * bits / 32]``: MLX's packing (LSB first, no padding)."""
    out, n = codes.shape
    if (n * bits) % 32 or n % 32:
        raise FamexError(f"{n} input features cannot be packed at {bits} bits for MLX (need a multiple of 32)")
    c = codes.to(torch.int64).reshape(out, n // 32, 32)
    words = torch.zeros(out, n // 32, bits, dtype=torch.int64, device=codes.device)
    for j in range(32):  # 32 codes fill exactly `bits` words
        word, offset = divmod(j * bits, 32)
        words[:, :, word] |= (c[:, :, j] << offset) & 0xFFFFFFFF
        if offset + bits > 32:  # the code straddles two words
            words[:, :, word + 1] |= c[:, :, j] >> (32 - offset)
    # int64 holds the unsigned 32-bit patterns; int32 reinterprets them bit for bit
    return words.reshape(out, n * bits // 32).to(torch.int32).view(torch.uint32)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint32 ``[out, n * bits / 32]`` → uint8 codes ``[out, n]``."""
    out = packed.shape[0]
    words = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(out, n // 32, bits)
    codes = torch.zeros(out, n // 32, 32, dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        v = words[:, :, word] >> offset
        if offset + bits > 32:
            v = v | (words[:, :, word + 1] << (32 - offset))
        codes[:, :, j] = v & mask
    return codes.reshape(out, n).to(torch.uint8)


def mlx_tensors(qp: QParams, fmt: QuantFormat, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``weight`` / ``scales`` / ``biases`` of one module, from famex's stored codes and scales.

    Scales and biases are stored in their own dtype, or in ``dtype`` when that is wider: MLX
    dequantizes in the scales' dtype, and widening is exact, so an fp32 export computes in fp32.
    """
    check_format(fmt)
    if fmt.symmetric:
        offset = 2 ** (fmt.bits - 1)
        codes = (qp.codes.to(torch.int16) + offset).to(torch.uint8)
        biases = (qp.scale.float() * -offset).to(qp.scale.dtype)
    else:
        codes, biases = qp.codes, qp.bias
    scales = qp.scale
    if dtype is not None and torch.finfo(dtype).bits > torch.finfo(scales.dtype).bits:
        scales, biases = scales.to(dtype), biases.to(dtype)
    return {"weight": pack_bits(codes, fmt.bits), "scales": scales, "biases": biases}


def mlx_config(source_config: dict[str, Any], quantization: dict[str, Any] | None) -> dict[str, Any]:
    """config.json with what mlx-lm's readers need spelled out (see the module docstring)."""
    config = dict(source_config)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config:
        theta = rope.get("rope_theta")
        if theta is None:
            raise FamexError("config.json has no rope_theta (nor rope_parameters.rope_theta); mlx-lm needs it")
        config["rope_theta"] = theta
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if config.get("model_type") == "apertus":
        for key, default in (("mlp_bias", False), ("attention_bias", False), ("qk_norm", True), ("post_norm", False)):
            config.setdefault(key, default)
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim") not in (None, hidden // heads):
            raise FamexError(
                f"mlx-lm's Apertus reader assumes head_dim = hidden_size / num_attention_heads = {hidden // heads}, "
                f"but this model has head_dim {config['head_dim']}; it cannot run in mlx-lm"
            )
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def mixed_modules(recipe: str, names: list[str], num_layers: int) -> set[str]:
    """The module names (out of ``names``) a mixed recipe gives more bits."""
    if recipe not in MIXED_RECIPES:
        raise FamexError(f"unknown mixed recipe {recipe!r}; choose one of: " + "; ".join(f"{k} ({v})" for k, v in MIXED_RECIPES.items()))

    def block(name: str) -> int | None:
        parts = name.split(".")
        for a, b in zip(parts, parts[1:]):
            if a == "layers" and b.isdigit():
                return int(b)
        return None

    chosen = set()
    for name in names:
        i = block(name)
        leaf = name.rsplit(".", 1)[-1]
        if recipe == "mlx-lm":
            # mlx_lm.convert's mixed_quant_predicate: more bits at the ends and every third block
            more = i is not None and (i < num_layers // 8 or i >= 7 * num_layers // 8 or (i - num_layers // 8) % 3 == 2)
            if (more and leaf in ("v_proj", "down_proj")) or leaf == "lm_head":
                chosen.add(name)
        elif leaf in ("lm_head", "embed_tokens") or i in (0, num_layers - 1):
            chosen.add(name)
    return chosen


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def plan(source: ModelSource, high: ModelSource | None = None, recipe: str = "") -> dict[str, ModelSource]:
    """Which directory each module of the model comes from.

    Without ``high``: all from ``source``. With it: the modules ``recipe`` names come from
    ``high`` — quantized at its format, or unquantized if ``high`` left them so — and the rest
    from ``source``. `FamexError` when a format MLX lacks is involved or the two directories were
    not quantized from one model.
    """
    check_format(source.fmt)
    modules = sorted({_module_of(k) for k in source.tensors.keys()} | set(source.modules))
    if high is None:
        if recipe:
            raise FamexError(f"--mixed {recipe} needs --mixed-from DIR: a quantized directory of the same model at more bits")
        return {m: source for m in modules}
    if not recipe:
        raise FamexError(f"--mixed-from {high.path} needs --mixed RECIPE ({', '.join(MIXED_RECIPES)})")
    if not high.quantized:
        raise FamexError(f"--mixed-from {high.path} is not quantized; pass a famex quantize output of the same model at more bits")
    check_format(high.fmt)
    _check_same_model(source, high)
    chosen = mixed_modules(recipe, modules, source.num_layers())
    return {m: high if m in chosen else source for m in modules}


def _check_same_model(a: ModelSource, b: ModelSource) -> None:
    strip = ("famex_quantization",)
    ca = {k: v for k, v in a.config.items() if k not in strip}
    cb = {k: v for k, v in b.config.items() if k not in strip}
    if ca != cb:
        diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        raise FamexError(f"{a.path} and {b.path} are not the same model (config differs in {diff}); mix quantizations of one model")
    dense_a = set(a.dense_keys(a.modules))
    for key in sorted(dense_a & set(b.dense_keys(b.modules))):
        if not torch.equal(a.tensors.get(key), b.tensors.get(key)):
            raise FamexError(
                f"{a.path} and {b.path} differ in {key}, which neither quantized: they were not quantized from one model "
                "(or with different norm fusion settings); mix quantizations of one model made the same way"
            )


def export_mlx(source: ModelSource, out: Path, dtype: str = "bf16", high: ModelSource | None = None, recipe: str = "",
               max_shard_bytes: int = 5 * 10**9, device: Any = None) -> dict[str, Any]:
    """Write the MLX checkpoint of ``source`` (mixed with ``high`` by ``recipe``) into the empty directory ``out``.

    ``dtype`` is the dtype of the tensors that stay unquantized; an unquantized ``source`` gives a
    plain MLX checkpoint in it. The codes are packed on ``device`` (default: the CPU), one module at
    a time; the files are the same on every device. Returns figures for metrics.json: parameter counts, tensor bytes,
    modules per format.
    """
    owner = plan(source, high, recipe)
    quantized = {m: o for m, o in owner.items() if m in o.modules}
    writer = ShardWriter(out, max_shard_bytes, {"format": "mlx"})
    stats = {"params_quantized": 0, "params_dense": 0, "bytes_quantized": 0}
    for key in source.dense_keys(quantized):
        t = owner[_module_of(key)].tensors.get(key)
        writer.add(key, cast_dense(t, dtype))
        stats["params_dense"] += t.numel()
    for name in progress(sorted(quantized), desc="mlx", unit="module"):
        src = quantized[name]
        qp = src.qparams(name, device)
        stats["params_quantized"] += qp.codes.numel()
        for local, t in mlx_tensors(qp, src.fmt, DTYPES[dtype]).items():
            writer.add(f"{name}.{local}", t)
            stats["bytes_quantized"] += t.numel() * t.element_size()
    writer.close()
    quantization = None
    if quantized:
        default = mlx_params(source.fmt if source.quantized else next(iter(quantized.values())).fmt)
        quantization = dict(default)
        for name, src in sorted(quantized.items()):
            if mlx_params(src.fmt) != default:
                quantization[name] = mlx_params(src.fmt)
    write_json(out / "config.json", mlx_config(export_config(source, dtype), quantization))
    copy_side_files([source.path], out)
    counts: dict[str, int] = {}
    for src in quantized.values():
        counts[src.fmt.name] = counts.get(src.fmt.name, 0) + 1
    stats.update(tensor_bytes=writer.tensor_bytes, modules_per_format=counts)
    return stats
