"""`famex distill`: pre-train a student by distillation from the sparse teacher-logit store.

The student (a preset, initialised from ``--seed``, or a model directory) is trained on the packed
chunks of a `famex data` directory with ``kl_weight · KL(teacher top-k ‖ student) +
(1 − kl_weight) · CE``; ``--logits none`` trains with CE alone (the baseline distillation must
beat). With a store, chunks are visited in the store's order, so the store is read sequentially;
every chunk's tokens are checked against the store's record of the tokens the teacher saw.

The output directory is a plain Hugging Face model once the stage is complete (config.json,
model.safetensors, tokenizer), plus checkpoints/, log.jsonl, meta.json and metrics.json.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from famex.config import add_config_arguments, compose, resolve_config
from famex.data.packing import IGNORE_INDEX, ChunkOrder, PackedChunks, collate, model_inputs
from famex.distill.losses import LossOut, distill_loss
from famex.distill.trainer import begin_on_ranks, setup_distributed, stage_on_ranks, train
from famex.errors import FamexError
from famex.stage import Stage, require_complete, same_content
from famex.train_options import TRAIN_IDENTITY_EXCLUDE, DistillOptions, TrainOptions

PRESET_DEFAULT = "default: the preset's paper value, else required"


# The paper's pre-training recipe is TrainOptions' own defaults (AdEMAMix + WSD); a paper preset
# gives iters, lr and global batch (famex.models.presets).
@dataclass
@compose(TrainOptions, notes={"global_batch": PRESET_DEFAULT, "iters": PRESET_DEFAULT, "lr": PRESET_DEFAULT})
@compose(DistillOptions, notes={"logits": "required; 'none' trains with CE alone, the baseline distillation must beat"})
class DistillConfig:
    out: str = ""
    """Output directory: the final Hugging Face model, checkpoints/, log.jsonl, meta.json, metrics.json."""
    seed: int = 0
    """Seed of the student's initialisation and of the chunk order when no logit store fixes it."""
    order_seed: int | None = None
    """CE only (--logits none): seed of the chunk order instead of --seed; give a KD twin's store seed (famex logits
    --seed) and both see the same chunks in the same order (famex run does this for objective = "ce")."""
    student: str = ""
    """A student preset (famex info --list) or a model directory to continue training."""
    data: str = ""
    """A `famex data` directory (its train split is trained on, its val split validates)."""

    def validate(self) -> None:
        if not self.out:
            raise FamexError("--out DIR is required")
        if not self.student:
            raise FamexError("--student PRESET_OR_DIR is required (famex info --list shows the presets)")
        if not self.data:
            raise FamexError("--data DATA_DIR is required (made by famex data)")
        if not self.logits:
            raise FamexError("--logits STORE_DIR is required; pass --logits none to train with CE only")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DistillConfig)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(DistillConfig, args)
    distill(cfg)
    return 0


# ---------------------------------------------------------------- the task


def open_store(path: str, chunks: PackedChunks, what: str):
    """Open a logit store and check it belongs to these chunks (vocabulary, tokenizer, data, seq_len)."""
    from famex.teacher.store import LogitStore

    store = LogitStore(path)
    m = store.manifest
    if store.vocab_size != chunks.vocab_size:
        raise FamexError(
            f"vocab size mismatch: {what} {path} has {store.vocab_size}, data {chunks.data.dir} has {chunks.vocab_size} — "
            "the store and the data must come from the same tokenizer"
        )
    if m.get("tokenizer_hash") and m["tokenizer_hash"] != chunks.tokenizer_hash:
        raise FamexError(f"{what} {path} was made with another tokenizer than {chunks.data.dir}; regenerate it with famex logits")
    if store.seq_len != chunks.seq_len:
        raise FamexError(f"{what} {path} holds chunks of {store.seq_len} tokens, the data's are {chunks.seq_len}")
    if m.get("split") and m["split"] != chunks.split:
        raise FamexError(f"{what} {path} covers the {m['split']!r} split, expected {chunks.split!r}")
    data_hash = m.get("data_hash")
    if data_hash and not same_content(data_hash, chunks.data.dir):
        raise FamexError(
            f"{what} {path} was made from another data directory than {chunks.data.dir} (hash differs) — "
            "regenerate the store from this data, or pass the data it was made from"
        )
    if len(store) != len(chunks):
        raise FamexError(f"{what} {path} holds {len(store)} chunks, the {chunks.split} split has {len(chunks)}")
    return store


