"""Quantization core: number formats, fake quantization, RTN, GPTQ, norm fusion, quantized-model directories.

- `formats`: `QuantFormat` (a format is data), presets and `parse_format`.
- `fake_quant`: `quantize` / `dequantize` / `fake_quant` / `fake_quant_ste` / `quantize_activation`
  / `on_grid` — pure tensor functions following compressed-tensors' and MLX's arithmetic.
- `rtn`, `gptq`: per-matrix algorithms (`rtn_quantize`, `gptq_quantize`).
- `norm_fusion`: `fuse_norms` (equalize input-column norms into the RMSNorms).
- `model`: `quantize_model`, the entry point of the ``famex quantize`` stage (RTN / sequential GPTQ
  over a whole model, activation fake-quant hooks).
- `checkpoint`: `save_quantized` / `load_quantized` / `load_qparams` / `is_quantized`.

QAD and the runtime exporters live elsewhere and build on these functions.
"""

from famex.quant.checkpoint import is_quantized, load_qparams, load_quantized, save_quantized
from famex.quant.fake_quant import (
    QParams,
    dequantize,
    fake_quant,
    fake_quant_ste,
    on_grid,
    quantize,
    quantize_activation,
)
from famex.quant.formats import PRESETS, QuantFormat, parse_format
from famex.quant.gptq import gptq_quantize
from famex.quant.model import QuantResult, attach_activation_quant, quantize_model, target_modules
from famex.quant.norm_fusion import fuse_norms
from famex.quant.rtn import rtn_quantize

__all__ = [
    "QuantFormat", "PRESETS", "parse_format", "QParams", "quantize", "dequantize", "fake_quant", "fake_quant_ste",
    "quantize_activation", "on_grid", "rtn_quantize", "gptq_quantize", "fuse_norms", "quantize_model", "QuantResult",
    "target_modules", "attach_activation_quant", "save_quantized", "load_quantized", "load_qparams", "is_quantized",
]
