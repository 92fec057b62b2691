"""Quantizing a whole causal LM: which linears, RTN or sequential GPTQ, and activation fake-quant.

`quantize_model(model, fmt, method, calib)` is the one entry point the ``famex quantize`` stage
calls. It replaces the weights of every linear inside the decoder blocks (plus the embeddings /
lm_head when asked; a tied pair is quantized once) by their on-grid fp32 values, attaches
activation fake-quant hooks for W+A formats, and returns the `QParams` of every quantized module
so that `famex.quant.checkpoint.save_quantized` can store exactly what a runtime needs.

- **RTN** needs no data, except that NVFP4 W4A4 needs calibration activations for its static
  input global scales.
- **GPTQ** is sequential: the calibration batches run through the model up to the first block;
  then, block by block, the block's linear inputs are collected (one Hessian per distinct input:
  q/k/v share one, gate/up share one), its linears are quantized, and the batches go through the
  now-quantized block (activation quantization included) to become the next block's inputs.
  Linears sharing an input are quantized as one stacked matrix (GPTQ rows are independent).
- NVFP4 global scales are shared by q/k/v and by gate/up, as vLLM fuses them.

Calibration batches are dicts with ``input_ids [B, T]`` and optionally ``position_ids [B, T]``
and ``attention_mask`` (``[B, 1, T, T]`` boolean, True = may attend, block-diagonal causal for
packed documents; SDPA attention reads it correctly, eager does not). Embeddings and lm_head are
always RTN. What this module does not do: write checkpoints (`checkpoint.py`), train (QAD), or
export runtime formats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from famex.errors import FamexError
from famex.quant.fake_quant import (
    QParams,
    compute_global_scale,
    dequantize,
    global_scale_from_amax,
    quantize,
    quantize_activation,
)
from famex.quant.formats import QuantFormat, parse_format
from famex.quant.gptq import gptq_quantize
from famex.quant.norm_fusion import fuse_norms
from famex.utils import log, progress

__all__ = [
    "METHODS", "SHARED_INPUT_GROUPS", "QuantResult", "quantize_model", "decoder_blocks", "target_modules",
    "shared_input_groups", "fused_global_scales", "attach_activation_quant", "detach_activation_quant",
    "activation_modules", "refuse_quantized", "QUANT_MARKER",
]

METHODS = ("rtn", "gptq")
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linears that read the same input: one Hessian, one stacked GPTQ, one NVFP4 global scale."""
QUANT_MARKER = "famex_quantization"
"""Key famex adds to a quantized model's config (and config.json): format, method, norm fusion."""