class DistillTask:
    """Micro-batches of packed chunks (+ teacher top-k) in a fixed order, and the distillation loss."""

    def __init__(self, chunks: PackedChunks, store=None, *, seed: int = 0, kl_weight: float = 0.9,
                 temperature: float = 1.0, tail: str = "renormalize", val_chunks: PackedChunks | None = None,
                 val_store=None):
        self.chunks, self.store = chunks, store
        self.order = None if store is not None else ChunkOrder(len(chunks), seed)
        self.kl_weight, self.temperature, self.tail = kl_weight, temperature, tail
        self.val_chunks, self.val_store = val_chunks, val_store
        if len(chunks) == 0:
            raise FamexError(f"{chunks.data.dir}: the {chunks.split} split holds no complete chunk of {chunks.seq_len} tokens")

    # -- data
    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """The ``index``-th training sample (wrapping around the split: epochs repeat the order)."""
        pos = index % len(self.chunks)
        if self.store is None:
            return self.chunks[int(self.order[pos])]
        return _with_teacher(self.chunks, self.store, pos)

    def micro_batches(self, step: int, rank: int, world: int, micro_batch: int, accum: int) -> list[dict[str, Any]]:
        base = step * world * micro_batch * accum
        return [
            collate([self.sample(base + (a * world + rank) * micro_batch + j) for j in range(micro_batch)])
            for a in range(accum)
        ]

    # -- loss
    def loss(self, model: torch.nn.Module, batch: dict[str, Any], chunk_tokens: int) -> LossOut:
        return packed_loss(model, batch, chunk_tokens, kl_weight=self.kl_weight, temperature=self.temperature, tail=self.tail)

    # -- validation
    def validate(self, model: torch.nn.Module, rank: int, world: int, max_chunks: int) -> dict[str, float]:
        if self.val_chunks is None or len(self.val_chunks) == 0:
            return {}
        return validate_chunks(model, self.val_chunks, self.val_store, rank, world, max_chunks, temperature=self.temperature,
                               tail=self.tail)


def _with_teacher(chunks: PackedChunks, store, pos: int) -> dict[str, torch.Tensor]:
    sc = store[pos]
    sample = dict(chunks[sc.data_index])
    if not torch.equal(sc.token_ids, sample["input_ids"]):
        raise FamexError(
            f"logit store {store.dir} position {pos} was made from other tokens than data chunk {sc.data_index} of "
            f"{chunks.data.dir} — the store does not belong to this data"
        )
    sample["teacher_ids"], sample["teacher_probs"] = sc.ids, sc.probs
    return sample


