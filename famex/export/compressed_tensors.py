"""Export a quantized-model directory as a compressed-tensors checkpoint, the format vLLM serves.

`transformers` loads the same directory when the ``compressed-tensors`` package is installed.
Each famex format maps to one compressed-tensors `QuantizationScheme` (`scheme_for`); the weights
are written by the library's own compressors (``float-quantized``, ``naive-quantized``,
``pack-quantized``, ``nvfp4-pack-quantized``), fed with famex's stored scales and the on-grid
weights those scales and codes give, and the codes they write are checked against famex's stored
codes, so the checkpoint holds exactly the grid famex evaluated. ``config.json`` gains the
``quantization_config`` that vLLM and transformers read, written by compressed-tensors'
`ModelCompressor.update_config`.

| famex format | scheme | format | tensors per linear |
|---|---|---|---|
| ``fp8`` | FP8_DYNAMIC (W8A8) | float-quantized | ``weight`` e4m3 ``[out, in]``, ``weight_scale`` fp32 ``[out, 1]`` |
| ``fp8-a16`` | FP8 weights only | naive-quantized | as above |
| ``nvfp4`` | NVFP4 (W4A4) | nvfp4-pack-quantized | ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` e4m3 ``[out, in/16]``, ``weight_global_scale``, ``input_global_scale`` |
| ``nvfp4a16`` | NVFP4A16 | nvfp4-pack-quantized | as above without ``input_global_scale`` |
| symmetric ``int2``–``int8`` | W{b}A16, group or channel | pack-quantized | ``weight_packed`` int32, ``weight_scale``, ``weight_shape`` |

Not exported (`FamexError` before anything is written): asymmetric (MLX affine) int formats —
compressed-tensors 0.20 writes their zero points, but transformers does not load them back —;
int weights with FP8 activations; FP8 with groups; quantized embeddings or lm_head (vLLM keeps
them in high precision). vLLM's kernels take 4- and 8-bit int weights; other int widths load in
transformers only. What this module does not do: quantize (it never derives a scale), or run
anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from famex.errors import FamexError
from famex.export.files import ModelSource, ShardWriter, cast_dense, copy_side_files, export_config, write_json
from famex.quant.fake_quant import QParams, dequantize
from famex.quant.formats import QuantFormat
from famex.utils import progress

__all__ = ["SUPPORTED", "scheme_for", "compress_module", "pack_nvfp4", "quantization_config", "export_compressed_tensors"]

SUPPORTED = (
    "fp8 (W8A8: FP8 weights per channel, dynamic per-token FP8 activations), fp8-a16, "
    "nvfp4 (W4A4), nvfp4a16, and symmetric int2–int8 weight-only per group or per channel "
    "(int4-w4a16, int8-w8a16, intN-gG-sym, intN-ch-sym)"
)


def _unsupported(fmt: QuantFormat, why: str) -> FamexError:
    return FamexError(f"format {fmt.name} cannot be exported to compressed-tensors: {why}. Supported: {SUPPORTED}")


def scheme_for(fmt: QuantFormat):
    """The compressed-tensors `QuantizationScheme` (format included) that stores ``fmt`` exactly."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if fmt.kind == "fp4":
        scheme = preset_name_to_scheme("NVFP4" if fmt.activations == "nvfp4" else "NVFP4A16", ["Linear"])
        scheme.format = "nvfp4-pack-quantized"
        return scheme
    if fmt.kind == "fp8":
        if fmt.group_size is not None:
            raise _unsupported(fmt, "FP8 weights are exported with one scale per output channel (fp8, fp8-a16)")
        scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
        if fmt.activations == "none":
            scheme.input_activations = None
            scheme.format = "naive-quantized"
        else:
            scheme.format = "float-quantized"
        return scheme
    if not fmt.symmetric:
        raise _unsupported(
            fmt, "it is asymmetric (MLX affine, with a zero point per group), which transformers cannot load from "
            "compressed-tensors; quantize with a symmetric format (e.g. int4-w4a16, int4-g64-sym) or export to mlx"
        )
    if fmt.activations != "none":
        raise _unsupported(fmt, "int weights with quantized activations have no compressed-tensors compressor that packs them")
    weights = QuantizationArgs(
        num_bits=fmt.bits, type="int", symmetric=True, dynamic=False,
        strategy="group" if fmt.group_size else "channel", group_size=fmt.group_size,
    )
    return QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")


