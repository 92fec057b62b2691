"""`famex info`: shape and size of a preset or a model, counted on the meta device."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from famex.config import add_config_arguments, resolve_config
from famex.errors import FamexError
from famex.models import PRESETS, get_preset, load_tokenizer, model_info


@dataclass
class InfoConfig:
    preset: str = ""
    """A student preset name (see --list)."""
    model: str = ""
    """A model directory, a GGUF file, or 'default' (the offline teacher)."""
    vocab_size: int | None = None
    """Vocabulary for a preset (default: the real family's 131072, or the --tokenizer's)."""
    tokenizer: str = ""
    """Take the vocabulary for a preset from this tokenizer (model dir, GGUF or 'default')."""
    json: bool = False
    """Print JSON instead of a table."""
    list: bool = False
    """List the presets and exit."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, InfoConfig)


def info(cfg: InfoConfig) -> dict:
    if bool(cfg.preset) == bool(cfg.model):
        raise FamexError("give exactly one of --preset NAME or --model DIR")
    if cfg.preset:
        get_preset(cfg.preset)
        vocab = cfg.vocab_size
        if vocab is None and cfg.tokenizer:
            vocab = len(load_tokenizer(cfg.tokenizer))
        out = {"preset": cfg.preset, **model_info(cfg.preset, vocab_size=vocab)}
        p = PRESETS[cfg.preset]
        out.update({k: getattr(p, k) for k in ("lr", "global_batch", "iters") if getattr(p, k) is not None})
        return out
    return {"model": cfg.model, **model_info(cfg.model)}


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(InfoConfig, args)
    if cfg.list:
        for name, p in PRESETS.items():
            print(f"{name:<20} layers={p.layers:<3} d_model={p.d_model:<5} mlp={p.mlp:<6} heads={p.heads}/{p.kv_heads} "
                  f"tied={'yes' if p.tied else 'no':<3} {p.description}")
        return 0
    result = info(cfg)
    if cfg.json:
        print(json.dumps(result, indent=2))
    else:
        name = result.get("preset") or result.get("model")
        print(f"{name}")
        for key, value in result.items():
            if key in ("preset", "model"):
                continue
            if isinstance(value, int) and key.startswith(("params", "bytes")):
                value = f"{value:,} ({value / 1e9:.3f}B)" if key.startswith("params") else f"{value:,} ({value / 2**30:.2f} GiB)"
            print(f"  {key:<22} {value}")
    return 0
