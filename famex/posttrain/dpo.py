"""`famex dpo`: direct preference optimization (Rafailov et al., 2023) against a frozen reference.

Records hold ``prompt`` (a string or a messages list ending with a user turn), ``chosen`` and
``rejected`` (`famex.data.chat.read_preferences`); each answer is rendered after the prompt with the
model's chat template, and its log-probability is the sum over the answer's tokens (the final
assistant turn, its end-of-turn token included). Pairs go to the val split by a hash of the record
(``--val-fraction``), like documents in `famex data`.

"Simplified DPO", as this implementation means it:
- offline: the reference model is not kept beside the policy; its log-probabilities of every chosen
  and rejected answer are computed once before training and cached in the stage directory
  (``reference.safetensors``, its sha256 and what it was computed from in ``reference.json``);
  a rerun or a resumed run reads them back after checking both;
- the plain sigmoid loss with one β: no label smoothing, no IPO / robust variants, no SFT term, no
  length normalisation; the reference is the starting model unless ``--ref`` names another;
- fixed pairs, one pass per epoch in a seeded order; no on-policy sampling.

Training is the shared loop (`famex.distill.trainer`) with a `DpoTask` whose ``count`` is pairs: the
step's gradient is that of the mean loss over the global batch of pairs. In log.jsonl, ``loss`` is
the DPO loss, ``ce`` the chosen answers' mean per-token NLL under the policy (watch it for
chosen-likelihood collapse), ``kl`` is 0 and ``tokens_per_s`` counts pairs; validation adds
``val_dpo_loss``, ``val_accuracy`` (chosen reward > rejected reward), ``val_margin`` (mean reward
margin), the rewards and ``val_chosen_nll`` (``--eval-chunks`` limits the held-out *pairs* here).

What this module does not do: the maths (`famex.posttrain.losses`) or the chat rendering
(`famex.data.chat`).
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from famex.config import add_config_arguments, compose, resolve_config
from famex.data.chat import ChatEncoder, PreferencePair, json_key, read_preferences, truncate
from famex.data.sources import expand_inputs
from famex.distill.losses import LossOut
from famex.distill.trainer import begin_on_ranks, setup_distributed, stage_on_ranks, train
from famex.errors import FamexError
from famex.posttrain.losses import IGNORE_INDEX, dpo_loss, sequence_logps
from famex.stage import Stage, content_hash, require_complete
from famex.train_options import TRAIN_IDENTITY_EXCLUDE, TrainOptions
from famex.utils import atomic_write_bytes, atomic_write_json, log, progress, read_json, sha256_bytes, sha256_file

REFERENCE_FILE = "reference.safetensors"
REFERENCE_INFO = "reference.json"


@dataclass
@compose(TrainOptions, global_batch=32, micro_batch=4, lr=5e-7, optimizer="adamw", weight_decay=0.0, schedule="cosine",
         warmup_fraction=0.1, notes={
             "micro_batch": "each pair is two sequences",
             "lr": "DPO's usual value; small demo models need more",
             "weight_decay": "none: the reference already anchors the policy",
             "iters": "default: --epochs passes over the training pairs",
         })
class DpoConfig:
    out: str = ""
    """Output directory: the trained Hugging Face model, the cached reference log-probabilities, checkpoints/, log.jsonl, meta.json, metrics.json."""
    seed: int = 0
    """Seed of the order in which each epoch visits the training pairs."""
    model: str = ""
    """The policy's starting point: a model directory with a chat template (usually a famex sft output)."""
    data: list[str] = field(default_factory=list)
    """Preference records (JSONL / Parquet: prompt, chosen, rejected), or a famex data --demo-chat directory (its prefs)."""
    ref: str = ""
    """The frozen reference model (default: --model itself, as in the DPO paper)."""
    beta: float = 0.1
    """DPO β: the strength of the implicit KL penalty to the reference."""
    seq_len: int = 512
    """Longest prompt + answer in tokens; longer pairs keep their first seq_len tokens (counted and logged)."""
    val_fraction: float = 0.1
    """Fraction of pairs held out for validation, chosen by a hash of each record."""
    epochs: float = 1.0
    """Passes over the training pairs, when --iters is not given."""

    def validate(self) -> None:
        if not self.out:
            raise FamexError("--out DIR is required")
        if not self.model:
            raise FamexError("--model DIR is required (the policy to train, e.g. a famex sft output)")
        if not self.data:
            raise FamexError("--data PREFS.jsonl... is required (records with prompt, chosen, rejected)")
        if not self.beta > 0:
            raise FamexError(f"--beta must be > 0, not {self.beta}")
        if not 0 <= self.val_fraction < 1:
            raise FamexError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.seq_len < 2:
            raise FamexError("--seq-len must be at least 2")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DpoConfig)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(DpoConfig, args)
    dpo(cfg)
    return 0


