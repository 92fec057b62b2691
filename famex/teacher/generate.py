"""`famex logits`: run the teacher once over a data split and store its sparse top-k distributions.

The teacher sees exactly the chunks the trainer will see (`famex.data.packing.PackedChunks`:
packed documents, attention masked across documents, positions restarting per document), in the
store order fixed by `ChunkOrder(n_chunks, seed)` (computed per position, never held whole). Per position it keeps the top-k ids and
probabilities of ``softmax(logits / temperature)`` and the mass left out, and hands whole shards to
encoder threads, which encode, compress and write them while the teacher runs on.

Resume: shards are written whole and atomically, so a rerun with the same arguments skips the
shards that exist (their headers carry a hash of the arguments) and writes the rest; the result
is byte-identical to an uninterrupted run. Many ranks (``torchrun``): rank r writes shards
r, r + world, ...; rank 0 gathers the shard entries and writes the manifest last.

``famex logits verify STORE_DIR`` checks every shard of a store against its manifest.

What this module does not do: define the on-disk format (`famex.teacher.store`) or the encodings
(`famex.teacher.codec`); read stores for training (`store.LogitStore`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from famex.config import add_config_arguments, resolve_config
from famex.distill.trainer import Dist, setup_distributed
from famex.errors import FamexError
from famex.stage import COMPLETE, Stage, read_meta
from famex.teacher import codec, store
from famex.utils import log, progress


@dataclass
class LogitsConfig:
    teacher: str = "default"
    """Teacher: a Hugging Face model directory, a GGUF file, or 'default' (the offline SmolLM2-135M-Instruct)."""
    data: str = ""
    """Data directory made by `famex data`; the teacher runs over its packed chunks."""
    out: str = ""
    """Output store directory (manifest.json, permutation.bin, shard-*.fxl, meta.json, metrics.json)."""
    split: Literal["train", "val"] = "train"
    """Which split of the data directory to run over."""
    top_k: int = 256
    """Token ids (and probabilities) kept per position: the paper keeps 256."""
    encoding: Literal["compact", "paper"] = "compact"
    """compact: adaptive k, sqrt-quantized probabilities, zstd (KL(decoded ‖ exact top-k_t) about kl_target); paper: fp32 + int32, gzip (the paper's layout)."""
    temperature: float = 1.0
    """Softmax temperature of the stored distribution."""
    kl_target: float = codec.DEFAULT_KL_TARGET
    """compact only: mean KL(decoded ‖ exact top-k_t) per position that quantizing the kept probabilities may cost (nats)."""
    drop_below: float = codec.DEFAULT_DROP_BELOW
    """compact only: adaptive k; ids of probability below this move into the left-out mass (each position keeps at least its top id); 0 keeps all top_k."""
    seed: int = 0
    """Seed of the chunk permutation (the store order, which the trainer follows)."""
    seq_len: int | None = None
    """Chunk length; default: the data directory's."""
    tokens_per_shard: int = store.TOKENS_PER_SHARD
    """Tokens per shard file (whole chunks): the unit of writing, resuming and splitting across ranks."""
    batch_size: int = 1
    """Chunks per teacher forward (speed and memory only; the logits of a chunk do not depend on it)."""
    workers: int = 2
    """Encoder threads (top-k encoding and compression overlap the teacher forward)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the teacher runs; auto = CUDA when available (one GPU per rank under torchrun)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Teacher weights and activations; auto = bfloat16 on CUDA, float32 on CPU. Softmax is fp32."""
    attn: Literal["auto", "sdpa", "flex", "flash_attention_2"] = "auto"
    """Attention kernel for packed documents: auto = flex (document BlockMask, no T×T mask) on CUDA, sdpa on CPU."""

    def validate(self) -> None:
        if not self.data:
            raise FamexError("--data DATA_DIR is required (a directory made by `famex data`)")
        if not self.out:
            raise FamexError("--out STORE_DIR is required")
        if self.top_k < 1:
            raise FamexError(f"--top-k must be at least 1, not {self.top_k}")
        if not self.temperature > 0:
            raise FamexError(f"--temperature must be positive, not {self.temperature}")
        if not self.kl_target > 0:
            raise FamexError(f"--kl-target must be positive, not {self.kl_target}")
        if not 0 <= self.drop_below < 1:
            raise FamexError(
                f"--drop-below {self.drop_below} must be a probability in [0, 1): ids less probable than it move "
                "into the left-out mass (0 keeps all --top-k)"
            )
        if self.batch_size < 1 or self.workers < 1 or self.tokens_per_shard < 1:
            raise FamexError("--batch-size, --workers and --tokens-per-shard must be at least 1")


# Options that change speed, not bytes. (batch_size: the numerics of a batched forward can
# differ in the last bit from an unbatched one, but both are the teacher's logits; resuming
# with another batch size is allowed so that an out-of-memory run can continue smaller.)
_SPEED_ONLY = ("batch_size", "workers", "device", "attn")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="*", metavar="verify STORE_DIR",
        help="`famex logits verify STORE_DIR` checks every shard of a store and exits non-zero on any mismatch",
    )
    add_config_arguments(parser, LogitsConfig)


