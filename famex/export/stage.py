"""`famex export`: turn a model directory into a checkpoint a runtime deploys.

``famex export --model DIR --to hf|compressed-tensors|mlx --out OUT``

- ``compressed-tensors``: a quantized-model directory (``famex quantize``) → vLLM / transformers
  (`famex.export.compressed_tensors`).
- ``mlx``: a quantized-model directory → mlx-lm, optionally mixed with a higher-bit quantization
  of the same model (`famex.export.mlx`); an unquantized model → a plain MLX checkpoint.
- ``hf``: an unquantized model directory or GGUF file → a dense BF16 checkpoint; a quantized one
  only with ``--dequantize`` (`famex.export.hf`).

Every format/target pair is checked before anything is written; a pair the target cannot hold
fails listing the supported ones (`supported_pairs`). The checkpoint is built in a temporary
directory beside OUT and renamed into place when complete; meta.json says ``complete`` only after
that, and metrics.json holds the size on disk and the effective bits per weight. What this module
does not do: quantize, or load the export in a runtime (the tests do that).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from famex.config import add_config_arguments, resolve_config
from famex.errors import FamexError
from famex.export import compressed_tensors as ct
from famex.export import hf, mlx
from famex.export.files import ModelSource, copy_side_files, has_tokenizer
from famex.stage import Stage, read_meta
from famex.utils import atomic_dir, dir_size, log

TARGETS = ("hf", "compressed-tensors", "mlx")


@dataclass
class ExportConfig:
    model: str = ""
    """The model to export: a famex quantize output (compressed-tensors, mlx), or any model directory / GGUF / 'default' (hf)."""
    to: str = ""
    """Target: hf (dense checkpoint), compressed-tensors (vLLM, transformers) or mlx (mlx-lm)."""
    out: str = ""
    """Output directory: the checkpoint plus meta.json and metrics.json."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Dtype of the tensors left unquantized (embeddings, norms, lm_head); quantization scales keep their own."""
    tokenizer: str = ""
    """Directory to copy tokenizer files from when --model has none (e.g. the data directory's tokenizer/)."""
    dequantize: bool = False
    """--to hf of a quantized model: write its on-grid weights dense (exact only with --dtype fp32)."""
    mixed: str = ""
    """mlx mixed precision: which modules come from --mixed-from: mlx-lm (like mixed_3_6) or edges."""
    mixed_from: str = ""
    """mlx mixed precision: a quantized directory of the same model at more bits (e.g. int6 for an int3 export)."""
    max_shard_bytes: int = 5 * 10**9
    """Largest safetensors shard; bigger checkpoints are split with an index file."""
    device: str = "auto"
    """Where codes are packed and compressed (mlx, compressed-tensors), a module at a time: auto = CUDA when present, cpu, cuda[:N]; the files are the same on every device."""

    def validate(self) -> None:
        if not self.model:
            raise FamexError("--model DIR is required (a famex quantize output, or any model for --to hf)")
        if self.to not in TARGETS:
            raise FamexError(f"--to must be one of {', '.join(TARGETS)}" + (f", not {self.to!r}" if self.to else ""))
        if not self.out:
            raise FamexError("--out DIR is required")
        if (self.mixed or self.mixed_from) and self.to != "mlx":
            raise FamexError("--mixed / --mixed-from are for --to mlx")
        if self.dequantize and self.to != "hf":
            raise FamexError("--dequantize is for --to hf")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig)
    parser.epilog = "supported formats per target:\n" + supported_pairs()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(ExportConfig, args)
    export(cfg)
    print(cfg.out)
    return 0


def supported_pairs(exclude: str = "") -> str:
    """One line per target (but ``exclude``): the formats it holds."""
    lines = {
        "compressed-tensors": ct.SUPPORTED,
        "mlx": f"{mlx.SUPPORTED}; unquantized models as plain MLX checkpoints",
        "hf": "unquantized models (directories, GGUF, 'default'); quantized ones with --dequantize",
    }
    return "\n".join(f"  {target}: {what}" for target, what in lines.items() if target != exclude)


def _is_gguf(spec: str) -> bool:
    return spec == "default" or spec.endswith(".gguf")