# ---------------------------------------------------------------- pairs


@dataclass
class EncodedPair:
    """A pair as token ids and answer masks (1 = token of the final answer)."""

    chosen: np.ndarray
    chosen_mask: np.ndarray
    rejected: np.ndarray
    rejected_mask: np.ndarray
    val: bool


def preference_paths(items: Sequence[str]) -> list[Path]:
    """Preference files named by ``items``; a famex data --demo-chat directory stands for its prefs.jsonl."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and (path / "meta.json").is_file():
            meta = require_complete(path, "data", "data directory")
            prefs = (meta.get("demo_chat") or {}).get("prefs")
            if not prefs:
                raise FamexError(f"{path} is a data directory without preference pairs — pass a preference JSONL file "
                                 "(records with prompt, chosen, rejected) or a famex data --demo-chat directory")
            paths.append(path / prefs)
        else:
            paths.extend(expand_inputs([item], "chat"))
    return paths


def encode_pairs(encoder: ChatEncoder, pairs: Sequence[PreferencePair], seq_len: int,
                 val_fraction: float) -> tuple[list[EncodedPair], dict[str, int]]:
    """Tokenize every pair (truncated by rule: the first ``seq_len`` tokens); returns pairs and counts."""
    from famex.data.prepare import is_val

    out: list[EncodedPair] = []
    counts = {"pairs": len(pairs), "truncated": 0, "dropped": 0}
    for p in pairs:
        seqs = []
        for which in ("chosen", "rejected"):
            try:
                ids, mask = encoder(p.conversation(which), only_last=True)
            except FamexError as e:
                raise FamexError(f"{p.where}: {e}") from None
            ids, mask, cut = truncate(ids, mask, seq_len)
            seqs.append((ids, mask, cut))
        if any(cut for _, _, cut in seqs):
            counts["truncated"] += 1
        if any(not mask.any() for _, mask, _ in seqs):
            counts["dropped"] += 1
            continue
        key = json_key({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
        out.append(EncodedPair(seqs[0][0], seqs[0][1], seqs[1][0], seqs[1][1], is_val(key, val_fraction)))
    return out, counts


def pair_batch(pairs: Sequence[EncodedPair], pad_id: int, ref: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Rows ``[chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}]``, right-padded, labels on answer tokens only."""
    rows = [(p.chosen, p.chosen_mask) for p in pairs] + [(p.rejected, p.rejected_mask) for p in pairs]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids)
        t = torch.from_numpy(ids.astype(np.int64))
        input_ids[r, :n] = t
        attention[r, :n] = 1
        # Position t predicts token t + 1: label it when token t + 1 belongs to the answer.
        keep = torch.from_numpy(mask[1:].astype(bool))
        labels[r, : n - 1] = torch.where(keep, t[1:], IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if ref is not None:
        batch["ref_logps"] = ref
    return batch


def answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the answer tokens' log-probabilities of every row of a `pair_batch`, and their counts."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = model.get_output_embeddings()
    return sequence_logps(hidden, head.weight, batch["labels"], bias=getattr(head, "bias", None), chunk_tokens=chunk_tokens)


# ---------------------------------------------------------------- the task


class DpoTask:
    """Micro-batches of preference pairs in a seeded order per epoch, and the DPO loss."""

    def __init__(self, train_pairs: list[EncodedPair], ref_train: torch.Tensor, *, beta: float, pad_id: int, seed: int = 0,
                 val_pairs: list[EncodedPair] | None = None, ref_val: torch.Tensor | None = None):
        if not train_pairs:
            raise FamexError("no training pairs — every pair went to the val split or was dropped; lower --val-fraction")
        self.pairs, self.ref = train_pairs, ref_train
        self.val_pairs, self.ref_val = val_pairs or [], ref_val
        self.beta, self.pad_id, self.seed = beta, pad_id, seed
        self._orders: dict[int, np.ndarray] = {}

    def _pair(self, index: int) -> int:
        epoch, pos = divmod(index, len(self.pairs))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return int(self._orders[epoch][pos])

    def micro_batches(self, step: int, rank: int, world: int, micro_batch: int, accum: int) -> list[dict[str, Any]]:
        base = step * world * micro_batch * accum
        out = []
        for a in range(accum):
            idx = [self._pair(base + (a * world + rank) * micro_batch + j) for j in range(micro_batch)]
            out.append(pair_batch([self.pairs[i] for i in idx], self.pad_id, self.ref[idx]))
        return out

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["ref_logps"].shape[0])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], chunk_tokens: int) -> LossOut:
        logps, counts = answer_logps(model, batch, chunk_tokens)
        ref = batch["ref_logps"].to(logps.dtype)
        P = ref.shape[0]
        out = dpo_loss(logps[:P], logps[P:], ref[:, 0], ref[:, 1], self.beta)
        loss_sum = out.losses.sum()
        nll_sum = (-logps[:P].detach() / counts[:P].clamp_min(1)).sum()
        zero = torch.zeros((), dtype=loss_sum.dtype, device=loss_sum.device)
        n = torch.tensor(P, device=loss_sum.device)
        return LossOut(loss=loss_sum / P, loss_sum=loss_sum, kl_sum=zero, ce_sum=nll_sum, count=n, kl=zero, ce=nll_sum / P)

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, rank: int, world: int, max_chunks: int) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        return validate_pairs(model, self.val_pairs, self.ref_val, self.beta, self.pad_id, rank, world,
                              max_pairs=max_chunks)


