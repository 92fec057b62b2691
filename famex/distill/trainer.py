"""The training loop shared by `famex distill`, `famex sft` and QAD: one loop, many objectives.

A stage hands `train` a model and a `Task` (where micro-batches come from, what the loss is, how
to validate); the loop does the rest the same way for every stage:

- gradient accumulation to the global batch, normalised by the global number of labelled tokens
  (all-reduced), so 1 rank × 4 micro-batches and 2 ranks × 2 micro-batches take the same step;
- single process, or `torchrun` with DDP (default) or FSDP2 ``fully_shard`` (``parallel="fsdp"``);
  gloo on CPU, NCCL on GPU; bf16 autocast on GPU, fp32 on CPU;
- AdEMAMix + WSD (pre-training) or AdamW + cosine (QAD, post-training);
- periodic checkpoints written atomically (model, optimizer, schedule, RNG, step — the data
  position is a function of the step), the last N kept; model and optimizer are sharded
  `torch.distributed.checkpoint` directories (each rank writes and reads only its own shards, and a
  checkpoint resumes on another number of ranks); a restarted run continues from the newest one and
  ends with exactly the weights of an uninterrupted run;
- a stage is complete only once every rank finished (`stage_on_ranks`); a failing rank fails it;
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from famex import integrity
from famex.distill.losses import LossOut
from famex.distill.optim import AdEMAMix, cosine_schedule, lr_lambda, wsd_schedule
from famex.errors import FamexError
from famex.train_options import TRAIN_IDENTITY_EXCLUDE, TrainOptions  # noqa: F401 (re-exported)
from famex.utils import atomic_dir, atomic_write_bytes, is_quiet, log, progress, sha256_file

CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer.pt"
LOG_FILE = "log.jsonl"


# The loop reads a stage config through the `TrainOptions` fields every training stage composes
# (famex.train_options), plus its ``out``; both names stay importable from here.
TrainConfig = TrainOptions


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


def begin_on_ranks(stage, d: Dist, extra: dict | None = None) -> bool:
    """`Stage.begin` on rank 0, its answer (already complete?) broadcast to every rank."""
    done = stage.begin(extra=extra) if d.main else False
    if d.world > 1:
        flag = [done]
        dist.broadcast_object_list(flag, src=0)
        done = flag[0]
    return done


@contextlib.contextmanager
def stage_on_ranks(stage, d: Dist):
    """The body of a training stage on every rank; yields ``finish(metrics)`` for rank 0 to call.

    The stage is marked complete only once every rank has left the body without error: rank 0's
    ``finish`` is deferred to a barrier all ranks reach after the body. A rank that raises marks the
    stage failed (rank 0 through ``stage``, another rank by updating meta.json with its rank number)
    and re-raises without entering another collective, so torchrun stops the job with a non-zero
    exit and the stage never reads complete.
    """
    pending: dict[str, Any] = {}

    def finish(metrics: dict[str, Any] | None = None) -> None:
        pending["metrics"] = metrics

    try:
        yield finish
        _barrier(d)  # every rank finished its part
        if d.main:
            if "metrics" not in pending:
                raise RuntimeError("the stage body ended without calling finish(metrics) on rank 0")
            stage.finish(pending["metrics"])
        _barrier(d)  # no rank returns (or starts the next stage) before meta.json says complete
    except BaseException as e:
        _mark_failed(stage, d, e)
        raise


def _mark_failed(stage, d: Dist, error: BaseException) -> None:
    """The first failure reported wins: when rank 1 dies, rank 0 then fails too (its collective
    loses the peer), and meta.json should keep naming rank 1's error, not the lost connection."""
    if d.world > 1:
        from famex.stage import RUNNING, read_meta

        meta = read_meta(stage.out)
        if not meta or meta.get("status") != RUNNING:
            return
        stage.meta = {**meta, "failed_rank": d.rank}
    stage.fail(error)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def rank_batches(n: int, rank: int, world: int, micro_batch: int) -> list[tuple[list[int], bool]]:
    """Items ``[0, n)`` of an evaluation split into this rank's micro-batches, as ``(indices, counted)``.

    Every rank gets the same number of batches: under FSDP each forward all-gathers weights with the
    other ranks, so a rank with one forward less would leave them waiting. A rank short of items runs
    its last ones on item 0 with ``counted`` False (the caller leaves their result out).
    """
    mine = list(range(rank, n, world))
    steps = math.ceil(math.ceil(n / world) / micro_batch) if n else 0
    batches = [mine[i * micro_batch: (i + 1) * micro_batch] for i in range(steps)]
    return [(idx, True) if idx else ([0], False) for idx in batches]


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _LossModule(torch.nn.Module):
    """Wraps the model so that DDP / FSDP see the whole loss computation as one forward.

    ``module(None, run=fn)`` runs ``fn(model)`` inside that forward instead: under FSDP the root's
    parameters (embedding, final norm, lm_head) are only gathered inside the root's forward, so
    validation goes through here (the decoder layers gather their own in theirs).
    """

    def __init__(self, model: torch.nn.Module, task: Task, chunk_tokens: int):
        super().__init__()
        self.model = model
        self._task = task
        self._chunk = chunk_tokens

    def forward(self, batch: dict[str, Any] | None, run: Callable[[torch.nn.Module], Any] | None = None) -> Any:
        if run is not None:
            return run(self.model)
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
    """The finished checkpoints of a run, oldest first (a checkpoint directory appears only when complete)."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / TRAINER_STATE).is_file():
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


def _state_root(module: torch.nn.Module) -> torch.nn.Module:
    """The `_LossModule` (the FSDP root, or what DDP wraps): checkpoint keys are ``model.<HF name>``."""
    return module if isinstance(module, _LossModule) else module.module


def _sharded_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state as DCP sees it: this rank's shards under FSDP, whole tensors otherwise."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = _state_root(module)
    return {"model": get_model_state_dict(root), "optim": get_optimizer_state_dict(root, opt)}


def _save_checkpoint(module, opt, sched, cfg: TrainConfig, d: Dist, out: Path, step: int) -> None:
    """Write ``checkpoints/step-N`` on every rank, atomically (temp dir + rename by rank 0).

    Model and optimizer go through `torch.distributed.checkpoint`: each rank writes only its own
    shards (under DDP the replicated tensors are split across the ranks, each written once);
    ``trainer.pt`` (rank 0) holds the step, the schedule and the world it was written by,
    ``rng-RRRRR.pt`` each rank's RNG state, ``config.json`` the model's config.
    """
    import torch.distributed.checkpoint as dcp

    final = out / CKPT_DIR / f"step-{step:08d}"
    with atomic_dir(final) if d.main else contextlib.nullcontext() as tmp:
        where = [str(tmp) if d.main else None]
        if d.world > 1:
            dist.broadcast_object_list(where, src=0)
        tmp = Path(where[0])
        with _quiet_single_process():
            dcp.save(_sharded_state(module, opt), checkpoint_id=tmp, no_dist=d.world == 1)
        torch.save(_rng_state(), tmp / f"rng-{d.rank:05d}.pt")
        # Each rank hashes the files it wrote; rank 0 the rest, into checksums.json before the rename.
        mine = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in sorted(tmp.glob(f"__{d.rank}_*")) + [tmp / f"rng-{d.rank:05d}.pt"]}
        records = [mine]
        if d.world > 1:
            records = [None] * d.world
            dist.all_gather_object(records, mine)
        _barrier(d)  # every rank's files are in place before rank 0 renames the directory
        if d.main:
            torch.save({"step": step, "scheduler": sched.state_dict(), "world": d.world, "parallel": cfg.parallel,
                        "format": "dcp"}, tmp / TRAINER_STATE)
            _unwrap(module).config.save_pretrained(tmp)
            integrity.write_checksums(tmp, known={k: v for r in records for k, v in r.items()})
    if d.main:
        for _, old in checkpoint_dirs(out)[: -max(1, cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(d)


def _load_checkpoint(module, opt, sched, cfg: TrainConfig, d: Dist, path: Path) -> int:
    """Restore model, optimizer, schedule and RNG from ``path`` on every rank; returns its step.

    Each rank reads only the parts of the tensors it holds; DCP reshards, so a checkpoint written by
    another number of ranks (or by DDP / a single process) loads as well.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    _check_checkpoint(path, d)
    trainer = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    if trainer.get("format") != "dcp":
        raise FamexError(
            f"{path} was written by an older famex (one full-state file per checkpoint); this famex resumes only "
            f"sharded (DCP) checkpoints — finish the run with the famex that started it, or delete {path.parent} to restart"
        )
    state = _sharded_state(module, opt)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=d.world == 1)
    root = _state_root(module)
    set_model_state_dict(root, state["model"])
    set_optimizer_state_dict(root, opt, state["optim"])
    sched.load_state_dict(trainer["scheduler"])
    # Per-rank RNG streams: a rank the checkpoint did not have continues rank 0's (the loop itself
    # draws no random numbers; this keeps stochastic models — dropout — exact on the same world size).
    rng = path / f"rng-{d.rank:05d}.pt"
    _set_rng_state(torch.load(rng if rng.is_file() else path / "rng-00000.pt", weights_only=False))
    if d.main and trainer["world"] != d.world:
        log(f"{path} was written by {trainer['world']} rank(s), resuming on {d.world}: model and optimizer state "
            "resharded; the global batch and the data order are those of the checkpoint")
    return int(trainer["step"])