def hidden_states(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Final hidden states (after the last norm) of a packed batch, without the lm_head."""
    base = getattr(model, model.base_model_prefix)
    return base(**model_inputs(batch, model.config._attn_implementation or "sdpa")).last_hidden_state


def packed_loss(model, batch, chunk_tokens: int, *, kl_weight: float, temperature: float = 1.0,
                tail: str = "renormalize") -> LossOut:
    head = model.get_output_embeddings()
    return distill_loss(
        hidden_states(model, batch), head.weight, batch["labels"], batch.get("teacher_ids"), batch.get("teacher_probs"),
        kl_weight=kl_weight, temperature=temperature, tail=tail, chunk_tokens=chunk_tokens,
        lm_head_bias=getattr(head, "bias", None),
    )


@torch.no_grad()
def validate_chunks(model, chunks: PackedChunks, store, rank: int, world: int, max_chunks: int = 0, *,
                    temperature: float = 1.0, tail: str = "renormalize", micro_batch: int = 4) -> dict[str, float]:
    """Mean next-token CE over the chunks (and KL to the teacher where a store is given), over all ranks."""
    from famex.distill.trainer import Dist, all_reduce_sum, rank_batches

    n = len(chunks) if not max_chunks else min(max_chunks, len(chunks))
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for idx, counted in rank_batches(n, rank, world, micro_batch):
        samples = [_with_teacher(chunks, store, p) if store is not None else chunks[p] for p in idx]
        batch = {k: v.to(device) for k, v in collate(samples).items()}
        out = packed_loss(model, batch, 1024, kl_weight=0.0 if store is None else 1.0, temperature=temperature, tail=tail)
        if counted:
            sums += torch.stack([out.ce_sum.double(), out.kl_sum.double(), out.count.double()])
    if world > 1:
        sums = all_reduce_sum(sums, Dist(rank, world, device=device))
    count = max(sums[2].item(), 1.0)
    result = {"ce": sums[0].item() / count, "tokens": int(sums[2].item())}
    if store is not None:
        result["kl"] = sums[1].item() / count
    return result


# ---------------------------------------------------------------- the stage


def resolve_schedule(cfg: DistillConfig, student: str) -> tuple[int, float, int]:
    """iters, lr, global batch: explicit values, else the preset's paper values."""
    from famex.models import PRESETS

    preset = PRESETS.get(student)
    iters = cfg.iters or (preset.iters if preset else None)
    lr = cfg.lr or (preset.lr if preset else None)
    batch = cfg.global_batch or (preset.global_batch if preset else None)
    missing = [name for name, v in (("--iters", iters), ("--lr", lr), ("--global-batch", batch)) if not v]
    if missing:
        raise FamexError(f"{' '.join(missing)} required: {student} is not a paper preset with default values")
    return int(iters), float(lr), int(batch)


def distill(cfg: DistillConfig) -> Path:
    """Run the `famex distill` stage; returns the output (model) directory."""
    from famex.models import build_student, save_model

    d = setup_distributed(cfg.device)
    out = Path(cfg.out)
    require_complete(cfg.data, "data", "data directory")
    chunks = PackedChunks(cfg.data, "train")
    val = PackedChunks(cfg.data, "val") if _has_split(chunks, "val") else None
    store = None if cfg.logits == "none" else open_store(cfg.logits, chunks, "logit store")
    val_store = open_store(cfg.val_logits, val, "validation logit store") if (cfg.val_logits and val) else None
    iters, lr, global_batch = resolve_schedule(cfg, cfg.student)
    inputs = {"data": cfg.data, "logits": None if cfg.logits == "none" else cfg.logits, "val_logits": cfg.val_logits or None}
    if Path(cfg.student).exists():
        inputs["student"] = cfg.student
    stage = Stage(out, "distill", cfg, inputs, identity_exclude=TRAIN_IDENTITY_EXCLUDE)
    done = begin_on_ranks(stage, d, {"iters": iters, "lr": lr, "global_batch": global_batch})
    if done:
        return out
    with stage_on_ranks(stage, d) as finish:
        tokenizer_dir = Path(cfg.data) / "tokenizer"
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = build_student(cfg.student, chunks.vocab_size, tokenizer, seed=cfg.seed)
        if model.config.vocab_size != chunks.vocab_size:
            raise FamexError(
                f"vocab size mismatch: student {model.config.vocab_size}, data {chunks.vocab_size} — "
                "students must share the teacher's tokenizer"
            )
        order_seed = cfg.seed if cfg.order_seed is None else cfg.order_seed
        task = DistillTask(chunks, store, seed=order_seed, kl_weight=cfg.kl_weight if store is not None else 0.0,
                           temperature=cfg.temperature, tail=cfg.tail, val_chunks=val, val_store=val_store)
        result = train(model, task, cfg, iters=iters, lr=lr, global_batch=global_batch, d=d,
                       tokens_per_sequence=chunks.seq_len, save_model=save_model)
        if d.main:
            save_model(result.model, out, tokenizer_dir)
            metrics = dict(result.metrics)
            metrics["params"] = sum(p.numel() for p in {id(p): p for p in result.model.parameters()}.values())
            metrics["objective"] = "kd" if store is not None else "ce"
            finish(metrics)
    return out


def _has_split(chunks: PackedChunks, split: str) -> bool:
    s = chunks.data.meta["splits"].get(split)
    return bool(s and s["tokens"] > chunks.seq_len)


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = DistillConfig
run = distill
