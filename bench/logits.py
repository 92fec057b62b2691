"""Benchmark: the sparse teacher-logit store on the default teacher (SmolLM2-135M-Instruct).

One run, side by side on the same chunks of the demo corpus:

1. generation overhead: the bare teacher forward (inputs, mask, forward; no top-k) against
   `famex logits` (forward + top-k + encoding + compression + writing, encoder threads overlapping
   the forward), in interleaved rounds. Reported as wall-clock tokens/s and as CPU seconds (all
   threads): on a shared machine the wall clock is noisy, the CPU time is the work done. On a GPU the
   encoding runs on the CPU beside the forward, so only the wall clock matters there;
2. encodings: bytes/token, KL in both directions over every position, mass kept, mean kept k,
   encode and decode speed, for `paper`, `compact` and `compact` with fixed k (no adaptive k) at
   k = 256 and k = 64, on the teacher's own top-256 (or on a saved top-256: ``--encodings-only``);
3. read throughput of a generated store: sequential `stream()` and random access `store[i]`,
   against the teacher forward rate (a distilled student consumes tokens no faster than its
   teacher's forward on the same hardware unless it is much smaller).

Usage:

    .venv/bin/python bench/logits.py [--tokens 8192] [--seq-len 512] [--rounds 3] [--threads N] [--save-topk F]
    .venv/bin/python bench/logits.py --encodings-only F      # only the encodings table, on a saved top-256
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from famex.data.packing import PackedChunks, chunk_permutation, collate, model_inputs
from famex.data.prepare import DataConfig, prepare
from famex.models import load_model, load_tokenizer, resolve_model_spec
from famex.teacher import codec, store
from famex.teacher.generate import LogitsConfig, generate, topk_of_logits


def bare_pass(model, chunks, order, batch_size: int, keep_topk: int = 0):
    """Teacher forward over the chunks in store order; optionally keep the top-k (for the codec table).

    Returns (tokens/s wall, CPU seconds, kept top-k).
    """
    kept = []
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = collate([chunks[int(i)] for i in order[b : b + batch_size]])
            logits = model(**model_inputs(batch, "sdpa")).logits[..., : chunks.vocab_size]
            if keep_topk:
                ids, probs, mass = topk_of_logits(logits.reshape(-1, logits.shape[-1]), keep_topk)
                T = chunks.seq_len
                for j in range(len(batch["input_ids"])):
                    sl = slice(j * T, (j + 1) * T)
                    kept.append((batch["input_ids"][j].numpy(), ids[sl].int().numpy(), probs[sl].numpy(), mass[sl].double().numpy()))
    return len(order) * chunks.seq_len / (time.perf_counter() - t0), time.process_time() - c0, kept


def codec_table(kept, vocab: int, seq_len: int, sweep: list[float] | None = None, ks=(256, 64)) -> list[dict]:
    """paper and compact (and compact with fixed k, for comparison) at each k of ``ks``, in one shard.

    ``sweep``: also compact at each of these adaptive-k thresholds (``drop_below``).
    """
    rows = []
    n_tokens = len(kept) * seq_len
    variants = [("paper", {}), ("compact", {}), ("compact, fixed k", {"drop_below": 0.0})]
    variants += [(f"compact, drop below {t:g}", {"drop_below": t}) for t in sweep or []]
    for k in ks:
        chunks = []
        for i, (tok, ids, probs, mass) in enumerate(kept):
            m = mass + probs[:, k:].astype(np.float64).sum(1)  # top-k is a prefix of the sorted top-256
            chunks.append(store.ChunkLogits(i, tok, ids[:, :k], probs[:, :k], m))
        for name, options in variants:
            enc = name.split(",")[0]
            # CPU time of this thread: on a shared machine the wall clock mostly measures the neighbours.
            t0 = time.thread_time()
            data = store.encode_shard(chunks, shard=0, position_start=0, encoding=enc, vocab_size=vocab, k=k, seq_len=seq_len,
                                      kl_chunks=0, **options)
            enc_s = time.thread_time() - t0
            header, payload = store.parse_header(data, "bench")
            table = store._table(Path("bench"), header, store._table_bytes(header, data, payload))
            t0 = time.thread_time()
            decoded = []
            for rec in header["chunks"]:
                o = payload + rec["offset"] + rec["tokens_bytes"]
                decoded.append(codec.decode(data[o : o + rec["logits_bytes"]], table=table))
            dec_s = time.thread_time() - t0
            pairs = [(c.ids, c.probs, c.mass_left, d.ids, d.probs, d.mass_left) for c, d in zip(chunks, decoded)]
            kls = [codec.kl_metrics(*x) for x in pairs]
            fwd, back, full = (np.concatenate([m[key] for m in kls]) for key in codec.KL_FIGURES)
            rows.append({
                "encoding": name, "k": k, "bytes_per_token": len(data) / n_tokens,
                "id_table_bytes_per_token": header.get("id_table", {}).get("bytes", 0) / n_tokens,
                "kl_mean": float(fwd.mean()), "kl_max": float(fwd.max()), "kl_back_mean": float(back.mean()),
                "kl_top_k_mean": float(full.mean()),
                "mass_covered": float(np.mean([1 - c.mass_left.mean() for c in chunks])),
                "mass_kept": float(np.mean([d.probs.astype(np.float64).sum(1).mean() for d in decoded])),
                "mean_kept_k": float(np.mean([(d.probs > 0).sum(1).mean() for d in decoded])),
                "encode_tok_s": n_tokens / enc_s, "decode_tok_s": n_tokens / dec_s,
            })
    return rows


def print_codec_table(kept, vocab: int, seq_len: int, sweep: list[float] | None = None, ks=(256, 64)) -> None:
    print(f"\n## Encodings on the teacher's top-k ({len(kept) * seq_len:,} tokens in one shard, every position)\n")
    print("| encoding | k | bytes/token | of which id table | KL(decoded ‖ exact) mean | max | KL(exact ‖ decoded) mean "
          "| KL(decoded ‖ top-k) mean | mass covered | mass kept | mean kept k | encode tok/s (CPU) | decode tok/s (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in codec_table(kept, vocab, seq_len, sweep, ks):
        print(f"| {r['encoding']} | {r['k']} | {r['bytes_per_token']:.1f} | {r['id_table_bytes_per_token']:.2f} | "
              f"{r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['kl_back_mean']:.2e} | {r['kl_top_k_mean']:.2e} | {r['mass_covered']:.4f} | "
              f"{r['mass_kept']:.4f} | {r['mean_kept_k']:.1f} | {r['encode_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} |")


def full_vocab_kl(model, chunks, order, ks, n_chunks: int = 4) -> list[dict]:
    """KL from the teacher's whole softmax to what a store holds, on ``n_chunks`` chunks.

    What a student that matched the store perfectly would still miss of the teacher: the stored
    distribution over the whole vocabulary, its left-out mass spread evenly over the ids it does
    not list (the only rule a reader has), against the teacher's full softmax, ``D_KL(teacher ||
    store)`` per position. For ``paper`` this is the cost of the top-k truncation alone; the
    compact rows add quantization and adaptive k's dropped ids.
    """
    V = chunks.vocab_size
    variants = (("paper", {}), ("compact, fixed k", {"drop_below": 0.0}), ("compact", {}))
    sums: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for i in order[:n_chunks]:
            batch = collate([chunks[int(i)]])
            logits = model(**model_inputs(batch, "sdpa")).logits[0, :, :V].double()
            logp = torch.log_softmax(logits, -1)
            p = logp.exp()
            ids256, probs256, mass256 = topk_of_logits(logits, max(ks))
            for k in ks:
                mass = mass256.double() + probs256[:, k:].double().sum(1)
                for name, options in variants:
                    blob = codec.encode(ids256[:, :k].numpy(), probs256[:, :k].numpy(), V, encoding=name.split(",")[0],
                                        mass_left=mass.numpy(), **options)
                    dec = codec.decode(blob)
                    ids = torch.as_tensor(dec.ids, dtype=torch.int64)
                    q = torch.as_tensor(dec.probs, dtype=torch.float64)
                    listed = q > 0
                    rest = torch.as_tensor(dec.mass_left, dtype=torch.float64) / (V - listed.sum(1))
                    logq = rest.clamp_min(1e-300).log()[:, None].expand(-1, V).clone()
                    r, c = listed.nonzero(as_tuple=True)
                    logq[r, ids[r, c]] = q[r, c].log()
                    kl = (p * (logp - logq)).sum(1)
                    sums.setdefault((name, k), []).extend(kl.tolist())
    return [{"encoding": n, "k": k, "kl_mean": float(np.mean(v)), "kl_median": float(np.median(v))} for (n, k), v in sums.items()]


def load_cache(path: str, teacher: str) -> tuple[list, int, int]:
    """Teacher top-256 saved by ``--save-topk``: (kept chunks, seq_len, vocab size)."""
    d = torch.load(path)
    kept = [(d["tokens"][i].numpy(), d["ids"][i].numpy(), d["probs"][i].numpy(), d["mass"][i].double().numpy())
            for i in range(len(d["tokens"]))]
    vocab = int(d["vocab_size"]) if "vocab_size" in d else len(load_tokenizer(resolve_model_spec(teacher)))
    return kept, d["tokens"].shape[1], vocab


def save_cache(path: str, kept, vocab: int) -> None:
    torch.save({"vocab_size": vocab, "tokens": torch.as_tensor(np.stack([k[0] for k in kept])),
                "ids": torch.as_tensor(np.stack([k[1] for k in kept])),
                "probs": torch.as_tensor(np.stack([k[2] for k in kept])),
                "mass": torch.as_tensor(np.stack([k[3] for k in kept]))}, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of the demo corpus to run over")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of bare forward and famex logits")
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 is fastest on a busy machine")
    ap.add_argument("--keep", help="keep the work directory here instead of a temp dir")
    ap.add_argument("--save-topk", help="save the teacher's top-256 of the run here (torch file) for --encodings-only")
    ap.add_argument("--encodings-only", metavar="TOPK_FILE",
                    help="only the encodings table, on a saved top-256 (no teacher run); e.g. 16k LAMBADA tokens")
    ap.add_argument("--sweep", type=lambda v: [float(x) for x in v.split(",")], default=[],
                    help="also compact at these adaptive-k thresholds (comma-separated --drop-below values)")
    ap.add_argument("--k", type=lambda v: tuple(int(x) for x in v.split(",")), default=(256, 64),
                    help="top-k values of the encodings table (prefixes of the top-256)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encodings_only:
        kept, seq_len, vocab = load_cache(args.encodings_only, args.teacher)
        print_codec_table(kept, vocab, seq_len, args.sweep, args.k)
        return

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="famex-bench-logits-"))
    try:
        data = work / "data"
        prepare(DataConfig(demo=True, out=str(data), tokenizer=args.teacher, seq_len=args.seq_len, val_fraction=0.0,
                           max_tokens=args.tokens + args.seq_len, workers=1))
        chunks = PackedChunks(data, "train")
        order = chunk_permutation(len(chunks), 0)
        model = load_model(resolve_model_spec(args.teacher))
        print(f"teacher {args.teacher}: {len(chunks)} chunks x {chunks.seq_len} tokens, torch threads {torch.get_num_threads()}")

        per_shard = max(chunks.seq_len, args.tokens // 4)  # several shards, so encoding overlaps the forward
        rounds = []
        kept = None
        for r in range(args.rounds):
            bare_tps, bare_cpu, k_ = bare_pass(model, chunks, order, args.batch_size, keep_topk=256 if kept is None else 0)
            kept = kept or k_
            out = work / f"store{r}"
            generate(LogitsConfig(teacher=args.teacher, data=str(data), out=str(out), batch_size=args.batch_size,
                                  tokens_per_shard=per_shard))
            m = json.loads((out / "metrics.json").read_text())
            rounds.append((bare_tps, m["tokens_per_s"], bare_cpu, m["cpu_s"]))
        metrics = m
        print(f"\n## Generation overhead (compact, k=256, {metrics['shards']} shards of {per_shard} tokens)\n")
        print("| round | bare forward tok/s | famex logits tok/s | wall overhead | bare CPU s | famex logits CPU s | CPU overhead |")
        print("|---|---|---|---|---|---|---|")
        for r, (bt, gt, bc, gc) in enumerate(rounds):
            print(f"| {r} | {bt:,.0f} | {gt:,.0f} | {bt / gt - 1:+.1%} | {bc:.1f} | {gc:.1f} | {gc / bc - 1:+.1%} |")
        wall = float(np.median([bt / gt - 1 for bt, gt, _, _ in rounds]))
        cpu = float(np.median([gc / bc - 1 for _, _, bc, gc in rounds]))
        print(f"\nmedian overhead: wall {wall:+.1%}, CPU {cpu:+.1%}")
        print(f"store: {metrics['bytes_per_token']:.1f} bytes/token, mass covered {metrics['mass_covered']:.4f}, "
              f"kept {metrics['mass_kept']:.4f} in {metrics['mean_kept_k']:.1f} ids, KL(decoded ‖ exact) "
              f"{metrics['kl_decoded_vs_exact']:.2e}, KL(exact ‖ decoded) {metrics['kl_exact_vs_decoded']:.2e} (sampled positions)")
        bare = float(np.median([bt for bt, _, _, _ in rounds]))

        if args.save_topk:
            save_cache(args.save_topk, kept, chunks.vocab_size)
        print_codec_table(kept, chunks.vocab_size, chunks.seq_len, args.sweep, args.k)
        n_kl = min(4, len(order))
        print(f"\n## What a store misses of the teacher's whole softmax ({n_kl} chunks, {n_kl * chunks.seq_len:,} positions)\n")
        print("D_KL(teacher softmax ‖ store), the store's left-out mass spread evenly over the ids it does not list.\n")
        print("| encoding | k | mean | median |\n|---|---|---|---|")
        for r in full_vocab_kl(model, chunks, order, args.k, n_kl):
            print(f"| {r['encoding']} | {r['k']} | {r['kl_mean']:.4f} | {r['kl_median']:.4f} |")

        s = store.LogitStore(out)
        t0 = time.perf_counter()
        n = sum(c.ids.shape[0] for c in s.stream())
        seq_tps = n / (time.perf_counter() - t0)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        picks = rng.permutation(len(s))
        n = sum(s[int(i)].ids.shape[0] for i in picks)
        rnd_tps = n / (time.perf_counter() - t0)
        print("\n## Read throughput (compact, k=256, decoded to torch tensors)\n")
        print("| reader | tokens/s | x teacher forward |\n|---|---|---|")
        print(f"| stream() sequential, prefetch thread | {seq_tps:,.0f} | {seq_tps / bare:.0f}x |")
        print(f"| store[i] random access | {rnd_tps:,.0f} | {rnd_tps / bare:.0f}x |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