@dataclass
class QuantResult:
    """What `quantize_model` did: the `QParams` per module plus figures for quantization.json."""

    qparams: dict[str, QParams]
    fmt: QuantFormat
    method: str
    norm_fusion: bool
    tied: dict[str, str] = field(default_factory=dict)
    activation_modules: list[str] = field(default_factory=list)
    calib_tokens: int = 0
    layer_seconds: list[float] = field(default_factory=list)
    """Wall-clock seconds per decoder block (calibration forwards of that block included)."""
    layer_cpu_seconds: list[float] = field(default_factory=list)
    """Process CPU seconds per block: on a shared machine, closer to what the work costs than wall time."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """Keyword arguments for `save_quantized` (everything but the format, qparams and method)."""
        return {
            "norm_fusion": self.norm_fusion,
            "tied": self.tied,
            "activation_modules": self.activation_modules,
            "calib_tokens": self.calib_tokens,
            "seconds": round(self.seconds, 3),
            "options": self.options,
        }


# --------------------------------------------------------------------------- which modules


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.model.layers`` for Hugging Face causal LMs)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise FamexError(f"{type(model).__name__}: cannot find the decoder blocks (no model.layers); not a decoder-only causal LM")


def _name_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise FamexError(f"module {type(target).__name__} is not part of the model")


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def target_modules(model: nn.Module, embeddings: bool = False, lm_head: bool = False) -> list[str]:
    """Names of the modules to quantize: every linear in the decoder blocks, then embeddings / lm_head if asked.

    Tied embeddings are one tensor: asking for either quantizes it once, under the embedding's name.
    """
    blocks = decoder_blocks(model)
    prefix = _name_of(model, blocks)
    names = [
        f"{prefix}.{i}.{sub}" for i, block in enumerate(blocks)
        for sub, module in block.named_modules() if isinstance(module, nn.Linear)
    ]
    emb_name = _name_of(model, model.get_input_embeddings())
    head = model.get_output_embeddings()
    if embeddings or (lm_head and _tied(model)):
        names.append(emb_name)
    if lm_head and head is not None and not _tied(model):
        names.append(_name_of(model, head))
    return names


def shared_input_groups(names: Iterable[str]) -> list[list[str]]:
    """Group module names whose modules read the same input (see `SHARED_INPUT_GROUPS`), in order."""
    groups: dict[Any, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        key: Any = name
        for members in SHARED_INPUT_GROUPS:
            if leaf in members:
                key = (parent, members)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def fused_global_scales(model: nn.Module, fmt: QuantFormat, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """NVFP4 global scale per module, shared within each `shared_input_groups` group (empty for other formats)."""
    if not fmt.global_scale:
        return {}
    out = {}
    for group in shared_input_groups(names):
        g = compute_global_scale(*[model.get_submodule(n).weight for n in group])
        out.update({n: g for n in group})
    return out


def activation_modules(model: nn.Module, fmt: QuantFormat, names: Iterable[str]) -> list[str]:
    """The quantized modules whose inputs the runtime quantizes too: the block linears of a W+A format."""
    if fmt.activations == "none":
        return []
    return [n for n in names if isinstance(model.get_submodule(n), nn.Linear) and n != _output_name(model)]


def _output_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    return None if head is None else _name_of(model, head)


# --------------------------------------------------------------------------- activation fake-quant


def _activation_hook(module: nn.Module, args: tuple, *, fmt: QuantFormat, input_global_scale: torch.Tensor | None):
    if input_global_scale is not None and input_global_scale.device != args[0].device:
        input_global_scale = input_global_scale.to(args[0].device)
    return (quantize_activation(args[0], fmt, input_global_scale), *args[1:])


def attach_activation_quant(model: nn.Module, fmt: QuantFormat, qparams: Mapping[str, QParams], modules: Iterable[str]) -> list:
    """Quantize the inputs of ``modules`` in every forward, as the runtime does (forward pre-hooks).

    The handles are kept on the model (``model.famex_activation_hooks``) so that
    `detach_activation_quant` can remove them; they are also returned.
    """
    handles = []
    for name in modules:
        igs = qparams[name].input_global_scale if name in qparams else None
        hook = functools.partial(_activation_hook, fmt=fmt, input_global_scale=igs)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    model.famex_activation_hooks = list(getattr(model, "famex_activation_hooks", [])) + handles
    return handles


def detach_activation_quant(model: nn.Module) -> None:
    for handle in getattr(model, "famex_activation_hooks", []):
        handle.remove()
    model.famex_activation_hooks = []


# --------------------------------------------------------------------------- checks


def refuse_quantized(model: nn.Module) -> None:
    """`FamexError` if the model is already quantized (by famex, or a quantized HF checkpoint)."""
    mark = getattr(model.config, QUANT_MARKER, None)
    if mark:
        raise FamexError(
            f"the model is already quantized ({mark.get('format')} by {mark.get('method')}); "
            "quantize the unquantized model instead — quantizing twice compounds the error"
        )
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise FamexError(f"the model carries a quantization_config ({method}); load an unquantized (bf16/fp32) checkpoint to quantize")


def _check_groups(model: nn.Module, names: list[str], fmt: QuantFormat) -> None:
    g = fmt.group_size
    for name in names:
        n = model.get_submodule(name).weight.shape[1]
        if g is not None and n % g:
            if fmt.kind == "fp4":
                fix = "NVFP4 groups are always 16: leave this module unquantized or choose an int / fp8 format"
            else:
                fits = [d for d in (32, 64, 128) if n % d == 0]
                fix = (f"use -g{fits[-1]} or " if fits else "use a group size that divides it or ") + "a per-channel format (-ch)"
            raise FamexError(f"{name}: {n} input features are not divisible by the group size {g} of format {fmt.name}; {fix}")
        if fmt.activations == "nvfp4" and n % 16:
            raise FamexError(f"{name}: NVFP4 activations need input features divisible by 16, got {n}; use nvfp4a16")


def _model_inputs(batch: Mapping[str, Any], vocab: int, i: int) -> dict[str, Any]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise FamexError(f"calibration batch {i} is not a dict with input_ids (got {type(batch).__name__})")
    ids = batch["input_ids"]
    if not torch.is_tensor(ids) or ids.ndim != 2:
        raise FamexError(f"calibration batch {i}: input_ids must be a [B, T] tensor")
    top = int(ids.max()) if ids.numel() else 0
    if top >= vocab or (ids.numel() and int(ids.min()) < 0):
        raise FamexError(
            f"calibration batch {i} holds token id {top} but the model's vocabulary has {vocab} entries: "
            "the calibration data was tokenized with another tokenizer; prepare it with the model's tokenizer"
        )
    out = {"input_ids": ids}
    for key in ("position_ids", "attention_mask"):
        if batch.get(key) is not None:
            out[key] = batch[key]
    return out


# --------------------------------------------------------------------------- quantization


class _StopForward(Exception):
    pass


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict]) -> list[tuple[torch.Tensor, dict]]:
    """Run each batch up to the first decoder block and keep what it receives (hidden states + kwargs)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