def _open(cfg: ExportConfig) -> tuple[ModelSource | None, ModelSource | None]:
    """Open the inputs and check every format/target pair before anything is written."""
    if _is_gguf(cfg.model):
        if cfg.to != "hf":
            raise FamexError(f"{cfg.model} is a GGUF model; quantize it with famex quantize first, or export it with --to hf")
        return None, None
    path = Path(cfg.model)
    if not path.is_dir():
        raise FamexError(f"model not found: {path} — pass a famex quantize output or a model directory")
    source = ModelSource.open(path)
    high = ModelSource.open(cfg.mixed_from) if cfg.mixed_from else None
    try:
        if cfg.to == "compressed-tensors":
            ct.check(source)
        elif cfg.to == "mlx":
            mlx.plan(source, high, cfg.mixed)
        else:
            hf.check(source, cfg.dtype, cfg.dequantize)
    except FamexError as e:  # the error names what this target takes; add the other targets
        raise FamexError(f"{e}\nother targets:\n{supported_pairs(exclude=cfg.to)}") from None
    if not has_tokenizer(path) and not (cfg.tokenizer and has_tokenizer(cfg.tokenizer)):
        raise FamexError(
            f"{path} has no tokenizer files and runtimes need them; pass --tokenizer DIR "
            "(the teacher's tokenizer, e.g. a famex data directory's tokenizer/)"
        )
    return source, high


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and read_meta(out) is None:
        raise FamexError(f"{out} exists and is not a famex export directory; choose another --out (it would be replaced)")


def export(cfg: ExportConfig) -> Path:
    """Run the `famex export` stage described by ``cfg``; returns the output directory."""
    from famex.models import resolve_device

    device = resolve_device(cfg.device)  # a missing CUDA device fails before anything is opened
    source, high = _open(cfg)
    out = Path(cfg.out)
    _check_out(out)
    inputs = {"model": cfg.model if source is not None else None, "mixed_from": cfg.mixed_from or None,
              "tokenizer": cfg.tokenizer or None}
    stage = Stage(out, "export", cfg, inputs, identity_exclude=("max_shard_bytes", "device"))
    if stage.begin():
        return out
    try:
        with atomic_dir(out) as tmp:
            if cfg.to == "compressed-tensors":
                stats = ct.export_compressed_tensors(source, tmp, cfg.dtype, cfg.max_shard_bytes, device)
            elif cfg.to == "mlx":
                stats = mlx.export_mlx(source, tmp, cfg.dtype, high, cfg.mixed, cfg.max_shard_bytes, device)
            elif source is None:
                stats = hf.export_hf_gguf(cfg.model, tmp, cfg.dtype)
            else:
                stats = hf.export_hf(source, tmp, cfg.dtype, cfg.dequantize, cfg.max_shard_bytes)
            if cfg.tokenizer:
                copy_side_files([cfg.tokenizer], tmp)  # fills in only what the model directory lacked
            metrics = _metrics(cfg, source, stats, dir_size(tmp))
            # The renamed directory must still say "running" until finish() marks it complete.
            shutil.copy2(out / "meta.json", tmp / "meta.json")
        stage.finish(metrics)
    except BaseException as e:
        stage.fail(e)
        raise
    log(f"famex export: {cfg.to} checkpoint in {out} ({metrics['size_bytes'] / 2**20:.1f} MiB, "
        f"{metrics['bits_per_weight']:.2f} bits/weight)")
    return out


def _metrics(cfg: ExportConfig, source: ModelSource | None, stats: dict[str, Any], size: int) -> dict[str, Any]:
    """Size on disk and bits per weight: of the whole checkpoint (mlx-lm's convention) and of its quantized modules."""
    params = stats["params_quantized"] + stats["params_dense"]
    metrics = {
        "target": cfg.to,
        "format": source.fmt.name if source is not None and source.fmt is not None else "none",
        "size_bytes": size,
        "tensor_bytes": stats["tensor_bytes"],
        "params": params,
        "params_quantized": stats["params_quantized"],
        "bits_per_weight": 8 * stats["tensor_bytes"] / max(params, 1),
        "bits_per_weight_quantized": (8 * stats["bytes_quantized"] / stats["params_quantized"]) if stats["params_quantized"] else None,
    }
    for key in ("modules_per_format", "compressed_tensors_format", "compressed_tensors_version"):
        if key in stats:
            metrics[key] = stats[key]
    return metrics


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = ExportConfig
run = export