def main(args: argparse.Namespace) -> int:
    if args.action:
        if args.action[0] != "verify" or len(args.action) != 2:
            raise FamexError(f"unexpected arguments {' '.join(args.action)!r}; usage: famex logits verify STORE_DIR")
        summary = store.verify(args.action[1])
        print(f"{args.action[1]}: ok — {summary['shards']} shards, {summary['chunks']} chunks, {summary['tokens']} tokens, {summary['bytes']} bytes")
        return 0
    cfg = resolve_config(LogitsConfig, args)
    generate(cfg)
    print(cfg.out)
    return 0


# --- the maths -------------------------------------------------------------------------------


def topk_of_logits(logits: torch.Tensor, k: int, temperature: float = 1.0, rows: int = 16, sync_free: bool | None = None):
    """Top-k ids, probabilities and left-out mass of ``softmax(logits / temperature)`` per row.

    ``logits`` [N, V] (any float dtype; computed in fp32). Rows are processed ``rows`` at a time:
    a block of 16 x 49k fp32 logits (3 MB) stays in cache across the log-softmax and the top-k,
    which took 97 ms of CPU per 512 positions at k = 256 against 135 ms with blocks of 1024 rows
    (the top-k is 78 of them; a top-k on the raw logits plus a logsumexp was no faster). The left-out
    mass is ``1 - sum(top-k)`` (in fp64) where that is precise; for rows with less than
    `_SMALL_MASS` left, whose ``1 - sum`` fp32 cannot resolve, it is summed from the ids outside
    the top-k instead. Returns ids int64 [N, k], probs fp32 [N, k], mass_left fp32 [N].

    On CUDA (or with ``sync_free``) the blocks are `_GPU_ROWS` rows and the small-mass rows are
    chosen with ``torch.where`` over a mass summed for every row: no ``.nonzero()`` / ``len()``, so
    the host never waits on the device inside the loop (the extra pass over the vocabulary is cheap
    next to the teacher's forward there; on CPU the per-row branch is the faster one).
    """
    sync_free = logits.is_cuda if sync_free is None else sync_free
    rows = max(rows, _GPU_ROWS) if sync_free else rows
    ids, probs, mass = [], [], []
    for z in logits.split(rows):
        z = z.float()
        logp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
        top, idx = logp.topk(k, dim=-1)
        p = top.exp()
        m = (1.0 - p.double().sum(-1)).clamp_min(0.0)
        if sync_free:
            rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1).exp().double()
            m = torch.where(m < _SMALL_MASS, rest, m)
        elif len(small := (m < _SMALL_MASS).nonzero().squeeze(1)):
            rest = logp[small].scatter_(-1, idx[small], float("-inf"))
            m[small] = torch.logsumexp(rest, dim=-1).exp().double()
        ids.append(idx)
        probs.append(p)
        mass.append(m.float())
    return torch.cat(ids), torch.cat(probs), torch.cat(mass)


# Below this left-out mass, 1 - sum(top-k) in fp32 is off by more than ~0.1% (absolute error ~1e-6).
_SMALL_MASS = 1e-3
# Rows per block on the device: 1024 × 131k fp32 is 0.5 GB of temporaries at the Apertus vocabulary.
_GPU_ROWS = 1024


# --- the stage -------------------------------------------------------------------------------


