"""`famex average`: the uniform average of the weights of several checkpoints of one model (weight averaging).

The paper averages the last checkpoints of a distillation run before quantizing and measures how
much of the quantization gap that closes (RTN up to 10%, GPTQ ≈2%, QAD ≈0%). Inputs are model
directories holding ``model*.safetensors`` and ``config.json`` (a finished distill / sft output),
or the trainer's ``checkpoints/step-N`` directories (``config.json`` + the sharded DCP checkpoint,
whose model weights are read into one state dict here). The output is a plain
Hugging Face model directory (the first input's config.json, the averaged weights in their own
dtype, averaged in fp32; tokenizer files from the first input that has them, or from the run
directory of a checkpoint).

Tied embeddings: the trainer's checkpoints store ``lm_head.weight`` beside the embedding, a final
``save_pretrained`` does not; the tied copy is dropped everywhere. Anything else that differs in
names, shapes or architecture is refused, and so are quantized models (an average of grid values
is not on the grid).

What this module does not do: pick checkpoints (the caller names them) or weight them unequally.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from famex.config import add_config_arguments, resolve_config
from famex.errors import FamexError
from famex.stage import Stage
from famex.utils import make_shareable, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
# config.json keys that may differ between checkpoints of one model without changing its architecture
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


@dataclass
class AverageConfig:
    checkpoints: list[str] = field(default_factory=list)
    """Model or checkpoint directories to average with equal weights (e.g. RUN/checkpoints/step-* and RUN)."""
    out: str = ""
    """Output model directory (plus meta.json and metrics.json)."""

    def validate(self) -> None:
        if len(self.checkpoints) < 2:
            raise FamexError("famex average needs at least two checkpoint directories")
        if not self.out:
            raise FamexError("--out DIR is required")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, AverageConfig, positional=("checkpoints",))


def main(args: argparse.Namespace) -> int:
    average(resolve_config(AverageConfig, args))
    return 0


def _check_input(path: Path) -> None:
    if not path.is_dir():
        raise FamexError(f"checkpoint not found: {path}")
    if not (path / "config.json").is_file() or not (any(path.glob("model*.safetensors")) or _is_trainer_checkpoint(path)):
        raise FamexError(f"{path} is not a model or checkpoint directory (needs config.json and model*.safetensors, "
                         "or a trainer checkpoint's DCP files)")
    if (path / "quantization.json").is_file() or read_json(path / "config.json").get("famex_quantization"):
        raise FamexError(f"{path} is quantized: average the unquantized checkpoints, then quantize the average")


def _is_trainer_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()  # torch.distributed.checkpoint's index


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if _is_trainer_checkpoint(path) and not any(path.glob("model*.safetensors")):
        from famex.distill.trainer import checkpoint_weights

        return checkpoint_weights(path)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def average_state_dicts(states: list[dict[str, torch.Tensor]], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys and shapes (fp32 sums, each tensor's own dtype back)."""
    names = names or [f"#{i}" for i in range(len(states))]
    keys = set(states[0])
    for state, name in zip(states[1:], names[1:]):
        if set(state) != keys:
            diff = sorted(keys ^ set(state))
            raise FamexError(f"{name} and {names[0]} hold different tensors ({diff[:3]}...): not checkpoints of one model")
    out = {}
    for key in sorted(keys):
        first = states[0][key]
        for state, name in zip(states[1:], names[1:]):
            if state[key].shape != first.shape:
                raise FamexError(f"{key}: shape {tuple(state[key].shape)} in {name}, {tuple(first.shape)} in {names[0]}")
        if not first.is_floating_point():
            out[key] = first.clone()  # integer buffers (none in these models) are not averaged
            continue
        total = torch.zeros(first.shape, dtype=torch.float32)
        for state in states:
            total += state[key].float()
        out[key] = (total / len(states)).to(first.dtype)
    return out


def _tokenizer_source(paths: list[Path]) -> Path | None:
    for p in paths:
        for candidate in (p, p.parent.parent):  # a checkpoints/step-N directory: its run directory
            if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer_config.json").is_file():
                return candidate
    return None


def average(cfg: AverageConfig) -> Path:
    """Run the `famex average` stage; returns the output model directory."""
    paths = [Path(p) for p in cfg.checkpoints]
    for p in paths:
        _check_input(p)
    configs = [read_json(p / "config.json") for p in paths]
    plain = [{k: v for k, v in c.items() if k not in _CONFIG_NOISE} for c in configs]
    for p, c in zip(paths[1:], plain[1:]):
        if c != plain[0]:
            diff = sorted(k for k in set(c) | set(plain[0]) if c.get(k) != plain[0].get(k))
            raise FamexError(f"{p} and {paths[0]} have different configs ({diff}): average checkpoints of one model")
    out = Path(cfg.out)
    inputs = {f"checkpoint{i}": str(p) for i, p in enumerate(paths)}
    stage = Stage(out, "average", cfg, inputs)
    if stage.begin():
        return out
    try:
        states = [_weights(p) for p in paths]
        if configs[0].get("tie_word_embeddings"):
            for s in states:
                s.pop("lm_head.weight", None)
        averaged = average_state_dicts(states, [str(p) for p in paths])
        tmp = out / ".average.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(averaged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        make_shareable(tmp / "model.safetensors")
        shutil.copy2(paths[0] / "config.json", tmp / "config.json")
        tok = _tokenizer_source(paths)
        if tok is not None:
            for name in TOKENIZER_FILES:
                if (tok / name).is_file():
                    shutil.copy2(tok / name, tmp / name)
        for f in sorted(tmp.iterdir()):
            f.replace(out / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        stage.finish({"checkpoints": len(paths), "params": sum(t.numel() for t in averaged.values())})
    except BaseException as e:
        stage.fail(e)
        raise
    return out


CONFIG = AverageConfig
run = average
