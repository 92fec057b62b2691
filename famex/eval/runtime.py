"""Open any model famex makes as it is deployed, for evaluation: one torch-facing object per kind.

`open_model(spec)` recognises what it is given and loads it the way its runtime computes it:

================== =====================================================================================
``gguf``           a GGUF file or ``default`` (the offline teacher): dequantized to fp32 by transformers
``hf``             a plain Hugging Face directory (BF16/fp32, e.g. a distill or sft output): fp32, SDPA
``famex-quantized`` a ``famex quantize`` directory: `famex.quant.load_quantized` — fp32 on-grid weights
                   *and* the activation fake-quant hooks of W+A formats (FP8 per token, NVFP4 W4A4)
``compressed-tensors`` a compressed-tensors export: transformers with the compressed-tensors package
                   decompresses it and runs its own activation quantizers. compressed-tensors 0.20's
                   NVFP4 decompressor yields bf16 weights only, so NVFP4 checkpoints are loaded in bf16
                   and their modules cast to fp32 (as tests/test_export_runtimes.py does): the numbers
                   are the runtime's decompressed weights and quantizers, computed in fp32
``mlx``            an MLX export: mlx-lm's own model, in this process (`MLXCausalLM` below)
================== =====================================================================================

MLX exports are scored by mlx-lm itself (not through the quantized directory they came from), so
what is measured is what mlx-lm computes, in the export's dtype with MLX's quantized kernels.
`MLXCausalLM` is a small torch ``nn.Module`` facade over the mlx-lm model: ``forward`` returns
MLX's logits (few-shot scoring, throughput), and ``model`` returns MLX's final hidden states so
that `famex.distill.train.validate_chunks` computes the validation loss through its usual loop.
mlx-lm models take no position ids or attention masks, so a packed row is run one document
segment at a time (segments start where the position ids restart at 0: exactly the cross-document
masking the torch path applies with its block-diagonal mask). In that loss path the output layer
is MLX's head dequantized to fp32 (``mx.dequantize``, exact) and applied in fp32 by famex's loss;
MLX's own quantized matmul in the export's dtype is used everywhere else.

`deployed_size` says what a model weighs as deployed, and how that was worked out.

What this module does not do: score anything, or load models for training.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from famex.errors import FamexError
from famex.utils import read_json

__all__ = ["KINDS", "Evaluable", "detect_kind", "open_model", "architecture_params", "deployed_size",
           "quantized_dir_bytes", "MLXCausalLM", "segments"]

KINDS = ("gguf", "hf", "famex-quantized", "compressed-tensors", "mlx")
BF16_BYTES = 2
"""Unquantized tensors are deployed in bf16 (the released BF16 checkpoints; the exports' default dtype)."""


@dataclass
class Evaluable:
    """A loaded model, what kind of directory it came from, and what that directory says about itself."""

    model: nn.Module
    kind: str
    path: Path
    """The directory (or GGUF file) that was loaded."""
    config: Any
    """The transformers config of the architecture, without any quantization entries."""
    quant: dict[str, Any] | None = None
    """famex-quantized: the quantization.json record (``format`` as a `QuantFormat`)."""
    runtime: dict[str, Any] = field(default_factory=dict)
    """Runtime facts: compressed-tensors format, MLX bits / group / dtype, compute dtype."""


def _config_json(path: Path) -> dict[str, Any]:
    p = path / "config.json"
    return read_json(p) if p.is_file() else {}


def _is_mlx_export(path: Path, config: dict[str, Any]) -> bool:
    meta = path / "meta.json"
    if meta.is_file():
        m = read_json(meta)
        if m.get("stage") == "export":
            return m.get("config", {}).get("to") == "mlx"
    q = config.get("quantization")
    return isinstance(q, dict) and q.get("mode") in ("affine", "mxfp4", "nvfp4", "mxfp8")


def detect_kind(spec: str | os.PathLike) -> str:
    """Which of `KINDS` a model spec is (without loading weights)."""
    from famex.quant.checkpoint import is_quantized

    if str(spec) == "default" or str(spec).endswith(".gguf"):
        return "gguf"
    path = Path(spec)
    if not path.exists():
        raise FamexError(f"model not found: {path} — pass a model directory, a .gguf file, or 'default'")
    if path.is_file():
        raise FamexError(f"{path} is a file but not a .gguf; pass a model directory (with config.json) or a GGUF file")
    if not (path / "config.json").is_file():
        raise FamexError(f"{path} has no config.json: not a model directory (pass a distill/sft/quantize/export output)")
    if is_quantized(path):
        return "famex-quantized"
    config = _config_json(path)
    if _is_mlx_export(path, config):
        return "mlx"
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        return "compressed-tensors"
    if isinstance(qc, dict):
        raise FamexError(f"{path}: quantization method {qc.get('quant_method')!r} is not one famex evaluates "
                         f"({', '.join(KINDS)})")
    return "hf"


def _clean_config(config: Any) -> Any:
    """A copy of a transformers config without quantization entries (for parameter counts)."""
    config = copy.deepcopy(config)
    for key in ("quantization_config", "quantization", "famex_quantization"):
        if hasattr(config, key):
            try:
                delattr(config, key)
            except AttributeError:
                pass
    return config


def architecture_params(config: Any) -> int:
    """All parameters of the architecture (embeddings included, tied ones once), counted on the meta device."""
    from famex.models import model_info

    return int(model_info(_clean_config(config))["params_total"])


def open_model(spec: str | os.PathLike) -> Evaluable:
    """Load a model for evaluation the way its runtime computes it (see the module docstring); eval mode."""
    kind = detect_kind(spec)
    if kind == "gguf":
        from famex.models import load_model, resolve_model_spec

        ms = resolve_model_spec(spec)
        model = load_model(ms)
        return Evaluable(model, kind, ms.path, _clean_config(model.config), runtime={"dtype": "float32"})
    path = Path(spec).resolve()
    if kind == "famex-quantized":
        from famex.quant import load_quantized

        model, info = load_quantized(path)
        return Evaluable(model, kind, path, _clean_config(model.config), quant=info,
                         runtime={"dtype": "float32", "activation_scheme": info["format"].activations})
    if kind == "mlx":
        model = MLXCausalLM.load(path)
        return Evaluable(model, kind, path, model.arch_config, runtime=model.runtime)
    from transformers import AutoModelForCausalLM

    if kind == "compressed-tensors":
        qc = _config_json(path)["quantization_config"]
        fmt = qc.get("format")
        nvfp4 = fmt == "nvfp4-pack-quantized" or any(
            isinstance(g, dict) and g.get("format") == "nvfp4-pack-quantized" for g in (qc.get("config_groups") or {}).values()
        )
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if nvfp4 else torch.float32,
                                                         attn_implementation="sdpa")
            model.eval()
            if nvfp4:
                # compressed-tensors decompresses on the first forward; then compute with its bf16
                # weights in fp32 (its activation quantizers included).
                with torch.no_grad():
                    model(input_ids=torch.zeros((1, 1), dtype=torch.long))
                nn.Module.float(model)
        except ImportError as e:
            raise FamexError(f"{path} is a compressed-tensors checkpoint; loading it needs the compressed-tensors package ({e})") from None
        runtime = {"dtype": "float32", "compressed_tensors_format": fmt, "loaded_dtype": "bfloat16" if nvfp4 else "float32"}
        return Evaluable(model, kind, path, _clean_config(model.config), runtime=runtime)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return Evaluable(model, kind, path, _clean_config(model.config), runtime={"dtype": "float32"})


