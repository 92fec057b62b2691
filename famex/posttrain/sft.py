"""`famex sft`: supervised fine-tuning of a model on chat data, loss on assistant tokens only.

The data is a chat data directory (`famex data --chat` / ``--demo-chat``): conversations rendered
with the tokenizer's chat template, one per document, never straddling a chunk, with labels only on
assistant tokens (`famex.data.packing`). Training is the shared loop (`famex.distill.trainer`:
accumulation, torchrun, checkpoints, exact resume, log.jsonl, validation), with the distillation
task of `famex distill`: CE on assistant tokens, plus — when ``--logits`` names a store an instruct
teacher wrote over this chat data (`famex logits --teacher INSTRUCT --data CHAT_DATA`) —
``kl_weight · KL(teacher ‖ student)`` on the same tokens.

Defaults (the paper gives the recipe, not every number): AdamW with a cosine schedule and 3% warm-up;
``--lr`` defaults to the distilled student's post-annealing LR, read from the distill run's
meta.json: ``lr × min_lr_ratio`` when that is > 0, else a tenth of its peak LR (famex's WSD anneals
to 0 by default, and 0 cannot be trained with); a model that is not a famex distill output needs
``--lr``. ``--iters`` defaults to ``--epochs`` passes over the train split.

The output is a plain Hugging Face model directory with the data's tokenizer (chat template
included), plus checkpoints/, log.jsonl, meta.json and metrics.json (``val_loss`` = CE on the val
split's assistant tokens).

What this module does not do: render chat records (`famex data --chat`) or run DPO (`famex dpo`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from famex.config import add_config_arguments, compose, resolve_config
from famex.data.packing import PackedChunks
from famex.distill.train import DistillTask, open_store
from famex.distill.trainer import begin_on_ranks, setup_distributed, stage_on_ranks, train
from famex.errors import FamexError
from famex.stage import Stage, read_meta, require_complete
from famex.train_options import TRAIN_IDENTITY_EXCLUDE, DistillOptions, TrainOptions
from famex.utils import log


@dataclass
@compose(TrainOptions, optimizer="adamw", schedule="cosine", warmup_fraction=0.03, global_batch=64, notes={
    "lr": "default: the distill run's post-annealing LR, lr × min_lr_ratio, or a tenth of its peak LR when that is 0",
    "iters": "default: --epochs passes over the train split",
})
@compose(DistillOptions, notes={
    "logits": "optional: an instruct teacher's store over this chat data adds the KL term; '' or 'none' = CE alone",
    "kl_weight": "with --logits", "temperature": "with --logits", "tail": "with --logits",
})
class SftConfig:
    out: str = ""
    """Output directory: the fine-tuned Hugging Face model, checkpoints/, log.jsonl, meta.json, metrics.json."""
    seed: int = 0
    """Seed of the chunk order when no logit store fixes it."""
    model: str = ""
    """The model to fine-tune: a model directory (a distilled student, or any causal LM with the data's tokenizer)."""
    data: str = ""
    """A chat data directory (famex data --chat or --demo-chat): the train split is trained on, the val split validates."""
    epochs: float = 1.0
    """Passes over the train split, when --iters is not given."""

    def validate(self) -> None:
        if not self.out:
            raise FamexError("--out DIR is required")
        if not self.model:
            raise FamexError("--model DIR is required (the model to fine-tune, e.g. a famex distill output)")
        if not self.data:
            raise FamexError("--data CHAT_DATA_DIR is required (made by famex data --chat)")
        if not self.epochs > 0:
            raise FamexError(f"--epochs must be > 0, not {self.epochs}")

    @property
    def store(self) -> str | None:
        return None if self.logits in ("", "none") else self.logits


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SftConfig)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(SftConfig, args)
    sft(cfg)
    return 0


def default_lr(model_dir: str | Path) -> tuple[float, str]:
    """The post-annealing learning rate of the distill run that made ``model_dir``, and where it came from."""
    meta = read_meta(model_dir) if Path(model_dir).is_dir() else None
    if not meta or meta.get("stage") != "distill":
        raise FamexError(
            f"--lr is required: {model_dir} is not a famex distill output, so the student's post-annealing LR is unknown"
        )
    peak = float(meta.get("lr") or meta["config"]["lr"])
    ratio = float(meta["config"].get("min_lr_ratio") or 0.0)
    if ratio > 0:
        return peak * ratio, f"the distill run's post-annealing LR ({peak:g} × min_lr_ratio {ratio:g})"
    return peak / 10, f"a tenth of the distill run's peak LR {peak:g} (it annealed to 0)"