class _InputStats:
    """Hessian and absolute maximum of one linear input over the calibration batches."""

    def __init__(self, hessian: bool):
        self.hessian = hessian
        self.H: torch.Tensor | None = None
        self.tokens = 0
        self.amax: torch.Tensor | None = None

    def __call__(self, module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        if self.hessian:
            self.H = x.T @ x if self.H is None else self.H.addmm_(x.T, x)
        self.tokens += x.shape[0]
        amax = x.abs().amax()
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)


def _split_rows(qp: QParams, sizes: list[int]) -> list[QParams]:
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(QParams(
            codes=qp.codes[rows].clone(), scale=qp.scale[rows].clone(),
            bias=None if qp.bias is None else qp.bias[rows].clone(), global_scale=qp.global_scale,
        ))
        start += n
    return out


def _quantize_group(model, names, fmt, method, stats: _InputStats | None, gptq_kw) -> dict[str, QParams]:
    weights = [model.get_submodule(n).weight for n in names]
    gs = compute_global_scale(*weights) if fmt.global_scale else None
    if method == "gptq":
        if stats.H is None:
            raise FamexError(f"GPTQ: no calibration tokens reached {names[0]}; check the calibration batches")
        H = stats.H / stats.tokens
        stacked = gptq_quantize(torch.cat([w.detach() for w in weights]), H, fmt, global_scale=gs, **gptq_kw)
        qps = _split_rows(stacked, [w.shape[0] for w in weights])
    else:
        qps = [quantize(w, fmt, global_scale=gs) for w in weights]
    igs = global_scale_from_amax(stats.amax) if fmt.activations == "nvfp4" and stats is not None else None
    for name, w, qp in zip(names, weights, qps):
        qp.input_global_scale = igs
        w.data.copy_(dequantize(qp, fmt).to(w.dtype))
    return dict(zip(names, qps))


def _to(obj: Any, device: torch.device | None) -> Any:
    """Tensors of nested tuples / lists / dicts moved to ``device`` (None: as they are)."""
    if device is None:
        return obj
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _qparams_to_cpu(qparams: Mapping[str, QParams]) -> dict[str, QParams]:
    return {name: dataclasses.replace(qp, **{f.name: getattr(qp, f.name).cpu() for f in dataclasses.fields(qp)
                                            if torch.is_tensor(getattr(qp, f.name))})
            for name, qp in qparams.items()}


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device | None):
    """``block`` on ``device`` while the body runs, back on the CPU afterwards (None: left where it is)."""
    if device is None:
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to("cpu")


def _sequential(model, blocks, by_block, fmt, method, batches, act_names, gptq_kw, result: QuantResult,
                device: torch.device | None = None) -> None:
    """Block by block: collect linear-input statistics, quantize, pass the batches through the quantized block.

    With ``device``, only the current block and the calibration activations live there (the
    embedding runs where the model is): a model far larger than the device's memory quantizes.
    """
    inputs = [(_to(h, device), _to(kw, device)) for h, kw in _capture_block_inputs(model, blocks[0], batches)]
    for i in progress(range(len(blocks)), desc=f"{method} {fmt.name}", unit="layer"):
        t0, c0 = time.perf_counter(), time.process_time()
        with _on_device(blocks[i], device):
            _sequential_block(model, blocks[i], by_block[i], fmt, method, inputs, act_names, gptq_kw, result, device)
        result.layer_seconds.append(time.perf_counter() - t0)
        result.layer_cpu_seconds.append(time.process_time() - c0)


def _sequential_block(model, block, names, fmt, method, inputs, act_names, gptq_kw, result: QuantResult, device) -> None:
    """One block of `_sequential`: statistics, quantization, then ``inputs`` replaced by its outputs."""
    groups = shared_input_groups(names)
    stats = {group[0]: _InputStats(hessian=method == "gptq") for group in groups}
    handles = [model.get_submodule(name).register_forward_pre_hook(hook) for name, hook in stats.items()]
    try:
        for hidden, kwargs in inputs:
            block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for group in groups:
        qps = _quantize_group(model, group, fmt, method, stats.pop(group[0]), gptq_kw)
        result.qparams.update(_qparams_to_cpu(qps) if device is not None else qps)
    attach_activation_quant(model, fmt, result.qparams, [n for n in names if n in act_names])
    for j, (hidden, kwargs) in enumerate(inputs):
        out = block(hidden, **kwargs)
        inputs[j] = (out[0] if isinstance(out, tuple) else out, kwargs)


