"""Norm fusion: equalize the input-column norms of the linears behind each RMSNorm before quantizing.

An RMSNorm computes ``gamma * x_hat``; the linears that read it compute ``W (gamma * x_hat)``.
Scaling column ``j`` of every such ``W`` by ``s_j`` and dividing ``gamma_j`` by ``s_j`` leaves the
model's function unchanged in real arithmetic, and with ``s_j = c / ||W[:, j]||`` (norm over the
rows of all linears reading that norm, jointly) every input column gets the same norm ``c`` — the
root mean square of the original column norms, so the matrix keeps its Frobenius norm. Outlier
columns then stop dictating the quantization grid of their groups.

Fused pairs (the norm and the linears it feeds) come from an explicit table per architecture:
Apertus ``attention_layernorm`` → q/k/v, ``feedforward_layernorm`` → up_proj; Llama-layout models
``input_layernorm`` → q/k/v, ``post_attention_layernorm`` → gate/up. Never across up → down: the
activation between them (xIELU, SiLU·gate) is not scale-equivariant, so no scale can be folded
through it. Architectures outside the table are refused rather than guessed.
"""

from __future__ import annotations

import torch

from famex.errors import FamexError

__all__ = ["NORM_FUSION_TABLE", "equalizing_scales", "fold_scales", "fuse_norms"]

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LAYOUT = (("input_layernorm", _QKV), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))

NORM_FUSION_TABLE: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "apertus": (("attention_layernorm", _QKV), ("feedforward_layernorm", ("mlp.up_proj",))),
    "llama": _LLAMA_LAYOUT,
    "mistral": _LLAMA_LAYOUT,
    "qwen2": _LLAMA_LAYOUT,
    "qwen3": _LLAMA_LAYOUT,
}
"""model_type → per decoder block: (RMSNorm attribute, linears it feeds, as paths inside the block)."""


def equalizing_scales(weights: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-input-column factors ``s`` making every column of ``cat(weights)`` have the same norm.

    The common norm is the RMS of the column norms; all-zero columns keep factor 1.
    """
    w = torch.cat([x.detach().float() for x in weights], dim=0)
    norms = w.norm(dim=0)
    alive = norms > 0
    if not alive.any():
        return torch.ones_like(norms)
    target = norms[alive].pow(2).mean().sqrt()
    return torch.where(alive, target / torch.where(alive, norms, 1.0), 1.0)


def fold_scales(norm_weight: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(gamma / s, [W * s for W in weights])``: the same function, columns rescaled."""
    return norm_weight / s, [w * s.unsqueeze(0) for w in weights]


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def fuse_norms(model: torch.nn.Module, blocks: torch.nn.ModuleList | None = None) -> int:
    """Fold equalizing column scales into the RMSNorms of every decoder block, in place.

    Returns the number of (norm, linears) pairs fused. Raises `FamexError` for an architecture
    not in `NORM_FUSION_TABLE`.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in NORM_FUSION_TABLE:
        raise FamexError(
            f"norm fusion is not defined for model type {model_type!r} (known: {', '.join(NORM_FUSION_TABLE)}); "
            "quantize without norm fusion"
        )
    if blocks is None:
        blocks = model.model.layers  # every architecture in the table keeps its blocks there
    fused = 0
    with torch.no_grad():
        for block in blocks:
            for norm_name, linear_paths in NORM_FUSION_TABLE[model_type]:
                norm = _get(block, norm_name)
                linears = [_get(block, p) for p in linear_paths]
                # Biases (q/k/v in Qwen2) are added after W x: rescaling W's columns leaves them as they are.
                s = equalizing_scales([lin.weight for lin in linears])
                gamma, new_weights = fold_scales(norm.weight.float(), [lin.weight.float() for lin in linears], s)
                norm.weight.copy_(gamma.to(norm.weight.dtype))
                for lin, w in zip(linears, new_weights):
                    lin.weight.copy_(w.to(lin.weight.dtype))
                fused += 1
    return fused