@torch.no_grad()
def validate_pairs(model, pairs: list[EncodedPair], ref: torch.Tensor, beta: float, pad_id: int, rank: int = 0,
                   world: int = 1, max_pairs: int = 0, micro_batch: int = 4) -> dict[str, float]:
    """Mean DPO loss, reward accuracy, reward margin and chosen NLL over held-out pairs (all ranks)."""
    from famex.distill.trainer import Dist, all_reduce_sum, rank_batches

    n = len(pairs) if not max_pairs else min(max_pairs, len(pairs))
    device = next(model.parameters()).device
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    for idx, counted in rank_batches(n, rank, world, micro_batch):
        batch = {k: v.to(device) for k, v in pair_batch([pairs[j] for j in idx], pad_id, ref[idx]).items()}
        logps, counts = answer_logps(model, batch)
        P = len(idx)
        r = batch["ref_logps"].to(logps.dtype)
        out = dpo_loss(logps[:P], logps[P:], r[:, 0], r[:, 1], beta)
        if not counted:
            continue
        sums += torch.stack([
            out.losses.sum().double(), (out.margins > 0).sum().double(), out.margins.sum().double(),
            out.chosen_rewards.sum().double(), out.rejected_rewards.sum().double(),
            (-logps[:P] / counts[:P].clamp_min(1)).sum().double(), torch.tensor(float(P), device=device, dtype=torch.float64),
        ])
    if world > 1:
        sums = all_reduce_sum(sums, Dist(rank, world, device=device))
    s = sums.tolist()
    count = max(s[6], 1.0)
    return {"dpo_loss": s[0] / count, "accuracy": s[1] / count, "margin": s[2] / count, "chosen_reward": s[3] / count,
            "rejected_reward": s[4] / count, "chosen_nll": s[5] / count, "pairs": int(s[6])}


# ---------------------------------------------------------------- the reference