# ---------------------------------------------------------------- size as deployed


def quantized_dir_bytes(model: nn.Module, quant: dict[str, Any]) -> tuple[int, int]:
    """(bytes, parameters) of the quantized modules of a famex-quantized model as a runtime stores them.

    Per module: ``out · in · fmt.bits_per_weight(in) / 8`` (codes at the format's bits plus its
    scales, and biases for affine formats, at the scale dtype), plus 4 bytes per fp32 global scale
    (NVFP4: the weight's, and the input's for W4A4). Tied modules (a quantized embedding serving as
    lm_head) count once.
    """
    fmt = quant["format"]
    total_bits, params = 0.0, 0
    for name in quant["modules"]:
        w = model.get_submodule(name).weight
        out_features, in_features = w.shape
        total_bits += out_features * in_features * fmt.bits_per_weight(in_features)
        params += out_features * in_features
        if fmt.global_scale:
            total_bits += 32 * (2 if name in quant.get("activation_modules", []) and fmt.activations == "nvfp4" else 1)
    return int(round(total_bits / 8)), params


def deployed_size(ev: Evaluable, params: int) -> dict[str, Any]:
    """``size_bytes`` as deployed, ``bits_per_weight`` per quantized weight, and how they were obtained.

    - unquantized (hf, gguf): ``params × 2`` bytes — deployed as BF16 whatever the file holds (a
      distill output is fp32 on disk, the GGUF teacher Q4_1); ``size_on_disk_bytes`` is the file size;
    - famex-quantized: the directory stores fp32 dequantized weights, so the size is computed:
      quantized modules by `quantized_dir_bytes` (the format's bits per weight, scales included),
      every other parameter at 2 bytes (BF16, as the exporters write them);
    - exports (compressed-tensors, mlx): the weight files on disk (what the runtime loads); bits per
      quantized weight from the export stage's metrics.json when it is there.
    """
    from famex.eval.footprint import model_size

    on_disk = model_size(ev.path)
    out: dict[str, Any] = {"size_on_disk_bytes": on_disk}
    if ev.kind in ("hf", "gguf"):
        out.update(size_bytes=params * BF16_BYTES, bits_per_weight=8.0 * BF16_BYTES,
                   size_method="parameters x 2 bytes (deployed as BF16)")
    elif ev.kind == "famex-quantized":
        qbytes, qparams = quantized_dir_bytes(ev.model, ev.quant)
        size = qbytes + (params - qparams) * BF16_BYTES
        out.update(size_bytes=size, bits_per_weight=8.0 * qbytes / qparams if qparams else 16.0,
                   params_quantized=qparams,
                   size_method=f"computed: quantized modules at {ev.quant['format_name']}'s bits per weight incl. scales "
                               "(QuantFormat.bits_per_weight) + global scales, other parameters at 2 bytes (BF16)")
    else:
        out.update(size_bytes=on_disk, size_method="weight files on disk (*.safetensors)")
        metrics = ev.path / "metrics.json"
        export_metrics = read_json(metrics) if metrics.is_file() else {}
        bpw = export_metrics.get("bits_per_weight_quantized")
        if bpw is not None:
            out["bits_per_weight"] = float(bpw)
            out["params_quantized"] = export_metrics.get("params_quantized")
        else:  # not a famex export: the average over the whole checkpoint is all that is known
            out["bits_per_weight"] = 8.0 * on_disk / params
            out["size_method"] += "; bits per weight averaged over all parameters (no export metrics.json)"
    out["bits_per_weight_model"] = 8.0 * out["size_bytes"] / params
    return out