def _check_checkpoint(path: Path, d: Dist) -> None:
    """Every file of a checkpoint against its checksums.json, the hashing split across the ranks;
    a problem any rank finds stops every rank, before anything is loaded."""
    fix = f"delete {path} to resume from the checkpoint before it"
    try:
        integrity.check_checksums(path, fix, share=(d.rank, d.world))
        problem = None
    except FamexError as e:
        problem = str(e)
    problems = [problem]
    if d.world > 1:
        problems = [None] * d.world
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise FamexError(found[0])


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes the intent is to save in a single process" even when told so.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a trainer checkpoint as one full state dict (one process, no torchrun)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    integrity.check_checksums(path, f"{path} is damaged: average other checkpoints, or the final model")
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    # DCP keys are "model." (the state dict's section) + "model." (the loss wrapper) + the HF name.
    return {k.removeprefix("model.model."): v for k, v in state.items()}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(module, "module", module)  # DDP
    return inner.model if isinstance(inner, _LossModule) else inner


def _gathered_model(module: torch.nn.Module, d: Dist) -> torch.nn.Module | None:
    """FSDP: the full weights gathered into a plain model on rank 0 (CPU), for it to save; None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Every rank takes part in the gather; with cpu_offload only rank 0 receives the tensors.
    full = get_model_state_dict(_state_root(module), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _unwrap(module).config
    with init_empty_weights():  # parameters on meta, buffers (RoPE) real: no second copy of the weights
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=True, assign=True)
    plain.tie_weights()
    return plain


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, Any]
    model: torch.nn.Module | None


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
    Under FSDP ``result.model`` is a plain model holding the gathered weights on rank 0 and None on
    the other ranks.
    """
    d = d or setup_distributed(cfg.device)
    out = Path(cfg.out)
    if global_batch % (d.world * cfg.micro_batch) != 0:
        raise FamexError(
            f"global batch {global_batch} is not a multiple of ranks × micro batch = {d.world} × {cfg.micro_batch}; "
            "change --global-batch or --micro-batch"
        )
    accum = global_batch // (d.world * cfg.micro_batch)
    if hasattr(model, "set_attn_implementation"):
        from famex.models import resolve_attn

        model.set_attn_implementation(resolve_attn(cfg.attn, d.device, training=True))
    model.to(d.device)
    model.train()
    module = wrap_parallel(model, task, cfg, d)
    opt = make_optimizer(module, cfg, iters, lr)
    sched = make_schedule(opt, cfg, iters)

    start = 0
    if d.main:  # what a killed checkpoint write left behind
        for stale in (out / CKPT_DIR).glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    # Rank 0's view of the checkpoints decides for every rank (a shared filesystem may lag on the others).
    latest = [str(checkpoint_dirs(out)[-1][1]) if d.main and checkpoint_dirs(out) else None]
    if d.world > 1:
        dist.broadcast_object_list(latest, src=0)
    if latest[0] is not None:
        path = Path(latest[0])
        start = _load_checkpoint(module, opt, sched, cfg, d, path)
        if d.main:
            log(f"resuming from {path} (step {start} of {iters})")
            _truncate_log(out / LOG_FILE, start)
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
                    last_val = _validate(module, task, cfg, d)
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
        return TrainResult(iters, final, _gathered_model(module, d))
    return TrainResult(iters, final, _unwrap(module))


def _validate(module: torch.nn.Module, task: Task, cfg: TrainConfig, d: Dist) -> dict[str, float]:
    run = lambda m: task.validate(m, d.rank, d.world, cfg.eval_chunks)  # noqa: E731
    if d.world > 1 and cfg.parallel == "fsdp":
        return module(None, run=run)  # through the FSDP root, which gathers the embedding and lm_head
    return run(_unwrap(module))


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