@torch.no_grad()
def compute_reference(model, pairs: Sequence[EncodedPair], pad_id: int, micro_batch: int = 4,
                      desc: str = "reference") -> torch.Tensor:
    """``[P, 2]`` float32: the model's log-probabilities of each pair's chosen and rejected answers."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    device = next(model.parameters()).device
    bar = progress(total=len(pairs), desc=desc, unit="pair")
    for i in range(0, len(pairs), micro_batch):
        chunk = pairs[i: i + micro_batch]
        batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
        logps, _ = answer_logps(model, batch)
        P = len(chunk)
        out[i: i + P, 0], out[i: i + P, 1] = logps[:P].cpu(), logps[P:].cpu()
        bar.update(P)
    bar.close()
    model.train(was_training)
    return out


def pairs_hash(pairs: Sequence[EncodedPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for arr in (p.chosen, p.chosen_mask, p.rejected, p.rejected_mask):
            h.update(np.ascontiguousarray(arr).tobytes())
            h.update(b"|")
        h.update(b"v" if p.val else b"t")
    return h.hexdigest()


def cached_reference(out: Path, ref_spec: str, pairs: Sequence[EncodedPair], pad_id: int, micro_batch: int,
                     device: torch.device) -> torch.Tensor:
    """The reference log-probabilities of ``pairs``: read from ``out`` when present and verified, else computed and written."""
    from safetensors.torch import load, save

    key = sha256_bytes(f"{content_hash(ref_spec)}|{pairs_hash(pairs)}".encode())
    path, info_path = out / REFERENCE_FILE, out / REFERENCE_INFO
    if path.is_file() and info_path.is_file():
        info = read_json(info_path)
        if info.get("key") == key and sha256_file(path) == info.get("sha256"):
            return load(path.read_bytes())["logps"]
        log(f"famex dpo: {path} does not match the reference and pairs (or is corrupt); recomputing it")
    from famex.models import load_model

    model = load_model(ref_spec).to(device)
    logps = compute_reference(model, pairs, pad_id, micro_batch)
    del model
    blob = save({"logps": logps.contiguous()})
    atomic_write_bytes(path, blob)
    atomic_write_json(info_path, {"key": key, "sha256": sha256_bytes(blob), "reference": str(ref_spec), "pairs": len(pairs)})
    return logps


# ---------------------------------------------------------------- the stage


def dpo(cfg: DpoConfig) -> Path:
    """Run the `famex dpo` stage; returns the output (model) directory."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from famex.models import load_model, save_model

    d = setup_distributed(cfg.device)
    out = Path(cfg.out)
    paths = preference_paths(cfg.data)
    for spec, what in ((cfg.model, "--model"), (cfg.ref or cfg.model, "--ref")):
        if not (Path(spec) / "config.json").is_file():
            raise FamexError(f"{what} {spec} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise FamexError(f"{cfg.model} has no usable tokenizer ({e}); DPO renders pairs with the model's chat template") from None
    encoder = ChatEncoder(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs, counts = encode_pairs(encoder, list(read_preferences(paths)), cfg.seq_len, cfg.val_fraction)
    train_pairs = [p for p in pairs if not p.val]
    val_pairs = [p for p in pairs if p.val]
    if counts["truncated"] or counts["dropped"]:
        log(f"famex dpo: {counts['truncated']} pairs longer than seq_len {cfg.seq_len} kept their first {cfg.seq_len} tokens; "
            f"{counts['dropped']} dropped because an answer had no token left")
    global_batch = int(cfg.global_batch or 32)
    iters = int(cfg.iters or max(1, math.ceil(cfg.epochs * len(train_pairs) / global_batch)))
    lr = float(cfg.lr or 5e-7)
    inputs: dict[str, Any] = {"model": cfg.model, "ref": cfg.ref or None}
    inputs.update({f"data{i}": p for i, p in enumerate(paths)})
    stage = Stage(out, "dpo", cfg, inputs, identity_exclude=TRAIN_IDENTITY_EXCLUDE)
    extra = {"iters": iters, "lr": lr, "global_batch": global_batch, "pairs": {**counts, "train": len(train_pairs),
                                                                               "val": len(val_pairs)}}
    done = begin_on_ranks(stage, d, extra)
    if done:
        return out
    with stage_on_ranks(stage, d) as finish:
        ordered = train_pairs + val_pairs
        if d.main:
            ref = cached_reference(out, cfg.ref or cfg.model, ordered, pad_id, cfg.micro_batch, d.device)
        if d.world > 1:
            dist.barrier()
        if not d.main:
            ref = cached_reference(out, cfg.ref or cfg.model, ordered, pad_id, cfg.micro_batch, d.device)
        ref_train, ref_val = ref[: len(train_pairs)], ref[len(train_pairs):]
        if d.main:
            stage.update(reference=read_json(out / REFERENCE_INFO))
            log(f"famex dpo: {len(train_pairs)} training pairs, {len(val_pairs)} held out; {iters} steps of {global_batch} "
                f"pairs at lr {lr:g}, beta {cfg.beta:g}")
        model = load_model(cfg.model)
        if model.config.vocab_size < len(tokenizer):
            raise FamexError(f"{cfg.model}: its tokenizer has {len(tokenizer)} tokens, the model only {model.config.vocab_size}")
        model.train()
        task = DpoTask(train_pairs, ref_train, beta=cfg.beta, pad_id=pad_id, seed=cfg.seed, val_pairs=val_pairs, ref_val=ref_val)
        mean_tokens = sum(len(p.chosen) + len(p.rejected) for p in train_pairs) / len(train_pairs)
        result = train(model, task, cfg, iters=iters, lr=lr, global_batch=global_batch, d=d,
                       tokens_per_sequence=max(1, round(mean_tokens)), save_model=save_model)
        if d.main:
            save_model(result.model, out, tokenizer)
            metrics = dict(result.metrics)
            metrics.update(pairs_train=len(train_pairs), pairs_val=len(val_pairs), pairs_truncated=counts["truncated"],
                           pairs_dropped=counts["dropped"], beta=cfg.beta)
            finish(metrics)
    return out


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = DpoConfig
run = dpo