# ---------------------------------------------------------------- MLX


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each document segment of one packed row: position ids restart at 0 per document."""
    pos = position_ids.tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    if not starts or starts[0] != 0:
        raise FamexError("a packed row must start a document at position 0 (position ids restart per document)")
    bounds = list(zip(starts, starts[1:] + [len(pos)]))
    for s, e in bounds:
        if pos[s:e] != list(range(e - s)):
            raise FamexError(f"position ids {pos[s:e][:8]}... do not count up from 0 within a document")
    return bounds


def _to_torch(x) -> torch.Tensor:
    import mlx.core as mx
    import numpy as np

    return torch.from_numpy(np.array(x.astype(mx.float32)))


def _dequantized_weight(layer) -> torch.Tensor:
    """A linear or embedding layer's weight in fp32; quantized layers are dequantized exactly."""
    import mlx.core as mx

    if hasattr(layer, "scales"):
        kwargs = {"group_size": layer.group_size, "bits": layer.bits}
        if getattr(layer, "mode", None):
            kwargs["mode"] = layer.mode
        w = mx.dequantize(layer.weight, layer.scales, getattr(layer, "biases", None), **kwargs)
    else:
        w = layer.weight
    return _to_torch(w)


class _MLXHidden(nn.Module):
    """The mlx-lm model's body: final (normed) hidden states of a packed batch, document by document."""

    def __init__(self, owner: "MLXCausalLM"):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask=None, **_):
        import mlx.core as mx

        body = self._owner[0].mlx_model.model
        ids = input_ids.cpu()
        rows = []
        for b in range(ids.shape[0]):
            bounds = segments(position_ids[b].cpu()) if position_ids is not None else [(0, ids.shape[1])]
            parts = [_to_torch(body(mx.array(ids[b:b + 1, s:e].numpy())))[0] for s, e in bounds]
            rows.append(torch.cat(parts, dim=0))
        return SimpleNamespace(last_hidden_state=torch.stack(rows).to(input_ids.device))


