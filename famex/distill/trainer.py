"""The training loop shared by `famex distill`, `famex sft` and QAD: one loop, many objectives.

A stage hands `train` a model and a `Task` (where micro-batches come from, what the loss is, how
to validate); the loop does the rest the same way for every stage:

- gradient accumulation to the global batch, normalised by the global number of labelled tokens
  (all-reduced), so 1 rank × 4 micro-batches and 2 ranks × 2 micro-batches take the same step;
- single process, or `torchrun` with DDP (default) or FSDP2 ``fully_shard`` (``parallel="fsdp"``);
  gloo on CPU, NCCL on GPU; bf16 autocast on GPU, fp32 on CPU;
- AdEMAMix + WSD (pre-training) or AdamW + cosine (QAD, post-training);
- periodic checkpoints written atomically (model, optimizer, schedule, RNG, step — the data
  position is a function of the step), the last N kept; a restarted run continues from the
  newest one and ends with exactly the weights of an uninterrupted run;
- a tqdm bar, one metrics line per logging interval, ``log.jsonl`` (step, loss, kl, ce, lr,
  grad norm, tokens/s) and validation every N steps;
- a non-finite loss stops the run at that step and keeps the last good checkpoint.

What this module does not do: know about logit stores, chat templates or quantization — those
live in the `Task` a stage passes in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist

from famex import integrity
from famex.distill.losses import LossOut
from famex.distill.optim import AdEMAMix, cosine_schedule, lr_lambda, wsd_schedule
from famex.errors import FamexError
from famex.utils import atomic_dir, atomic_write_bytes, is_quiet, log, progress

CKPT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    """Options every training stage shares (stage configs extend this)."""

    out: str = ""
    """Output directory: the final Hugging Face model, checkpoints/, log.jsonl, meta.json, metrics.json."""
    global_batch: int | None = None
    """Sequences per optimizer step (default: the preset's paper value, else required)."""
    micro_batch: int = 1
    """Sequences per forward/backward on one rank; the rest of the global batch is accumulated."""
    iters: int | None = None
    """Optimizer steps (default: the preset's paper value, else required)."""
    lr: float | None = None
    """Peak learning rate (default: the preset's paper value, else required)."""
    optimizer: Literal["ademamix", "adamw"] = "ademamix"
    """AdEMAMix (the paper's pre-training optimizer) or AdamW."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    betas: list[float] | None = None
    """Optimizer betas (AdEMAMix: β1 β2 β3, default 0.9 0.999 0.9999; AdamW: β1 β2, default 0.9 0.95)."""
    ademamix_alpha: float = 8.0
    """AdEMAMix mixing weight α of the slow EMA (warmed up over the whole run, as in the paper)."""
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """Learning-rate schedule: warm-up/stable/decay, cosine, or constant after warm-up."""
    warmup_fraction: float = 0.01
    """Fraction of the steps spent in linear warm-up."""
    decay_fraction: float = 0.2
    """WSD: fraction of the steps in the final decay."""
    decay_shape: Literal["linear", "cosine", "sqrt", "1-sqrt"] = "1-sqrt"
    """WSD: shape of the final decay."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the decay, as a fraction of the peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    seed: int = 0
    """Seed of the student's initialisation and of the chunk order when no logit store fixes it."""
    save_every: int = 500
    """Write a checkpoint every N steps (0 = only the final model)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted once a newer one is complete)."""
    eval_every: int = 500
    """Validate every N steps and at the end (0 = only at the end)."""
    eval_chunks: int = 0
    """Validation chunks per evaluation (0 = the whole validation split)."""
    log_every: int = 10
    """Write a log line every N steps."""
    loss_chunk_tokens: int = 1024
    """Tokens per lm_head chunk in the loss (memory ≈ this × vocabulary × 4 bytes)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: replicate the model (DDP) or shard it with FSDP2 fully_shard."""
    device: str = "auto"
    """auto, cpu, cuda."""
    prefetch: int = 2
    """Optimizer steps whose micro-batches a background thread prepares ahead (0 = none)."""


# Options that change speed or bookkeeping, not the weights a run ends with.
TRAIN_IDENTITY_EXCLUDE = ("save_every", "keep_last", "eval_every", "eval_chunks", "log_every", "prefetch",
                          "device", "micro_batch", "loss_chunk_tokens")


class Task(Protocol):
    """What a stage supplies to the loop."""

    def micro_batches(self, step: int, rank: int, world: int, micro_batch: int, accum: int) -> list[dict[str, Any]]:
        """The micro-batches this rank runs at optimizer step ``step`` (a pure function of its arguments)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], chunk_tokens: int) -> LossOut:
        """The loss of one micro-batch (sums + count: the loop normalises by the global count)."""

    def validate(self, model: torch.nn.Module, rank: int, world: int, max_chunks: int) -> dict[str, float]:
        """Validation metrics (already reduced across ranks)."""

    # Optional: ``count(batch) -> int``, the units the loss sums over (default: labelled tokens,
    # i.e. ``labels != -100``); a pairwise loss such as DPO counts pairs instead.


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Single process, or the process group torchrun describes (gloo on CPU, NCCL on GPU)."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda") if want_cuda else torch.device("cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if not want_cuda:
        # Share the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(rank, world, local, torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu"))


@contextlib.contextmanager
def stage_on_ranks(stage, d: Dist):
    """The body of a training stage on every rank: an error marks the stage failed (rank 0 writes
    meta.json) and propagates; ranks meet at a barrier on the way out either way."""
    try:
        yield
    except BaseException as e:
        if d.main:
            stage.fail(e)
        raise
    finally:
        if d.world > 1:
            dist.barrier()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _LossModule(torch.nn.Module):
    """Wraps the model so that DDP / FSDP see the whole loss computation as one forward."""

    def __init__(self, model: torch.nn.Module, task: Task, chunk_tokens: int):
        super().__init__()
        self.model = model
        self._task = task
        self._chunk = chunk_tokens

    def forward(self, batch: dict[str, Any]) -> LossOut:
        return self._task.loss(self.model, batch, self._chunk)


def wrap_parallel(model: torch.nn.Module, task: Task, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    module = _LossModule(model, task, cfg.loss_chunk_tokens)
    if d.world == 1:
        return module
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise FamexError(f"FSDP: cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return list(layers)


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, iters: int, lr: float) -> torch.optim.Optimizer:
    # No weight decay on norms, biases and other vectors (xIELU's scalars included), as is usual.
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "ademamix":
        betas = tuple(cfg.betas or (0.9, 0.999, 0.9999))
        if len(betas) != 3:
            raise FamexError(f"AdEMAMix takes three betas (β1 β2 β3), got {list(betas)}")
        # The paper warms α and β3 up over the whole run.
        return AdEMAMix(groups, lr=lr, betas=betas, alpha=cfg.ademamix_alpha, t_alpha=iters, t_beta3=iters)
    betas = tuple(cfg.betas or (0.9, 0.95))
    if len(betas) != 2:
        raise FamexError(f"AdamW takes two betas (β1 β2), got {list(betas)}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(cfg.warmup_fraction * iters)
    if cfg.schedule == "wsd":
        fn = lr_lambda(wsd_schedule, total=iters, warmup=warmup, decay_fraction=cfg.decay_fraction,
                       shape=cfg.decay_shape, min_lr_ratio=cfg.min_lr_ratio)
    elif cfg.schedule == "cosine":
        fn = lr_lambda(cosine_schedule, total=iters, warmup=warmup, min_lr_ratio=cfg.min_lr_ratio)
    else:
        fn = lr_lambda(wsd_schedule, total=iters, warmup=warmup, decay_fraction=0.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: str | Path) -> list[tuple[int, Path]]:
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / "trainer.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(module: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, d: Dist):
    """Model and optimizer state dicts, gathered in full (FSDP) and on CPU."""
    if d.world > 1 and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=opts), get_optimizer_state_dict(module, opt, options=opts)
    return None, opt.state_dict()


def _load_full_state(module, opt, model_sd, opt_sd, cfg: TrainConfig, d: Dist) -> None:
    if d.world > 1 and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(module, model_sd, options=opts)
        set_optimizer_state_dict(module, opt, opt_sd, options=opts)
    else:
        opt.load_state_dict(opt_sd)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(module, "module", module)  # DDP
    return inner.model if isinstance(inner, _LossModule) else inner


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, Any]
    model: torch.nn.Module


def train(
    model: torch.nn.Module,
    task: Task,
    cfg: TrainConfig,
    *,
    iters: int,
    lr: float,
    global_batch: int,
    save_model: Callable[[torch.nn.Module, Path], None],
    d: Dist | None = None,
    tokens_per_sequence: int,
    run_info: dict[str, Any] | None = None,
) -> TrainResult:
    """Run (or resume) the optimisation in ``cfg.out``; ``save_model(model, dir)`` writes a loadable model.

    Returns the final step and metrics. The final model is written by the caller from
    ``result.model`` (rank 0), so stages can post-process it (QAD snaps weights to the grid).
    """
    d = d or setup_distributed(cfg.device)
    out = Path(cfg.out)
    if global_batch % (d.world * cfg.micro_batch) != 0:
        raise FamexError(
            f"global batch {global_batch} is not a multiple of ranks × micro batch = {d.world} × {cfg.micro_batch}; "
            "change --global-batch or --micro-batch"
        )
    accum = global_batch // (d.world * cfg.micro_batch)
    model.to(d.device)
    model.train()
    module = wrap_parallel(model, task, cfg, d)
    opt = make_optimizer(module, cfg, iters, lr)
    sched = make_schedule(opt, cfg, iters)

    start = 0
    ckpts = checkpoint_dirs(out)
    if ckpts:
        step0, path = ckpts[-1]
        integrity.check_checksums(path, f"delete {path} to resume from the checkpoint before it")
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
        if d.world > 1 and cfg.parallel == "fsdp":
            _load_full_state(module, opt, {f"model.{k}": v for k, v in weights.items()}, state["optimizer"], cfg, d)
        else:
            _unwrap(module).load_state_dict(weights, strict=True)
            _load_full_state(module, opt, None, state["optimizer"], cfg, d)
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = step0
        if d.main:
            log(f"resuming from {path} (step {step0} of {iters})")
            _truncate_log(out / LOG_FILE, step0)
    elif d.main and (out / LOG_FILE).exists():
        (out / LOG_FILE).unlink()

    autocast = _autocast(cfg, d)
    bar = progress(total=iters, initial=start, desc=f"training {out.name}", unit="step") if d.main else None
    last_val: dict[str, float] = {}
    t_last, tok_since, step_since = time.perf_counter(), 0, 0
    metrics: dict[str, Any] = {}
    step = start
    lines_every = max(1, cfg.log_every)
    from famex.data.packing import IGNORE_INDEX

    ahead = _Prefetcher(lambda s: task.micro_batches(s, d.rank, d.world, cfg.micro_batch, accum), start, iters, cfg.prefetch)
    try:
        for step in range(start, iters):
            batches = ahead.get(step)
            count_fn = getattr(task, "count", None)
            local_count = sum(count_fn(b) if count_fn else int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            global_count = int(all_reduce_sum(torch.tensor(float(local_count), device=d.device), d).item())
            denom = max(global_count, 1)
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(3, dtype=torch.float64)
            for i, batch in enumerate(batches):
                batch = _to_device(batch, d.device)
                sync = i == len(batches) - 1
                ctx = module.no_sync() if (d.world > 1 and cfg.parallel == "ddp" and not sync) else contextlib.nullcontext()
                with ctx:
                    if cfg.parallel == "fsdp" and d.world > 1:
                        module.set_requires_gradient_sync(sync)
                    with autocast:
                        out_loss: LossOut = module(batch)
                    # DDP and FSDP average gradients over ranks; scaling by the world size turns that
                    # average back into the sum over all ranks' tokens, divided by the global count.
                    (out_loss.loss_sum * (d.world / denom)).backward()
                sums += torch.tensor([out_loss.loss_sum.item(), out_loss.kl_sum.item(), out_loss.ce_sum.item()], dtype=torch.float64)
            sums = all_reduce_sum(sums.to(d.device), d).cpu()
            loss = sums[0].item() / denom
            if not math.isfinite(loss):
                last = checkpoint_dirs(out)
                keep = f"; the last good checkpoint is {last[-1][1]}" if last else ""
                raise FamexError(
                    f"non-finite loss ({loss}) at step {step + 1}: training stopped{keep} — lower --lr, raise "
                    "--warmup-fraction or check the data"
                )
            grad_norm = _clip(module, cfg.grad_clip)
            opt.step()
            sched.step()
            tok_since += global_count
            step_since += 1
            done = step + 1
            if bar is not None:
                bar.update(1)
            is_last = done == iters
            eval_now = is_last or bool(cfg.eval_every and done % cfg.eval_every == 0)
            if eval_now:
                model.eval()
                with torch.no_grad(), autocast:
                    last_val = task.validate(model, d.rank, d.world, cfg.eval_chunks)
                model.train()
            if done % lines_every == 0 or eval_now:
                now = time.perf_counter()
                record = {
                    "step": done, "loss": loss, "kl": sums[1].item() / denom, "ce": sums[2].item() / denom,
                    "lr": _lr_at(sched), "grad_norm": grad_norm, "tokens": done * global_batch * tokens_per_sequence,
                    "tokens_per_s": tok_since / max(now - t_last, 1e-9) if step_since else None,
                }
                if eval_now:
                    record.update({f"val_{k}": v for k, v in last_val.items()})
                if d.main:
                    _append_log(out / LOG_FILE, record)
                    if bar is not None and not is_quiet():
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}")
                    if bar is None or bar.disable:
                        log(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
                metrics = record
                t_last, tok_since, step_since = now, 0, 0
            if cfg.save_every and done % cfg.save_every == 0 and not is_last:
                _save_checkpoint(module, opt, sched, cfg, d, out, done)
    finally:
        ahead.close()
    if bar is not None:
        bar.close()
    final = {"steps": iters, "train_loss": metrics.get("loss"), "train_kl": metrics.get("kl"),
             "train_ce": metrics.get("ce"), "tokens": iters * global_batch * tokens_per_sequence}
    final.update({f"val_{k}": v for k, v in last_val.items()})
    if "val_ce" in final:
        final["val_loss"] = final["val_ce"]
    if d.world > 1 and cfg.parallel == "fsdp":
        model_sd, _ = _full_state(module, opt, cfg, d)
        return TrainResult(iters, final, _gathered_model(model, model_sd))
    return TrainResult(iters, final, _unwrap(module))


class _Prefetcher:
    """Builds the micro-batches of the next steps in a background thread (store reads and decoding
    release the GIL) while the current step computes; results are exactly those of a direct call."""

    def __init__(self, fn: Callable[[int], list], start: int, stop: int, depth: int):
        from concurrent.futures import ThreadPoolExecutor

        self.fn, self.stop, self.depth = fn, stop, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="famex-batches") if depth > 0 else None
        self.pending: dict[int, Any] = {}
        self.next = start

    def get(self, step: int) -> list:
        if self.pool is None:
            return self.fn(step)
        while self.next < min(step + 1 + self.depth, self.stop):
            self.pending[self.next] = self.pool.submit(self.fn, self.next)
            self.next += 1
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True)


def _gathered_model(model, state_dict):
    """A plain (unsharded) model holding the gathered weights, for rank 0 to save (FSDP)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in state_dict.items()}, strict=True)
    return plain


