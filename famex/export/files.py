"""The files of a model directory, as the exporters read and write them.

- `ModelSource`: a model directory opened for export — its config.json, its tensors read one at a
  time (`TensorReader`), and, for a quantized-model directory (`famex.quant.checkpoint`), its
  format and the stored codes and scales of each quantized module, also read one module at a time,
  so exporting a multi-billion-parameter model never holds it in memory twice.
- `ShardWriter`: writes tensors into ``model.safetensors``, or into
  ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` past a size limit.
- `copy_side_files`: tokenizer files, chat template and generation config.
- `cast_dense`: the dtype policy for tensors an export leaves unquantized.

What this module does not do: decide how a module is written in any runtime format (see
`famex.export.compressed_tensors`, `famex.export.mlx`, `famex.export.hf`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from famex.errors import FamexError
from famex.quant.checkpoint import QPARAMS_FILE, QUANTIZATION_JSON, check_qparams, is_quantized, read_info
from famex.quant.fake_quant import QParams
from famex.quant.formats import QuantFormat
from famex.quant.model import QUANT_MARKER
from famex.utils import make_shareable, read_json

__all__ = [
    "DTYPES", "DTYPE_NAMES", "SIDE_FILES", "TensorReader", "ModelSource", "ShardWriter", "cast_dense", "export_config",
    "copy_side_files", "has_tokenizer", "write_json",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# What a runtime reads besides config.json and the weights: the tokenizer (fast or sentencepiece),
# its special tokens, the chat template and the generation defaults (EOS ids, sampling).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_QFIELDS = ("codes", "scale", "bias", "global_scale", "input_global_scale")


class TensorReader:
    """The tensors of a directory's ``*.safetensors`` files, read on demand by name."""

    def __init__(self, path: str | os.PathLike, pattern: str = "model*.safetensors"):
        self.path = Path(path)
        self.files: dict[str, Path] = {}
        files = sorted(self.path.glob(pattern))
        if not files:
            raise FamexError(f"{self.path} has no {pattern} weight files; pass a Hugging Face model directory saved with safetensors")
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    self.files[key] = f

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), framework="pt") as handle:
            return handle.get_tensor(key)


@dataclass
class ModelSource:
    """A model directory opened for export (see the module docstring)."""

    path: Path
    config: dict[str, Any]
    tensors: TensorReader
    fmt: QuantFormat | None = None
    """The quantization format (None: the model is not quantized)."""
    info: dict[str, Any] = field(default_factory=dict)
    """quantization.json of a quantized-model directory."""
    _qparams: TensorReader | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ModelSource":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FamexError(f"{path} has no config.json: not a model directory (pass a famex quantize output or a Hugging Face model directory)")
        config = read_json(path / "config.json")
        tensors = TensorReader(path)
        if not is_quantized(path):
            if config.get(QUANT_MARKER) or config.get("quantization_config") or config.get("quantization"):
                raise FamexError(
                    f"{path} holds an already exported or otherwise quantized checkpoint without famex's "
                    f"{QUANTIZATION_JSON}; export from the famex quantize output directory instead"
                )
            return cls(path, config, tensors)
        info = read_info(path)
        check_qparams(path, info)
        fmt = QuantFormat.from_dict(info["format"])
        return cls(path, config, tensors, fmt, info, TensorReader(path, QPARAMS_FILE))

    @property
    def quantized(self) -> bool:
        return self.fmt is not None

    @property
    def modules(self) -> list[str]:
        """Names of the quantized modules (empty for an unquantized model)."""
        return list(self.info.get("modules", []))

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def qparams(self, name: str, device: Any = None) -> QParams:
        """The stored codes and scales of one quantized module (`famex.quant.checkpoint` layout), on ``device`` (default: the CPU)."""
        if self._qparams is None or f"{name}.codes" not in self._qparams:
            raise FamexError(f"{self.path}: no stored codes for {name} in {QPARAMS_FILE}; the directory is inconsistent — quantize again")
        found = {k: self._qparams.get(f"{name}.{k}") for k in _QFIELDS if f"{name}.{k}" in self._qparams}
        if "scale" not in found:
            raise FamexError(f"{self.path / QPARAMS_FILE}: {name} has codes but no scale — the file is corrupt; quantize again")
        if device is not None:
            found = {k: v.to(device) for k, v in found.items()}
        return QParams(**found)

    def dense_keys(self, quantized: Iterable[str]) -> list[str]:
        """Tensor names that an export writes as they are: all but the weights of ``quantized`` modules.

        A tied lm_head is left out: runtimes (transformers, vLLM, mlx-lm) tie it to the embedding.
        """
        skip = {f"{m}.weight" for m in quantized}
        if self.tied:
            skip.add("lm_head.weight")
        return [k for k in self.tensors.keys() if k not in skip]

    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or self.config.get("text_config", {}).get("num_hidden_layers", 0))


def cast_dense(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Floating-point tensors in the export's dtype; integer buffers unchanged."""
    return t.to(DTYPES[dtype]) if t.is_floating_point() else t


def export_config(source: ModelSource, dtype: str) -> dict[str, Any]:
    """The source's config.json for an export: famex's quantization marker removed, the dtype set."""
    config = {k: v for k, v in source.config.items() if k != QUANT_MARKER}
    config.pop("torch_dtype", None)
    config["dtype"] = DTYPE_NAMES[dtype]
    return config


class ShardWriter:
    """Collect tensors and write them as safetensors shards of at most ``max_shard_bytes`` each.

    Shards are written as they fill (so memory stays at one shard) under provisional names and
    renamed to the Hugging Face scheme when the count is known; an index is written when there is
    more than one. ``tensor_bytes`` counts the bytes of all tensors written.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.out = Path(out_dir)
        self.max = max(1, int(max_shard_bytes))
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.tensor_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in keys for _, keys in self.shards):
            raise FamexError(f"export writes the tensor {name} twice (internal error)")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.tensor_bytes += nbytes

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata=self.metadata)
        make_shareable(path)
        self.shards.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, name the shards, write the index; returns the weight file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, keys), name in zip(self.shards, names):
            os.replace(path, self.out / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)


def copy_side_files(sources: Iterable[str | os.PathLike], dst: Path) -> list[str]:
    """Copy tokenizer, chat template and generation config from the first source that has each file.

    Files already in ``dst`` are kept (so a later call only fills in what is missing).
    """
    copied = []
    sources = list(sources)
    for name in SIDE_FILES:
        if (dst / name).exists():
            continue
        for src in sources:
            f = Path(src) / name
            if f.is_file():
                shutil.copy2(f, dst / name)
                copied.append(name)
                break
    return copied


def write_json(path: Path, obj: Any) -> None:
    """config.json as transformers writes it (sorted keys, two-space indent)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
