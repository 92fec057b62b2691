"""Quantization-aware distillation (QAD): train the whole model through fake-quantized weights.

The paper's final recipe: start from an RTN or GPTQ quantization, then train every parameter
against the stored sparse teacher logits (KL only) while each target linear computes with its
weight fake-quantized by a straight-through estimator (`fake_quant_ste`), and W+A formats also
quantize the linear inputs (`quantize_activation`, identity gradient). At the end the latent
weights are snapped onto the grid with the kept scales, so the saved model computes exactly what
the trained model computed, and `famex export` of it gives the same logits.

How it is wired, and why:

- The fake quantization is a `torch.nn.utils.parametrize` parametrization on each target linear's
  ``weight`` (`FakeQuantWeight`). The latent weight becomes ``parametrizations.weight.original``
  and the scales live in the parametrization (buffers, or parameters with ``learn_scales``), so
  ``model.state_dict()`` holds the whole QAD state: the trainer's checkpoints, exact resume and
  DDP need nothing QAD-specific. Loading a checkpoint needs the same parametrizations attached
  first; `placeholder_qparams` gives them the right shapes without redoing GPTQ.
- The loss is `famex.distill.train.DistillTask` with ``kl_weight=1`` and the loop is
  `famex.distill.trainer.train` (AdamW + cosine by the stage's defaults): no second training loop.
- RTN start: the latent weights are the unquantized (norm-fused) weights, so QAD starts at exactly
  the RTN model and every weight keeps its distance to the rounding boundary. GPTQ start: the
  latent weights are GPTQ's on-grid weights (rounding the original weights with GPTQ's scales
  would not give GPTQ's solution).
- Learned scales (``learn_scales``) are stored flat (1-D) so the trainer's optimizer puts them in
  its no-weight-decay group with the norms, and are rounded to their storage dtype in every forward
  (straight through), so the snapped model uses exactly the scales it trained with.

What this module does not do: parse options or write stage directories (`famex.quant.stage` runs
the QAD stage with these pieces), compute RTN / GPTQ (`famex.quant.model`), or train
(`famex.distill.trainer`).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from famex.errors import FamexError
from famex.quant.fake_quant import (
    SCALE_TORCH_DTYPES,
    QParams,
    dequantize,
    effective_scale,
    fake_quant_ste,
    from_grid_units,
    grid_round,
    group_view,
    quantize,
    quantize_activation,
    ste_bounds,
    store_scale,
    to_grid_units,
)
from famex.quant.formats import ACTIVATIONS, QuantFormat
from famex.quant.model import (
    QUANT_MARKER,
    QuantResult,
    activation_modules,
    detach_activation_quant,
    fused_global_scales,
    quantize_model,
    refuse_quantized,
    shared_input_groups,
    target_modules,
)
from famex.quant.norm_fusion import fuse_norms

__all__ = [
    "STE_KINDS", "INITS", "FakeQuantWeight", "check_ste", "init_quantization", "placeholder_qparams", "attach_fake_quant",
    "fake_quant_modules", "snap_to_grid",
]

STE_KINDS = ("int", "fp8", "fp4")
"""Element kinds `fake_quant_ste` has a straight-through gradient for (a new kind must add one first)."""
INITS = ("rtn", "gptq")


def check_ste(fmt: QuantFormat) -> None:
    """`FamexError` unless QAD can train through ``fmt`` (weights and, for W+A formats, activations)."""
    if fmt.kind not in STE_KINDS:
        raise FamexError(
            f"format {fmt.name} has no straight-through estimator (QAD trains through {', '.join(STE_KINDS)} grids only); "
            "quantize it with --method rtn or gptq"
        )
    if fmt.activations not in ACTIVATIONS:
        raise FamexError(f"format {fmt.name}: activation scheme {fmt.activations!r} has no straight-through path for QAD")


# --------------------------------------------------------------------------- the parametrization


class _FixedScaleSTE(torch.autograd.Function):
    """`fake_quant_ste` for constant scales as one autograd node: the same forward value and gradient
    (identity inside `ste_bounds`, 0 outside), without the elementwise graph the generic version
    builds; QAD runs it on every weight in every forward, so it is most of QAD's extra cost."""

    @staticmethod
    def forward(ctx, w, fmt, global_scale, scale, bias):
        wg = group_view(w.detach().float(), fmt)
        eff = effective_scale(scale, global_scale).unsqueeze(-1)
        b = None if bias is None else bias.float().unsqueeze(-1)
        units = to_grid_units(wg, eff, b)
        lo, hi = ste_bounds(fmt)
        ctx.save_for_backward((units >= lo) & (units <= hi))
        return from_grid_units(grid_round(units, fmt), eff, b).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.reshape(grad.shape), None, None, None, None


