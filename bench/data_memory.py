"""Benchmark: resident memory of the data reader and of the trainer's data path, per rank, against
the split's size (goal: under 1 GiB per rank and flat in the token count).

Builds synthetic `famex data` directories on disk — a ladder of sizes, 10 tokens per document on
average (1e9 tokens = 1e8 documents), shards of 2^24 tokens as `famex data` writes them. Token
files are sparse (header + a hole: reads return token 0; memory does not depend on the values),
document-length files are real (random lengths). Then, for every size, a fresh process per rank
opens the split and measures its memory:

- reader: `PackedChunks` opened, 256 chunks read at positions of the trainer's chunk order;
- trainer data path: `DistillTask(...).micro_batches(step, rank, world=2, ...)` (CE objective: the
  chunk order is `ChunkOrder`) for 32 steps of 8 sequences of 4096 tokens, ranks 0 and 1.

Memory is read from /proc/self/status: VmHWM (peak resident), RssAnon (this process's own memory)
and RssFile (file pages mapped into it; page cache, shared and reclaimable). The same measurement
runs with the famex of another checkout as the baseline (``--baseline DIR``, e.g. /work/main at an
older commit), side by side. Usage:

    .venv/bin/python bench/data_memory.py [--tokens 1e7 1e8 1e9] [--baseline /path/to/old/checkout] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 4096
SHARD_TOKENS = 1 << 24
TOKENS_PER_DOC = 10


def build(out: Path, n_tokens: int, seed: int = 0) -> None:
    """A complete `famex data` directory of ``n_tokens`` train tokens (sparse token files)."""
    rng = np.random.default_rng(seed)
    (out / "train").mkdir(parents=True, exist_ok=True)
    shards, left, i = [], n_tokens, 0
    while left > 0:
        n = min(SHARD_TOKENS, left)
        docs = max(1, n // TOKENS_PER_DOC)
        cuts = np.sort(rng.choice(np.arange(1, n, dtype=np.int64), size=docs - 1, replace=False)) if docs > 1 else np.zeros(0, np.int64)
        lengths = np.diff(np.concatenate([[0], cuts, [n]])).astype(np.uint32)
        tok_name, doc_name = f"train/tokens-{i:05d}.npy", f"train/docs-{i:05d}.npy"
        with open(out / tok_name, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": (n,)})
            f.truncate(f.tell() + 2 * n)  # a hole: no disk blocks, reads return zeros
        np.save(out / doc_name, lengths)
        shards.append({"tokens_file": tok_name, "docs_file": doc_name, "tokens": n, "docs": int(len(lengths)),
                       "tokens_sha256": "", "docs_sha256": ""})
        left -= n
        i += 1
    splits = {"train": {"tokens": n_tokens, "docs": sum(s["docs"] for s in shards), "shards": shards},
              "val": {"tokens": 0, "docs": 0, "shards": []}}
    meta = {"stage": "data", "status": "complete", "config": {}, "inputs": {}, "splits": splits, "seq_len": SEQ,
            "tokenizer": {"hash": "synthetic", "vocab_size": 65536, "eos_token_id": 0}, "dtype": "uint16"}
    (out / "meta.json").write_text(json.dumps(meta))


PROBE = r"""
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
data, mode, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
import numpy as np, torch
from famex.data.packing import PackedChunks
before = status()
t0 = time.perf_counter()
chunks = PackedChunks(data, "train")
open_s = time.perf_counter() - t0
if mode == "reader":
    try:
        from famex.data.packing import ChunkOrder
        order = ChunkOrder(len(chunks), 0)
    except ImportError:  # an older famex: its permutation array
        from famex.data.packing import chunk_permutation
        order = chunk_permutation(len(chunks), 0)
    times = []
    for rep in range(2):  # cold (first touch of each shard), then warm
        t0 = time.perf_counter()
        for i in range(256):
            chunks[int(order[(i + 256 * rep) * 997 % len(chunks)])]
        times.append((time.perf_counter() - t0) / 256)
else:
    from famex.distill.train import DistillTask
    task = DistillTask(chunks, None, seed=0, kl_weight=0.0)
    times = []
    for rep in range(2):
        t0 = time.perf_counter()
        for step in range(32 * rep, 32 * rep + 32):
            task.micro_batches(step, rank, 2, 2, 2)
        times.append((time.perf_counter() - t0) / (32 * 4))
print(json.dumps({"before": before, "after": status(), "open_s": open_s, "s_per_chunk": times, "chunks": len(chunks)}))
"""


def probe(data: Path, mode: str, rank: int, famex_root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(famex_root), "OMP_NUM_THREADS": "1", "FAMEX_QUIET": "1"}
    # cwd elsewhere: `python -c` puts the working directory first on sys.path.
    r = subprocess.run([sys.executable, "-c", PROBE, str(data), mode, str(rank)], env=env, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def mib(x: int) -> str:
    return f"{x / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, nargs="+", default=[1e7, 1e8, 1e9])
    ap.add_argument("--baseline", type=Path, default=None, help="another famex checkout to measure side by side")
    ap.add_argument("--keep", type=Path, default=None, help="build the splits here and keep them")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    root = args.keep or Path(tempfile.mkdtemp(prefix="famex-datamem-"))
    impls = [("this", here)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    rows = []
    try:
        for n in args.tokens:
            n = int(n)
            data = root / f"split-{n:.0e}".replace("+", "")
            if not (data / "meta.json").is_file():
                t0 = time.perf_counter()
                build(data, n)
                print(f"built {data} ({n:,} tokens, {n // TOKENS_PER_DOC:,} documents) in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)
            for name, path in impls:
                for mode, rank in (("reader", 0), ("trainer", 0), ("trainer", 1)):
                    rows.append((n, name, mode, rank, probe(data, mode, rank, path)))
                    print(rows[-1], file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("| tokens | documents | famex | path | rank | RSS after imports MiB | peak RSS MiB | RssAnon MiB | RssFile MiB "
          "| open s | ms / chunk cold | ms / chunk warm |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, name, mode, rank, r in rows:
        if "error" in r:
            print(f"| {n:.0e} | {n // TOKENS_PER_DOC:.0e} | {name} | {mode} | {rank} | failed: {r['error'][:60]} | | | | | | |")
            continue
        a = r["after"]
        cold, warm = r["s_per_chunk"]
        print(f"| {n:.0e} | {n // TOKENS_PER_DOC:.0e} | {name} | {mode} | {rank} | {mib(r['before']['VmRSS'])} | "
              f"{mib(a['VmHWM'])} | {mib(a['RssAnon'])} | {mib(a['RssFile'])} | {r['open_s']:.2f} | {1e3 * cold:.2f} | "
              f"{1e3 * warm:.2f} |")


if __name__ == "__main__":
    main()
