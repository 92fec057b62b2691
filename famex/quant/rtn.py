"""Round-to-nearest (RTN): the no-data baseline every other method is measured against.

Each weight goes to the nearest grid point of scales computed from its own group; no
calibration data, no error correction. `gptq_quantize` with an identity Hessian gives exactly the
same result, which the tests use to pin the two together. Model-level RTN (which layers, shared
NVFP4 global scales, activation calibration) lives in `famex.quant.model`.
"""

from __future__ import annotations

import torch

from famex.quant.fake_quant import QParams, quantize
from famex.quant.formats import QuantFormat

__all__ = ["rtn_quantize"]


def rtn_quantize(W: torch.Tensor, fmt: QuantFormat, global_scale: torch.Tensor | None = None) -> QParams:
    """Quantize ``W`` ``[out, in]`` to the nearest grid point; ``global_scale`` shared across fused linears (NVFP4)."""
    return quantize(W, fmt, global_scale=global_scale)
