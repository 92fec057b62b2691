"""The quantized-model directory: a plain Hugging Face model plus what an exporter needs, bit for bit.

Layout (written atomically: built under a temporary name, renamed when complete):

- ``config.json``, ``model.safetensors``, tokenizer files — ``from_pretrained`` loads it with no
  famex import; the weights are the fp32 dequantized, on-grid values, so a plain load computes the
  weight-only quantized model exactly. ``config.json`` carries ``famex_quantization`` (format,
  method, norm fusion) so that the model refuses to be quantized twice.
- ``quantization.json``: ``format`` (the `QuantFormat` dict), ``format_name``, ``method``,
  ``norm_fusion``, ``modules`` (quantized module names), ``activation_scheme`` and
  ``activation_modules`` (whose inputs the runtime quantizes), ``tied`` (lm_head → embedding when
  they share one quantized tensor), plus the method's figures (calibration tokens, options, time),
  ``qparams_sha256`` and a ``digest`` of its own fields (`famex.integrity`), both checked on load.
- ``qparams.safetensors``: per module ``<name>.codes`` (unpacked: int8 / uint8 / float8_e4m3fn /
  E2M1 nibbles), ``<name>.scale`` (storage dtype), ``<name>.bias`` (affine int),
  ``<name>.global_scale`` and ``<name>.input_global_scale`` (NVFP4) — the exporter packs these as
  they are instead of re-deriving anything from the weights.

`load_quantized` reloads the model, checks that its weights still equal the stored grid, and
re-attaches activation fake-quant. This module does not export runtime formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from famex import __version__, integrity
from famex.errors import FamexError
from famex.quant.fake_quant import QParams, dequantize
from famex.quant.formats import QuantFormat, parse_format
from famex.quant.model import QUANT_MARKER, attach_activation_quant
from famex.utils import atomic_dir, atomic_write_json, sha256_file

__all__ = ["save_quantized", "load_quantized", "load_qparams", "read_info", "check_qparams", "is_quantized",
           "QUANTIZATION_JSON", "QPARAMS_FILE"]

QUANTIZATION_JSON = "quantization.json"
QPARAMS_FILE = "qparams.safetensors"
_FIELDS = ("codes", "scale", "bias", "global_scale", "input_global_scale")


def is_quantized(path: str | os.PathLike) -> bool:
    """True for a directory written by `save_quantized`."""
    path = Path(path)
    return (path / QUANTIZATION_JSON).is_file() and (path / QPARAMS_FILE).is_file()


def _check_on_grid(model: torch.nn.Module, fmt: QuantFormat, qparams: dict[str, QParams], where: str) -> None:
    for name, qp in qparams.items():
        w = model.get_submodule(name).weight.detach()
        if tuple(w.shape) != tuple(qp.codes.shape) or not torch.equal(w.float(), dequantize(qp, fmt)):
            raise FamexError(
                f"{where}: the weights of {name} are not the values its stored codes and scales give "
                "(changed after quantization?); quantize the model again"
            )


def save_quantized(
    model: torch.nn.Module,
    tokenizer: Any,
    fmt: QuantFormat | str,
    qparams: dict[str, QParams],
    method: str,
    out_dir: str | os.PathLike,
    **info: Any,
) -> Path:
    """Write the quantized-model directory (see the module docstring); ``info`` goes into quantization.json."""
    fmt = parse_format(fmt)
    out_dir = Path(out_dir)
    _check_on_grid(model, fmt, qparams, "save_quantized")
    norm_fusion = bool(info.pop("norm_fusion", (getattr(model.config, QUANT_MARKER, None) or {}).get("norm_fusion", False)))
    setattr(model.config, QUANT_MARKER, {"format": fmt.name, "method": method, "norm_fusion": norm_fusion})
    tensors = {}
    for name, qp in qparams.items():
        for key in _FIELDS:
            value = getattr(qp, key)
            if value is not None:
                tensors[f"{name}.{key}"] = value.detach().cpu().clone()  # shared global scales: one copy each
    record = {
        "format": fmt.to_dict(),
        "format_name": fmt.name,
        "method": method,
        "norm_fusion": norm_fusion,
        "modules": sorted(qparams),
        "activation_scheme": fmt.activations,
        "activation_modules": sorted(info.pop("activation_modules", [])),
        "tied": info.pop("tied", {}),
        "famex_version": __version__,
        **info,
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / QPARAMS_FILE), metadata={"famex": json.dumps({"format": fmt.name, "method": method}, sort_keys=True)})
        # (one key: safetensors writes a metadata map in no fixed order, and these files must be byte-reproducible)
        record["qparams_sha256"] = sha256_file(tmp / QPARAMS_FILE)
        atomic_write_json(tmp / QUANTIZATION_JSON, integrity.with_digest(record))
    return out_dir


def load_qparams(path: str | os.PathLike) -> dict[str, QParams]:
    """The `QParams` of every quantized module of a quantized-model directory."""
    path = Path(path)
    if not is_quantized(path):
        raise FamexError(f"{path} is not a quantized model directory (no {QUANTIZATION_JSON} / {QPARAMS_FILE}); run famex quantize first")
    check_qparams(path, read_info(path))
    flat = load_file(str(path / QPARAMS_FILE))
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, what = key.rpartition(".")
        fields.setdefault(name, {})[what] = value
    missing = [n for n, f in fields.items() if "codes" not in f or "scale" not in f]
    if missing:
        raise FamexError(f"{path / QPARAMS_FILE}: modules {missing[:3]} lack codes or scales — the file is corrupt; quantize again")
    return {name: QParams(**{k: f.get(k) for k in _FIELDS}) for name, f in fields.items()}


def load_quantized(path: str | os.PathLike, verify: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a quantized-model directory as famex runs it: fp32, SDPA, activation fake-quant attached.

    Returns ``(model, info)`` with ``info`` the quantization.json record (``info["format"]`` as a
    `QuantFormat`). ``verify`` checks every quantized weight against its stored codes and scales.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    qparams = load_qparams(path)
    info = read_info(path)
    fmt = QuantFormat.from_dict(info["format"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    unknown = [n for n in qparams if not _has_module(model, n)]
    if unknown:
        raise FamexError(f"{path}: quantized modules {unknown[:3]} are not in the model — the directory is inconsistent; quantize again")
    if verify:
        _check_on_grid(model, fmt, qparams, str(path))
    attach_activation_quant(model, fmt, qparams, info.get("activation_modules", []))
    return model, {**info, "format": fmt}


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The quantization.json record of a quantized-model directory, checked against its digest."""
    return integrity.read_json_checked(Path(path) / QUANTIZATION_JSON, "quantize the model again")


def check_qparams(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Refuse a qparams.safetensors whose sha256 is not the one ``info`` (quantization.json) records."""
    recorded = info.get("qparams_sha256")  # None: written before famex recorded it
    if recorded is not None and sha256_file(Path(path) / QPARAMS_FILE) != recorded:
        raise FamexError(f"{Path(path) / QPARAMS_FILE}: sha256 differs from {QUANTIZATION_JSON}'s field qparams_sha256 — "
                         "the file is corrupt; quantize again")


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