def pack_nvfp4(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles ``[out, in]`` → uint8 ``[out, in/2]``, the even column in the low nibble (compressed-tensors' layout)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def _module_state(qp: QParams, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """The uncompressed module state compressed-tensors' compressors take: on-grid weight + famex's scales."""
    state = {"weight": dequantize(qp, fmt), "weight_scale": qp.scale}
    if fmt.global_scale:
        # NVFP4 compressors take the e4m3 values in a wider float (the library's own flow keeps
        # them so until compression) and cast them to float8_e4m3fn themselves; exact both ways.
        state["weight_scale"] = qp.scale.float()
        state["weight_global_scale"] = qp.global_scale.float().reshape(1)
    if fmt.activations == "nvfp4":
        if qp.input_global_scale is None:
            raise FamexError("an NVFP4 W4A4 module has no input_global_scale; quantize it again with calibration data")
        state["input_global_scale"] = qp.input_global_scale.float().reshape(1)
    return state


def compress_module(qp: QParams, fmt: QuantFormat, scheme, name: str = "module") -> dict[str, torch.Tensor]:
    """One module's compressed tensors (local names: ``weight_packed``, ``weight_scale``, ...).

    Written by compressed-tensors' compressor for ``scheme.format``; the codes it wrote are
    compared with famex's stored codes, and a difference is an error (the export would not be
    the model famex evaluated).
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = dict(compressor.compress(_module_state(qp, fmt), scheme))
    if fmt.kind == "int":
        same = torch.equal(unpack_from_int32(out["weight_packed"], fmt.bits, qp.codes.shape), qp.codes.to(torch.int8))
    elif fmt.kind == "fp8":
        same = torch.equal(out["weight"].view(torch.uint8), qp.codes.view(torch.uint8))
    else:
        same = torch.equal(out["weight_packed"], pack_nvfp4(qp.codes))
    scale = out["weight_scale"]
    same = same and scale.dtype == qp.scale.dtype and torch.equal(scale.float(), qp.scale.float())
    if not same:
        raise FamexError(
            f"{name}: compressed-tensors wrote other codes or scales than famex stored for format {fmt.name}; "
            "the export would not compute the quantized model — this is a famex bug, please report it"
        )
    return out


def quantization_config(scheme, ignore: list[str]):
    """The compressed-tensors `QuantizationConfig` of a checkpoint whose linears all use ``scheme``."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(
        config_groups={"group_0": scheme}, format=scheme.format, ignore=ignore, quantization_status="compressed",
    )


def _linear_names(path: Path) -> list[str]:
    """Names of the nn.Linear modules of the model in ``path`` (built on the meta device: no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check(source: ModelSource) -> tuple[Any, list[str]]:
    """The scheme for ``source`` and the linears to leave out (``ignore``); `FamexError` when
    compressed-tensors cannot hold it. Nothing is written."""
    if not source.quantized:
        raise FamexError(
            f"{source.path} is not quantized; run famex quantize first (compressed-tensors holds quantized "
            "weights), or export it with --to hf"
        )
    scheme = scheme_for(source.fmt)
    linears = _linear_names(source.path)
    head = "lm_head" if "lm_head" in linears else None
    extra = [m for m in source.modules if m not in linears or m == head]
    if extra:
        raise FamexError(
            f"{source.path} has quantized {', '.join(extra)}; compressed-tensors exports for vLLM keep embeddings "
            "and lm_head in high precision — quantize without embeddings / lm_head, or export to mlx"
        )
    quantized = set(source.modules)
    return scheme, sorted(n for n in linears if n not in quantized)


def export_compressed_tensors(source: ModelSource, out: Path, dtype: str = "bf16", max_shard_bytes: int = 5 * 10**9,
                              device: Any = None) -> dict[str, Any]:
    """Write the compressed-tensors checkpoint of ``source`` into the (empty) directory ``out``.

    ``dtype`` is the dtype of the tensors that stay unquantized (embeddings, norms, lm_head). Each
    module is compressed (and checked against famex's codes) on ``device`` (default: the CPU).
    Returns figures for metrics.json: quantized and total parameter counts, tensor bytes.
    """
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor

    scheme, ignore = check(source)
    quantized = set(source.modules)
    writer = ShardWriter(out, max_shard_bytes)
    stats = {"params_quantized": 0, "params_dense": 0, "bytes_quantized": 0}
    for key in source.dense_keys(quantized):
        t = source.tensors.get(key)
        writer.add(key, cast_dense(t, dtype))
        stats["params_dense"] += t.numel()
    for name in progress(source.modules, desc=f"compressed-tensors {source.fmt.name}", unit="module"):
        qp = source.qparams(name, device)
        stats["params_quantized"] += qp.codes.numel()
        for local, t in compress_module(qp, source.fmt, scheme, name).items():
            writer.add(f"{name}.{local}", t)
            stats["bytes_quantized"] += t.numel() * t.element_size()
    writer.close()
    write_json(out / "config.json", export_config(source, dtype))
    ModelCompressor(quantization_config=quantization_config(scheme, ignore)).update_config(str(out))
    copy_side_files([source.path], out)
    stats.update(tensor_bytes=writer.tensor_bytes, compressed_tensors_format=scheme.format,
                 compressed_tensors_version=compressed_tensors.__version__)
    return stats