def _gather(obj: Any, d: Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def generate(cfg: LogitsConfig) -> Path:
    """Run the `famex logits` stage described by ``cfg`` (as one rank of torchrun, or alone)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FamexError("--device cuda, but no CUDA device is available; use --device cpu")
    # A process group that torchrun's caller set up stays theirs; one made here is torn down here.
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = setup_distributed(cfg.device)
    try:
        return _generate(cfg, d)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _generate(cfg: LogitsConfig, d: Dist) -> Path:
    from famex.data.packing import PackedChunks
    from famex.data.prepare import tokenizer_hash
    from famex.models import load_tokenizer, resolve_model_spec

    out = Path(cfg.out)
    chunks = PackedChunks(cfg.data, cfg.split, cfg.seq_len)
    if len(chunks) == 0:
        raise FamexError(f"{cfg.data}: the {cfg.split} split holds no complete chunk of {chunks.seq_len} tokens — nothing to store")
    spec = resolve_model_spec(cfg.teacher)
    # Check the tokenizer before the stage begins, so a wrong teacher leaves no trace to refuse later.
    tok_hash = tokenizer_hash(load_tokenizer(spec))
    if tok_hash != chunks.tokenizer_hash:
        raise FamexError(
            f"teacher {cfg.teacher} does not use the tokenizer {cfg.data} was made with (tokenizer hash "
            f"{tok_hash[:12]} vs {chunks.tokenizer_hash[:12]}, data vocabulary {chunks.vocab_size}) — tokenize the "
            f"data with the teacher's tokenizer: famex data --tokenizer {cfg.teacher} ..."
        )
    if cfg.top_k > chunks.vocab_size:
        raise FamexError(f"--top-k {cfg.top_k} exceeds the vocabulary ({chunks.vocab_size})")
    store.refuse_other_format(out)
    stage = Stage(out, "logits", cfg, {"data": cfg.data, "teacher": spec.path}, identity_exclude=_SPEED_ONLY)
    if _already_complete(stage, d):
        return out

    params = _store_params(cfg, chunks, spec, stage, _dtype(cfg.dtype, d.device))
    params["store_id"] = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    permutation = _permutation(len(chunks), cfg.seed)
    per_shard = store.chunks_per_shard(chunks.seq_len, cfg.tokens_per_shard)
    plan = store.shard_plan(len(chunks), per_shard)
    mine = [si for si in range(len(plan)) if si % d.world == d.rank]
    _remove_partial_shards(out, mine)
    todo = [si for si in mine if not store.shard_is_complete(out, si, plan[si], params)]
    if d.rank == 0 and len(todo) < len(mine):
        log(f"famex logits: {len(mine) - len(todo)} of {len(mine)} shards already written; resuming")

    try:
        model = _load_teacher(spec, chunks, _dtype(cfg.dtype, d.device), d.device, cfg.attn) if todo else None
        t0, c0 = time.perf_counter(), time.process_time()
        entries = _run(model, chunks, permutation, plan, todo, params, cfg, d, out)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        for si in set(mine) - set(entries):
            entries[si] = store.shard_entry(out / store.shard_name(si))
        generated = sum(plan[si][1] - plan[si][0] for si in todo) * chunks.seq_len

        gathered = _gather((entries, generated, elapsed, cpu), d)
        if d.rank == 0:
            all_entries = [e for g in gathered for e in g[0].values()]
            manifest = store.write_manifest(out, params, permutation, all_entries)
            metrics = _metrics(manifest, sum(g[1] for g in gathered), max(g[2] for g in gathered), sum(g[3] for g in gathered))
            metrics.update(precision_kl(model, chunks, permutation, V=chunks.vocab_size, device=d.device))
            stage.finish(metrics, store_id=params["store_id"])
            log(
                f"famex logits: {manifest['tokens']:,} tokens in {len(all_entries)} shards, "
                f"{metrics['bytes_per_token']:.1f} bytes/token, mean kept k {metrics['mean_kept_k']:.1f}, "
                f"mass kept {metrics['mass_kept']:.4f} of {metrics['mass_covered']:.4f}, "
                f"KL(decoded ‖ exact) {metrics['kl_decoded_vs_exact']:.1e}, in {out}"
            )
    except BaseException as e:
        if d.rank == 0:
            stage.fail(e)
        raise
    if d.world > 1:
        dist.barrier()
    return out


def _load_teacher(spec, chunks, dtype: torch.dtype, device: torch.device, attn: str = "auto"):
    from famex.models import load_model, resolve_attn

    model = load_model(spec, dtype=dtype, attn_implementation=resolve_attn(attn, device))
    if model.config.vocab_size < chunks.vocab_size:
        raise FamexError(
            f"teacher {spec.path} has a vocabulary of {model.config.vocab_size}, the data's tokenizer {chunks.vocab_size} — "
            "the tokenizer files do not belong to this model"
        )
    return model.to(device)


def _already_complete(stage: Stage, d: Dist) -> bool:
    """Rank 0 begins the stage (or refuses to mix); the others check the same things without writing."""
    if d.rank == 0:
        done = stage.begin()
    else:
        old = read_meta(stage.out)
        diffs = stage.differences(old) if old else []
        if diffs:
            raise FamexError(f"{stage.out} was made with other arguments ({'; '.join(diffs)})")
        done = bool(old and old.get("status") == COMPLETE)
    return done


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _store_params(cfg: LogitsConfig, chunks, spec, stage: Stage, dtype: torch.dtype) -> dict[str, Any]:
    """Everything that decides the store's bytes; it goes into the manifest and, hashed, every shard."""
    params: dict[str, Any] = {
        "encoding": cfg.encoding,
        "k": cfg.top_k,
        "vocab_size": chunks.vocab_size,
        "seq_len": chunks.seq_len,
        "temperature": cfg.temperature,
        "teacher": {"spec": cfg.teacher, "kind": spec.kind, "path": str(spec.path), "hash": stage.inputs["teacher"]["hash"]},
        "tokenizer_hash": chunks.tokenizer_hash,
        "data_dir": str(cfg.data),
        "data_hash": stage.inputs["data"]["hash"],
        "split": cfg.split,
        "seed": cfg.seed,
        "tokens_per_shard": cfg.tokens_per_shard,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.encoding == "compact":
        params["kl_target"] = cfg.kl_target
        params["drop_below"] = cfg.drop_below
    return params


def _permutation(n: int, seed: int):
    """The store order, computed per position (`ChunkOrder`): no rank holds the n chunk indices."""
    from famex.data.packing import ChunkOrder

    return ChunkOrder(n, seed)


def _remove_partial_shards(out: Path, mine: list[int]) -> None:
    """Delete temp files a killed run of this rank left (``.shard-NNNNN.fxl.*.tmp``)."""
    if not out.is_dir():
        return
    names = {store.shard_name(si) for si in mine}
    for p in out.glob(".shard-*.tmp"):
        if any(p.name.startswith(f".{n}.") for n in names):
            p.unlink(missing_ok=True)


def _run(model, chunks, permutation, plan, todo, params, cfg: LogitsConfig, d: Dist, out: Path) -> dict[int, dict]:
    """Teacher forward over the shards in ``todo``; encoder threads write each finished shard."""
    from famex.data.packing import collate, model_inputs

    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    V, k, T = chunks.vocab_size, cfg.top_k, chunks.seq_len
    entries: dict[int, dict] = {}
    pending: list[Future] = []
    total = sum(plan[si][1] - plan[si][0] for si in todo) * T
    bar = progress(total=total, unit="tok", unit_scale=True, desc=f"teacher logits (rank {d.rank})" if d.world > 1 else "teacher logits")

    def write(si: int, shard_chunks: list[store.ChunkLogits]) -> tuple[int, dict]:
        data = store.encode_shard(
            shard_chunks, shard=si, position_start=plan[si][0], encoding=cfg.encoding, vocab_size=V, k=k, seq_len=T,
            kl_target=cfg.kl_target, drop_below=cfg.drop_below, store_id=params["store_id"],
        )
        return si, store.write_shard(out, data, si)

    with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="famex-logit-encode") as pool:
        try:
            for si in todo:
                start, stop = plan[si]
                shard_chunks: list[store.ChunkLogits] = []
                # Batches never cross a shard: a resumed run forms the same batches as a fresh one.
                for b in range(start, stop, cfg.batch_size):
                    positions = range(b, min(b + cfg.batch_size, stop))
                    data_index = permutation[np.arange(positions.start, positions.stop)]
                    batch = collate([chunks[int(i)] for i in data_index])
                    with torch.inference_mode():
                        inputs = {key: v.to(d.device) for key, v in model_inputs(batch, impl).items()}
                        logits = model(**inputs).logits[..., :V]
                        ids, probs, mass = topk_of_logits(logits.reshape(-1, logits.shape[-1]), k, cfg.temperature)
                    ids = ids.view(len(positions), T, k).to("cpu", torch.int32).numpy()
                    probs = probs.view(len(positions), T, k).cpu().numpy()
                    mass = mass.view(len(positions), T).cpu().numpy()
                    for j in range(len(positions)):
                        shard_chunks.append(
                            store.ChunkLogits(int(data_index[j]), batch["input_ids"][j].numpy(), ids[j], probs[j], mass[j])
                        )
                    bar.update(len(positions) * T)
                pending.append(pool.submit(write, si, shard_chunks))
                # Bound the shards held in memory; surface an encoder error promptly.
                while len(pending) > cfg.workers or (pending and pending[0].done()):
                    si_done, entry = pending.pop(0).result()
                    entries[si_done] = entry
            for f in pending:
                si_done, entry = f.result()
                entries[si_done] = entry
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        finally:
            bar.close()
    return entries


def precision_kl(model, chunks, permutation, V: int, device: torch.device, n_chunks: int = 1) -> dict[str, Any]:
    """KL(fp32 forward ‖ the store's forward) per position over the full vocabulary, on the first
    ``n_chunks`` chunks of the store order: the error of a bf16 teacher that the store's own
    ``kl_decoded_vs_exact`` (decoded vs that teacher's top-k) cannot see.

    Runs the model once more in its own dtype, then converts it to fp32 in place (the generation is
    over by then) and runs it again. With an fp32 teacher (the CPU default) the KL is 0 by definition
    and nothing runs; on a resumed run whose shards all existed there is no model: None.
    """
    from famex.data.packing import collate, model_inputs

    if model is None:
        return {"kl_bf16_vs_fp32_mean": None, "kl_bf16_vs_fp32_p95": None, "kl_precision_note": "no shard generated in this run"}
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return {"kl_bf16_vs_fp32_mean": 0.0, "kl_bf16_vs_fp32_p95": 0.0, "kl_precision_note": "the teacher ran in float32"}
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    n = min(n_chunks, len(permutation))
    batch = collate([chunks[int(i)] for i in permutation[np.arange(n)]])
    inputs = {key: v.to(device) for key, v in model_inputs(batch, impl).items()}
    with torch.inference_mode():
        low = model(**inputs).logits[..., :V].float().reshape(-1, V)
        model.float()
        high = model(**inputs).logits[..., :V].float().reshape(-1, V)
        lp_high, lp_low = torch.log_softmax(high, -1), torch.log_softmax(low, -1)
        kl = (lp_high.exp() * (lp_high - lp_low)).sum(-1).clamp_min(0).double().cpu()
    return {"kl_bf16_vs_fp32_mean": float(kl.mean()), "kl_bf16_vs_fp32_p95": float(kl.quantile(0.95)),
            "kl_precision_positions": int(kl.numel()), "kl_precision_dtype": str(dtype).removeprefix("torch.")}


def _metrics(manifest: dict[str, Any], generated_tokens: int, seconds: float, cpu_seconds: float) -> dict[str, Any]:
    stats = [s["stats"] for s in manifest["shards"]]
    positions = sum(s["positions"] for s in stats)
    kl_positions = sum(s["kl_positions"] for s in stats)

    def sampled(key: str) -> float | None:
        """Mean of a per-position statistic measured on each shard's sampled chunks."""
        if not kl_positions:
            return None
        return sum(s[key] * s["kl_positions"] for s in stats if s["kl_positions"]) / kl_positions

    return {
        "tokens": manifest["tokens"],
        "chunks": manifest["chunks"],
        "shards": len(manifest["shards"]),
        "bytes": manifest["bytes"],
        "bytes_per_token": manifest["bytes"] / manifest["tokens"],
        "mass_covered": sum(s["mass_covered"] * s["positions"] for s in stats) / positions,
        "mass_kept": sum(s["mass_kept"] * s["positions"] for s in stats) / positions,
        "mean_kept_k": sum(s["mean_kept_k"] * s["positions"] for s in stats) / positions,
        **{key: sampled(key) for key in codec.KL_FIGURES},
        "kl_positions": kl_positions,
        "tokens_generated": generated_tokens,
        "tokens_per_s": generated_tokens / seconds if seconds > 0 and generated_tokens else None,
        # CPU seconds of the generation loop, all threads and ranks: the work done, which a busy
        # machine does not distort the way it distorts wall-clock tokens/s.
        "cpu_s": cpu_seconds,
    }


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = LogitsConfig
run = generate