def _lr_at(sched) -> float:
    """The learning rate the step that just ran used (the scheduler has already moved on)."""
    return float(sched.lr_lambdas[0](sched.last_epoch - 1) * sched.base_lrs[0])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _clip(module: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
        norm = norm.full_tensor()
    return float(norm)


def _autocast(cfg: TrainConfig, d: Dist):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run restarts from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def _save_checkpoint(module, opt, sched, cfg: TrainConfig, d: Dist, out: Path, step: int) -> None:
    model_sd, opt_sd = _full_state(module, opt, cfg, d)
    if d.main:
        from safetensors.torch import save_file

        model = _unwrap(module)
        if model_sd is None:
            model_sd = model.state_dict()
        else:
            model_sd = {k.removeprefix("model."): v for k, v in model_sd.items()}
        # Tied weights appear twice in a state dict; safetensors wants separate storages. With
        # config.json beside it, from_pretrained (and `famex average`) load a checkpoint as it is.
        full = {k: v.detach().cpu().contiguous().clone() for k, v in model_sd.items()}
        with atomic_dir(out / CKPT_DIR / f"step-{step:08d}") as tmp:
            save_file(full, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(tmp)
            torch.save({"step": step, "optimizer": opt_sd, "scheduler": sched.state_dict(), "rng": _rng_state()},
                       tmp / "trainer.pt")
            integrity.write_checksums(tmp)
        for _, old in checkpoint_dirs(out)[: -max(1, cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    if d.world > 1:
        dist.barrier()
