"""Benchmark: does a student trained from a `compact` logit store learn as well as one from `paper`?

One run, on the default teacher (SmolLM2-135M-Instruct) and the demo corpus:

1. `famex data --demo` with a train and a val split;
2. `famex logits --encoding paper` over the train split (the exact fp32 top-k) and over the val
   split (the validation reference for KL-to-teacher);
3. the train store *transcoded* to `compact` (decoded from paper, encoded again with the compact
   defaults), so both stores hold the same chunks without a second teacher pass. The only
   difference from `famex logits --encoding compact` is the left-out mass the encoder starts
   from: ``1 - sum(fp32 probs)`` instead of the teacher's own sum over the other ids;
4. the same student (preset, steps, batch, learning rate) distilled from each store (paper,
   compact at the defaults, compact with fixed k) at each of ``--seeds`` seeds: the difference to
   paper at the same seed is the store's effect, the spread between seeds the noise to read it
   against;
5. val CE (next-token, labels) and val KL to the teacher (over the val store's top-k, the
   trainer's own validation) side by side.

Usage (about 10 minutes on 2 idle CPU cores with the defaults: 9 students of ~40 s, the teacher stores ~2 min):

    .venv/bin/python bench/store_quality.py [--max-tokens 24000] [--top-k 64] [--iters 100] [--seeds 2] [--eval-every 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from famex.data.prepare import DataConfig, prepare
from famex.distill.train import DistillConfig, distill
from famex.teacher import codec, store
from famex.teacher.generate import LogitsConfig, generate


def transcode(src: Path, out: Path, *, kl_target: float, drop_below: float) -> dict:
    """Write ``src`` (a paper store) again as a compact store in ``out``: same chunks, order and shards."""
    s = store.LogitStore(src)
    m = s.manifest
    keys = [k for k in m if k not in ("format", "format_version", "chunks", "tokens", "bytes", "permutation", "shards", "store_id")]
    params = {k: m[k] for k in keys}
    params.update(encoding="compact", kl_target=kl_target, drop_below=drop_below)
    params["store_id"] = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    out.mkdir(parents=True)
    entries = []
    for si, shard in enumerate(m["shards"]):
        a, b = shard["positions"]
        chunks = []
        for c in s.stream(a, b):
            # paper lists every id; its left-out mass is 1 - sum(fp32 probs), clipped at 0
            chunks.append(store.ChunkLogits(c.data_index, c.token_ids.numpy(), c.ids.numpy(), c.probs.numpy(),
                                            c.mass_left.double().numpy()))
        data = store.encode_shard(chunks, shard=si, position_start=a, encoding="compact", vocab_size=s.vocab_size, k=s.k,
                                  seq_len=s.seq_len, kl_target=kl_target, drop_below=drop_below,
                                  store_id=params["store_id"])
        entries.append(store.write_shard(out, data, si))
    return store.write_manifest(out, params, s.permutation, entries)


def store_figures(path: Path) -> dict:
    m = store.LogitStore(path).manifest
    stats = [s["stats"] for s in m["shards"]]
    n = sum(s["kl_positions"] for s in stats)

    def mean(key: str) -> float:
        return sum(s[key] * s["kl_positions"] for s in stats) / n

    return {"bytes_per_token": m["bytes"] / m["tokens"], "kl_decoded_vs_exact": mean("kl_decoded_vs_exact"),
            "kl_exact_vs_decoded": mean("kl_exact_vs_decoded"), "kl_decoded_vs_top_k": mean("kl_decoded_vs_top_k"),
            "mean_kept_k": mean("mean_kept_k"), "mass_kept": mean("mass_kept"), "mass_covered": mean("mass_covered")}


def val_curve(log: Path) -> dict[int, tuple[float, float]]:
    """Step -> (val CE, val KL) from a distill log.jsonl."""
    out = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if "val_ce" in r:
            out[r["step"]] = (r["val_ce"], r.get("val_kl", float("nan")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=24000, help="demo corpus tokens (train + val)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--student", default="tiny-apertus")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=2, help="student seeds per store (the spread between seeds is the noise)")
    ap.add_argument("--eval-every", type=int, default=0, help="also validate every N steps and print the curves")
    ap.add_argument("--kl-target", type=float, default=codec.DEFAULT_KL_TARGET)
    ap.add_argument("--drop-below", type=float, default=codec.DEFAULT_DROP_BELOW)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--keep", help="keep the work directory here instead of a temp dir (reruns reuse finished stages)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="famex-bench-store-quality-"))
    try:
        t0 = time.perf_counter()
        data = work / "data"
        prepare(DataConfig(demo=True, out=str(data), tokenizer=args.teacher, seq_len=args.seq_len,
                           val_fraction=args.val_fraction, max_tokens=args.max_tokens, workers=1))
        stores = {}
        for split in ("train", "val"):
            cfg = LogitsConfig(teacher=args.teacher, data=str(data), out=str(work / f"paper-{split}"), split=split,
                               top_k=args.top_k, encoding="paper")
            cfg.validate()
            stores[split] = generate(cfg)
        t_teacher = time.perf_counter() - t0
        # Named by the encoder settings, so a kept work directory serves several of them.
        arms = {"paper": stores["train"]}
        for name, drop_below in (("compact", args.drop_below), ("compact, fixed k", 0.0)):
            path = work / f"compact-train-kl{args.kl_target:g}-drop{drop_below:g}"
            if not (path / store.MANIFEST).is_file():
                shutil.rmtree(path, ignore_errors=True)
                transcode(stores["train"], path, kl_target=args.kl_target, drop_below=drop_below)
            arms[name] = path

        results = {}
        for seed in range(args.seeds):
            for name, logits in arms.items():
                # named by what decides the weights, so a kept work directory serves several settings
                out = work / f"student-{args.student}-{args.iters}x{args.global_batch}-lr{args.lr:g}-{logits.name}-seed{seed}"
                cfg = DistillConfig(student=args.student, data=str(data), logits=str(logits), val_logits=str(stores["val"]),
                                    out=str(out), iters=args.iters, global_batch=args.global_batch, micro_batch=args.global_batch,
                                    lr=args.lr, seed=seed, save_every=0, eval_every=args.eval_every, log_every=10)
                cfg.validate()
                t1 = time.perf_counter()
                distill(cfg)
                results[name, seed] = {**json.loads((out / "metrics.json").read_text()), "seconds": time.perf_counter() - t1,
                                       "curve": val_curve(out / "log.jsonl")}

        train_tokens = store.LogitStore(stores["train"]).tokens
        val_tokens = store.LogitStore(stores["val"]).tokens
        print(f"\n## Students from paper vs compact stores ({args.student}, k = {args.top_k}, "
              f"{train_tokens:,} train / {val_tokens:,} val tokens, {args.iters} steps x {args.global_batch} x {args.seq_len})\n")
        print("| store | bytes/token | KL(decoded ‖ exact) | KL(exact ‖ decoded) | KL(decoded ‖ top-k) | mass covered | mass kept | mean kept k |")
        print("|---|---|---|---|---|---|---|---|")
        for name, path in arms.items():
            f = store_figures(path)
            print(f"| {name} | {f['bytes_per_token']:.1f} | {f['kl_decoded_vs_exact']:.2e} | {f['kl_exact_vs_decoded']:.2e} | "
                  f"{f['kl_decoded_vs_top_k']:.2e} | {f['mass_covered']:.4f} | {f['mass_kept']:.4f} | {f['mean_kept_k']:.1f} |")
        print("\n| student trained from | seed | train loss | val CE | val KL to teacher (top-k) | val CE − paper (same seed) | val KL − paper |")
        print("|---|---|---|---|---|---|---|")
        for (name, seed), r in results.items():
            p = results["paper", seed]
            print(f"| {name} | {seed} | {r['train_loss']:.4f} | {r['val_ce']:.4f} | {r['val_kl']:.4f} | "
                  f"{r['val_ce'] - p['val_ce']:+.4f} | {r['val_kl'] - p['val_kl']:+.4f} |")
        for name in arms:
            if name != "paper":
                d = [results[name, s]["val_ce"] - results["paper", s]["val_ce"] for s in range(args.seeds)]
                print(f"\n{name} − paper, val CE over {args.seeds} seeds: mean {np.mean(d):+.4f} (each: {', '.join(f'{x:+.4f}' for x in d)})")
        if args.seeds > 1:
            spread = [results["paper", s]["val_ce"] - results["paper", 0]["val_ce"] for s in range(1, args.seeds)]
            print(f"paper seed s − seed 0 (noise), val CE: {', '.join(f'{x:+.4f}' for x in spread)}")
        if args.eval_every:
            names = [n for n in arms if n != "paper"]
            print("\n| step | seed | val CE paper | " + " | ".join(f"Δ {n}" for n in names) + " |")
            print("|---|---|---|" + "---|" * len(names))
            for seed in range(args.seeds):
                curve = results["paper", seed]["curve"]
                for step in sorted(curve):
                    deltas = [results[n, seed]["curve"].get(step) for n in names]
                    if any(x is None for x in deltas):
                        continue
                    print(f"| {step} | {seed} | {curve[step][0]:.4f} | " + " | ".join(f"{x[0] - curve[step][0]:+.4f}" for x in deltas) + " |")
        seconds = sum(r["seconds"] for r in results.values())
        print(f"\nteacher stores {t_teacher:.0f} s; {len(results)} students {seconds:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