class MLXCausalLM(nn.Module):
    """An mlx-lm model behind the small part of a transformers causal LM's interface famex's evaluation uses.

    ``forward(input_ids)`` → ``.logits`` (MLX's, as fp32 torch); ``model(...)`` → hidden states;
    ``get_output_embeddings().weight`` → the head dequantized to fp32. Rows are causal and unmasked in
    ``forward``: few-shot scoring gives it right-padded rows (``config._attn_implementation`` is
    ``"mlx"``, so famex's engine does not pack several choices into one masked row).
    """

    base_model_prefix = "model"

    def __init__(self, mlx_model, config, runtime: dict[str, Any]):
        super().__init__()
        self.mlx_model = mlx_model
        self.arch_config = _clean_config(config)
        self.config = copy.deepcopy(self.arch_config)
        self.config._attn_implementation = "mlx"
        self.runtime = runtime
        self.model = _MLXHidden(self)
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # device / dtype for callers that ask
        self._head: nn.Linear | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MLXCausalLM":
        from transformers import AutoConfig

        try:
            from mlx_lm.utils import load_model
        except ImportError as e:
            raise FamexError(f"{path} is an MLX checkpoint; evaluating it needs mlx and mlx-lm: pip install 'mlx[cpu]' mlx-lm ({e})") from None
        path = Path(path)
        mlx_model, mlx_config = load_model(path)
        config = AutoConfig.from_pretrained(path)
        q = mlx_config.get("quantization") or {}
        runtime = {"dtype": str(_first_dtype(mlx_model)), "mlx_bits": q.get("bits"), "mlx_group_size": q.get("group_size")}
        return cls(mlx_model, config, runtime)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self) -> nn.Linear:
        if self._head is None:
            m = self.mlx_model
            layer = m.lm_head if hasattr(m, "lm_head") else m.model.embed_tokens
            w = _dequantized_weight(layer)
            head = nn.Linear(w.shape[1], w.shape[0], bias=False)
            head.weight = nn.Parameter(w, requires_grad=False)
            self._head = head
        return self._head

    def tie_weights(self, *_, **__) -> None:  # lm-eval calls this on the models it is given
        pass

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, use_cache: bool = False,
                logits_to_keep: int = 0, **_):
        import mlx.core as mx

        if attention_mask is not None and attention_mask.dim() == 4:
            raise FamexError("the MLX model takes no 4-D attention masks; score packed rows document by document")
        logits = self.mlx_model(mx.array(input_ids.cpu().numpy()))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=_to_torch(logits).to(input_ids.device))


def _first_dtype(mlx_model) -> Any:
    from mlx.utils import tree_flatten

    for name, value in tree_flatten(mlx_model.parameters()):
        if name.endswith("norm.weight") or "layernorm" in name:
            return value.dtype
    return None
