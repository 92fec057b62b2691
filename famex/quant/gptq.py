"""GPTQ (Frantar et al., 2023) for one weight matrix, in any `QuantFormat`.

``gptq_quantize(W, H, fmt)`` rounds the columns of ``W`` ``[out, in]`` one at a time and spreads
each column's rounding error over the columns not yet rounded, weighted by the inverse of the
layer's input Hessian ``H = X^T X`` (``X`` the calibration inputs, ``[tokens, in]``), so the layer
output ``W X`` moves as little as possible. The usual machinery is here: relative dampening of
``H``, dead inputs (zero diagonal) zeroed, the upper Cholesky factor of ``H^-1``, lazy block
updates, and activation order (columns by decreasing ``H`` diagonal) with static groups.

Scales: per-channel formats take them from the original weights. Grouped formats take them either
from the original weights up front (``static_groups=True``) or from the already-updated weights of
each group when GPTQ reaches its first column (``static_groups=False``). Groups stay contiguous
in the original column order because that is all a runtime can store, so activation order needs
static groups. The result is a `QParams` whose dequantized weights lie exactly on the grid.

Rows of ``W`` are independent given ``H``, so linears that read the same input (q/k/v) can be
quantized as one concatenated matrix. Collecting ``H`` from a model is `famex.quant.model`'s job.
"""

from __future__ import annotations

import torch

from famex.errors import FamexError
from famex.quant.fake_quant import (
    SCALE_TORCH_DTYPES,
    QParams,
    compute_global_scale,
    compute_scales,
    effective_scale,
    encode_codes,
    from_grid_units,
    grid_round,
    group_view,
    to_grid_units,
)
from famex.quant.formats import QuantFormat

__all__ = ["gptq_quantize", "inverse_hessian_factor"]


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01, tries: int = 5) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; dampening grows ×10 if ``H`` is not positive definite."""
    n = H.shape[0]
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(tries):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10**attempt) * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_solve(eye, L)  # much faster than cholesky_inverse on CPU here
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise FamexError(
        f"GPTQ: the input Hessian is not positive definite even with dampening {damp * 10 ** (tries - 1):g}; "
        "use more calibration tokens or a larger damp"
    )


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: QuantFormat,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    global_scale: torch.Tensor | None = None,
) -> QParams:
    """Quantize ``W`` ``[out, in]`` with GPTQ against the input Hessian ``H`` ``[in, in]``.

    ``global_scale`` (NVFP4) defaults to the one of ``W``; pass a shared one for fused linears.
    ``H`` = identity gives round-to-nearest exactly.
    """
    W = W.detach().float().clone()
    out, n = W.shape
    group_view(W, fmt, "GPTQ weight")
    if tuple(H.shape) != (n, n):
        raise FamexError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match {n} input features")
    H = H.detach().float().clone()
    grouped = fmt.group_size is not None
    g = fmt.group_size or n
    if act_order and grouped and not static_groups:
        raise FamexError(
            "GPTQ: act_order without static_groups would form groups in permuted column order, which no "
            "runtime format stores; use static_groups=True (or act_order=False)"
        )

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if fmt.global_scale and global_scale is None:
        global_scale = compute_global_scale(W)

    n_groups = n // g
    dtype = SCALE_TORCH_DTYPES[fmt.scale_dtype]
    if not grouped or static_groups:
        scale, bias = compute_scales(W, fmt, global_scale)
    else:
        scale = torch.empty(out, n_groups, dtype=dtype, device=W.device)
        bias = None if fmt.symmetric else torch.empty(out, n_groups, dtype=dtype, device=W.device)
    eff = effective_scale(scale, global_scale)
    bias32 = None if bias is None else bias.float()

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp)

    # With groups computed on the fly, a group must not straddle two lazy blocks.
    B = max(g, block_size // g * g) if grouped and not static_groups else block_size
    R = torch.zeros_like(W)  # rounded codes as floats, in (possibly permuted) column order
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and not static_groups and col % g == 0:
                s, b = compute_scales(W1[:, i:i + g], fmt, global_scale)
                scale[:, col // g] = s[:, 0]
                eff[:, col // g] = effective_scale(s[:, 0], global_scale)
                if bias is not None:
                    bias[:, col // g] = b[:, 0]
                    bias32[:, col // g] = b[:, 0].float()
            gi = (int(perm[col]) if perm is not None else col) // g
            b_col = None if bias32 is None else bias32[:, gi]
            w = W1[:, i]
            r = grid_round(to_grid_units(w, eff[:, gi], b_col), fmt)
            q = from_grid_units(r, eff[:, gi], b_col)
            R[:, col] = r
            e = (w - q) / Hinv1[i, i]
            W1[:, i + 1:].addr_(e, Hinv1[i, i + 1:], alpha=-1.0)
            E1[:, i] = e
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        R = R[:, torch.argsort(perm)]
    return QParams(codes=encode_codes(R, fmt), scale=scale, bias=bias, global_scale=global_scale)