class _ActivationSTE(torch.autograd.Function):
    """`quantize_activation` with an identity gradient, as one autograd node."""

    @staticmethod
    def forward(ctx, x, fmt, input_global_scale):
        return quantize_activation(x.detach(), fmt, input_global_scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class FakeQuantWeight(nn.Module):
    """Parametrization ``latent weight -> fake_quant_ste(weight, fmt, scales)`` of one linear.

    Holds the module's quantization state: ``scale`` (and ``bias`` for affine int) flattened,
    fixed (buffers) or learned (parameters); ``global_scale`` (NVFP4) and ``input_global_scale``
    (NVFP4 W4A4 activations) as fixed buffers.
    """

    def __init__(self, fmt: QuantFormat, qp: QParams, learn_scales: bool = False):
        super().__init__()
        self.fmt = fmt
        self.shape = tuple(qp.scale.shape)
        self.storage_dtype = SCALE_TORCH_DTYPES[fmt.scale_dtype]
        scale = qp.scale.detach().float().reshape(-1).clone()
        bias = None if qp.bias is None else qp.bias.detach().float().reshape(-1).clone()
        if learn_scales:
            self.scale = nn.Parameter(scale)
            self.bias = None if bias is None else nn.Parameter(bias)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias)
        self.register_buffer("global_scale", None if qp.global_scale is None else qp.global_scale.detach().float().clone())
        self.register_buffer("input_global_scale",
                             None if qp.input_global_scale is None else qp.input_global_scale.detach().float().clone())

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, bias)`` ``[out, groups]`` in the storage dtype: what `quantize` and the exporter take."""
        scale = store_scale(self.scale.detach().reshape(self.shape), self.fmt)
        bias = None if self.bias is None else self.bias.detach().reshape(self.shape).to(self.storage_dtype)
        return scale, bias

    def _used(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fp32 scale and bias the forward uses: the stored values, straight through to learned ones."""
        s = self.scale.reshape(self.shape)
        b = None if self.bias is None else self.bias.reshape(self.shape)
        if not (s.requires_grad or (b is not None and b.requires_grad)):
            return s, b  # fixed scales came from `quantize`: already exactly representable
        scale, bias = self.stored()
        # value = the stored number exactly (+0), gradient = identity to the learned one
        s = scale.float() + (s - s.detach())
        if b is not None:
            b = bias.float() + (b - b.detach())
        return s, b

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s, b = self._used()
        if s.requires_grad or (b is not None and b.requires_grad):
            return fake_quant_ste(w, self.fmt, self.global_scale, scale=s, bias=b).to(w.dtype)
        return _FixedScaleSTE.apply(w, self.fmt, self.global_scale, s, b)


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantWeight]:
    """Module name → its `FakeQuantWeight`, for every linear `attach_fake_quant` parametrized."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            p = module.parametrizations.weight[0]
            if isinstance(p, FakeQuantWeight):
                out[name] = p
    return out


def _activation_hook(module: nn.Module, args: tuple, *, fmt: QuantFormat, memo: dict, siblings: int):
    # Reads the scale from the parametrization at call time, so a loaded checkpoint's value is used.
    igs = module.parametrizations.weight[0].input_global_scale
    x = args[0]
    # q/k/v (and gate/up) receive the same tensor with the same input scale: quantize it once and
    # hand the result to the siblings, then let go of it (it would otherwise pin an activation per layer).
    ref = memo.get("x")
    if ref is not None and ref() is x and (igs is None or torch.equal(memo["igs"], igs)):
        y = memo["y"]
        memo["left"] -= 1
        if memo["left"] <= 0:
            memo.clear()
        return (y, *args[1:])
    y = _ActivationSTE.apply(x, fmt, igs) if x.requires_grad else quantize_activation(x, fmt, igs)
    memo.clear()
    if siblings > 1:
        memo.update(x=weakref.ref(x), y=y, igs=igs, left=siblings - 1)
    return (y, *args[1:])


def attach_fake_quant(model: nn.Module, fmt: QuantFormat, qparams: Mapping[str, QParams], act_modules: Iterable[str] = (),
                      learn_scales: bool = False) -> dict[str, FakeQuantWeight]:
    """Parametrize every module of ``qparams`` with `FakeQuantWeight`; quantize the inputs of ``act_modules``.

    The modules' current weights become the latent weights. Returns `fake_quant_modules(model)`.
    """
    check_ste(fmt)
    for name, qp in qparams.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise FamexError(f"QAD fake-quantizes linear layers; {name} is a {type(module).__name__} (leave embeddings unquantized)")
        parametrize.register_parametrization(module, "weight", FakeQuantWeight(fmt, qp, learn_scales))
    handles = []
    for group in shared_input_groups(act_modules):
        memo: dict = {}
        hook = functools.partial(_activation_hook, fmt=fmt, memo=memo, siblings=len(group))
        handles += [model.get_submodule(n).register_forward_pre_hook(hook) for n in group]
    model.famex_qad_hooks = list(getattr(model, "famex_qad_hooks", [])) + handles
    model.famex_qad_activation_modules = sorted(act_modules)
    return fake_quant_modules(model)


def snap_to_grid(model: nn.Module) -> dict[str, QParams]:
    """End QAD: every fake-quantized weight becomes its grid value with the kept scales; returns the `QParams`.

    Removes the parametrizations and activation hooks, leaving a plain model whose weights are
    exactly what the QAD forward computed (re-attach activation quantization to run it as before).
    """
    for handle in getattr(model, "famex_qad_hooks", []):
        handle.remove()
    model.famex_qad_hooks = []
    out = {}
    for name, p in fake_quant_modules(model).items():
        module = model.get_submodule(name)
        latent = module.parametrizations.weight.original.detach()
        scale, bias = p.stored()
        qp = quantize(latent, p.fmt, global_scale=p.global_scale, scale=scale, bias=bias)
        qp.input_global_scale = p.input_global_scale
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            module.weight.copy_(dequantize(qp, p.fmt).to(module.weight.dtype))
        out[name] = qp
    return out


# --------------------------------------------------------------------------- the starting point


def init_quantization(model: nn.Module, fmt: QuantFormat, init: str, calib: list[dict] | None, norm_fusion: bool,
                      **gptq_kw: Any) -> QuantResult:
    """Quantize ``model`` with ``init`` (rtn / gptq) as QAD's start, leaving the latent weights QAD trains.

    After it, ``attach_fake_quant(model, fmt, result.qparams, result.activation_modules)`` computes
    exactly the RTN / GPTQ model. The activation hooks `quantize_model` attaches are removed (QAD
    attaches its own).
    """
    if init not in INITS:
        raise FamexError(f"unknown QAD start {init!r}; choose one of {', '.join(INITS)}")
    refuse_quantized(model)
    if norm_fusion:
        # Fused here (not by quantize_model) so that RTN's latent weights are the fused ones.
        fuse_norms(model)
    latent = None
    if init == "rtn":
        latent = {n: model.get_submodule(n).weight.detach().clone() for n in target_modules(model)}
    result = quantize_model(model, fmt, init, calib, norm_fusion=False, **gptq_kw)
    result.norm_fusion = norm_fusion
    detach_activation_quant(model)
    if latent is not None:
        with torch.no_grad():
            for name, w in latent.items():
                model.get_submodule(name).weight.copy_(w)
    setattr(model.config, QUANT_MARKER, {"format": fmt.name, "method": "qad", "norm_fusion": norm_fusion})
    return result


def placeholder_qparams(model: nn.Module, fmt: QuantFormat) -> tuple[dict[str, QParams], list[str]]:
    """`QParams` of the right shapes (RTN of the current weights, unit input scales) and the activation modules.

    For resuming: the checkpoint then overwrites every value, so GPTQ and calibration need not run again.
    """
    names = target_modules(model)
    gs = fused_global_scales(model, fmt, names)
    qparams = {}
    for name in names:
        qp = quantize(model.get_submodule(name).weight, fmt, global_scale=gs.get(name))
        if fmt.activations == "nvfp4":
            qp.input_global_scale = torch.ones(1)
        qparams[name] = qp
    setattr(model.config, QUANT_MARKER, {"format": fmt.name, "method": "qad", "norm_fusion": False})
    return qparams, activation_modules(model, fmt, names)