def require_chat_data(chunks: PackedChunks) -> None:
    if not chunks.data.meta.get("chat") or not chunks.data.has_mask:
        raise FamexError(
            f"{chunks.data.dir} is not chat data (no assistant mask): SFT trains on assistant tokens — "
            "make it with famex data --chat --input CHAT.jsonl (or --demo-chat)"
        )


def check_tokenizer(model_dir: str | Path, chunks: PackedChunks) -> None:
    """A model directory's tokenizer (when it has one) must be the data's: students share the teacher's."""
    from famex.data.prepare import tokenizer_hash

    path = Path(model_dir)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return
    from transformers import AutoTokenizer

    if tokenizer_hash(AutoTokenizer.from_pretrained(path)) != chunks.tokenizer_hash:
        raise FamexError(f"{model_dir} has another tokenizer than the data {chunks.data.dir} — "
                         "make the chat data with the model's tokenizer (famex data --chat --tokenizer MODEL_DIR)")


def sft(cfg: SftConfig) -> Path:
    """Run the `famex sft` stage; returns the output (model) directory."""
    from famex.models import build_student, save_model

    d = setup_distributed(cfg.device)
    out = Path(cfg.out)
    require_complete(cfg.data, "data", "chat data directory")
    chunks = PackedChunks(cfg.data, "train")
    require_chat_data(chunks)
    if not Path(cfg.model).is_dir():
        raise FamexError(f"model not found: {cfg.model} — pass a model directory (e.g. a famex distill output)")
    check_tokenizer(cfg.model, chunks)
    val_meta = chunks.data.meta["splits"].get("val")
    val = PackedChunks(cfg.data, "val") if val_meta and val_meta["tokens"] > chunks.seq_len else None
    store = open_store(cfg.store, chunks, "logit store") if cfg.store else None
    val_store = open_store(cfg.val_logits, val, "validation logit store") if (cfg.val_logits and val) else None
    if cfg.lr:
        lr, lr_source = float(cfg.lr), "--lr"
    else:
        lr, lr_source = default_lr(cfg.model)
    global_batch = int(cfg.global_batch or 64)
    iters = int(cfg.iters or max(1, math.ceil(cfg.epochs * len(chunks) / global_batch)))
    inputs = {"model": cfg.model, "data": cfg.data, "logits": cfg.store, "val_logits": cfg.val_logits or None}
    stage = Stage(out, "sft", cfg, inputs, identity_exclude=TRAIN_IDENTITY_EXCLUDE)
    extra = {"iters": iters, "lr": lr, "lr_source": lr_source, "global_batch": global_batch}
    done = begin_on_ranks(stage, d, extra)
    if done:
        return out
    with stage_on_ranks(stage, d) as finish:
        if d.main:
            log(f"famex sft: {iters} steps of {global_batch} × {chunks.seq_len} tokens at lr {lr:g} ({lr_source})")
        model = build_student(cfg.model, chunks.vocab_size)
        task = DistillTask(chunks, store, seed=cfg.seed, kl_weight=cfg.kl_weight if store is not None else 0.0,
                           temperature=cfg.temperature, tail=cfg.tail, val_chunks=val, val_store=val_store)
        result = train(model, task, cfg, iters=iters, lr=lr, global_batch=global_batch, d=d,
                       tokens_per_sequence=chunks.seq_len, save_model=save_model)
        if d.main:
            save_model(result.model, out, Path(cfg.data) / "tokenizer")
            metrics = dict(result.metrics)
            metrics["objective"] = "sft+kd" if store is not None else "sft"
            metrics["assistant_tokens_train"] = _assistant_tokens(cfg.data)
            finish(metrics)
    return out


def _assistant_tokens(data_dir: str) -> int | None:
    from famex.utils import read_json

    path = Path(data_dir) / "metrics.json"
    return read_json(path).get("chat_assistant_tokens_train") if path.is_file() else None


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = SftConfig
run = sft