def quantize_model(
    model: nn.Module,
    fmt: QuantFormat | str,
    method: str = "rtn",
    calib: Iterable[Mapping[str, Any]] | None = None,
    norm_fusion: bool = False,
    *,
    embeddings: bool = False,
    lm_head: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    device: torch.device | str | None = None,
) -> QuantResult:
    """Quantize ``model`` in place with ``method`` (``rtn`` or ``gptq``) to ``fmt``.

    ``calib``: calibration batches (needed by GPTQ and by NVFP4 W4A4's activation scales).
    ``norm_fusion``: equalize input-column norms into the RMSNorms first (`fuse_norms`).
    ``embeddings`` / ``lm_head``: quantize those too (RTN). The GPTQ options go to `gptq_quantize`.
    ``device``: where each decoder block is quantized (GPTQ's Hessians and solves included), one
    block at a time, the model itself staying on the CPU; None or the model's own device: in place.
    Afterwards the model computes what the runtime computes: on-grid weights, and quantized
    activations (forward hooks) for W+A formats; its config carries `QUANT_MARKER`. Returns a
    `QuantResult`: hand ``result.qparams`` and ``**result.info()`` to `save_quantized`.
    """
    fmt = parse_format(fmt)
    device = torch.device(device) if device is not None else None
    if device is not None and device == next(model.parameters()).device:
        device = None  # already there: nothing to move
    if method not in METHODS:
        raise FamexError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)} (QAD is its own stage)")
    refuse_quantized(model)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        log("quantize: converting the model to fp32 (grid values are exact in fp32)")
        model.float()
    model.eval()
    names = target_modules(model, embeddings=embeddings, lm_head=lm_head)
    _check_groups(model, names, fmt)
    blocks = decoder_blocks(model)
    prefix = _name_of(model, blocks) + "."
    block_names = [n for n in names if n.startswith(prefix)]
    extra_names = [n for n in names if not n.startswith(prefix)]

    needs_calib = method == "gptq" or fmt.activations == "nvfp4"
    batches = None
    if calib is not None:
        vocab = model.get_input_embeddings().weight.shape[0]
        batches = [_model_inputs(b, vocab, i) for i, b in enumerate(calib)]
        if not batches:
            batches = None
    if needs_calib and batches is None:
        why = "GPTQ needs calibration batches" if method == "gptq" else f"{fmt.name} needs calibration batches for its static activation scales"
        raise FamexError(f"{why}: pass calib (token batches from a famex data directory), or use rtn / a weight-only format")
    if batches and any(b.get("attention_mask") is not None and b["attention_mask"].ndim == 4 for b in batches):
        if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
            raise FamexError("4-D packed-document masks need attn_implementation='sdpa' (eager misreads boolean masks); reload the model with sdpa")

    if norm_fusion:
        fuse_norms(model, blocks)
    gptq_kw = dict(block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = QuantResult(qparams={}, fmt=fmt, method=method, norm_fusion=norm_fusion)
    act_names = activation_modules(model, fmt, block_names)
    by_block = [[n for n in block_names if n.startswith(f"{prefix}{i}.")] for i in range(len(blocks))]

    with torch.no_grad():
        if needs_calib:
            result.calib_tokens = sum(int(b["input_ids"].numel()) for b in batches)
            _sequential(model, blocks, by_block, fmt, method, batches, act_names, gptq_kw, result, device)
        else:
            for i in progress(range(len(blocks)), desc=f"{method} {fmt.name}", unit="layer"):
                t0, c0 = time.perf_counter(), time.process_time()
                with _on_device(blocks[i], device):
                    for group in shared_input_groups(by_block[i]):
                        qps = _quantize_group(model, group, fmt, method, None, gptq_kw)
                        result.qparams.update(_qparams_to_cpu(qps) if device is not None else qps)
                result.layer_seconds.append(time.perf_counter() - t0)
                result.layer_cpu_seconds.append(time.process_time() - c0)
            attach_activation_quant(model, fmt, result.qparams, act_names)
        for name in extra_names:
            result.qparams.update(_quantize_group(model, [name], fmt, "rtn", None, gptq_kw))

    if extra_names and _tied(model):
        result.tied = {_output_name(model): _name_of(model, model.get_input_embeddings())}
    result.activation_modules = act_names
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    result.options = {"embeddings": embeddings, "lm_head": lm_head}
    if method == "gptq":
        result.options.update(gptq_kw)
    setattr(model.config, QUANT_MARKER, {"format": fmt.name, "method": method, "norm_fusion": norm_fusion})
    return result
