"""Benchmark: `famex data` in one process vs split across torchrun ranks (`--shard` parts), same inputs.

The demo corpus repeated ``--repeat`` times, written as ``--files`` JSONL files; one run with one
tokenizer worker in one process, one run under ``torchrun --nproc-per-node 2`` (one worker per rank),
each timed from the command's start to its end (start-up, tokenizing, writing, merging). Checks that
the two directories hold byte-identical shards. Usage:

    .venv/bin/python bench/data_parts.py [--repeat 8] [--files 8]
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

from famex.data.demo import demo_documents
from famex.models import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--files", type=int, default=8)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="famex-dataparts-"))
    try:
        docs = list(demo_documents())
        inputs = []
        for i in range(args.files):
            path = tmp / f"in-{i:03d}.jsonl"
            with open(path, "w") as f:
                for r in range(args.repeat):
                    for d in docs[i::args.files]:
                        f.write(json.dumps({"text": f"{d} ({r})"}) + "\n")
            inputs.append(str(path))
        load_tokenizer("default").save_pretrained(tmp / "tok")
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "FAMEX_QUIET": "1"}
        common = ["-m", "famex", "data", "--input", *inputs, "--tokenizer", str(tmp / "tok"), "--workers", "1",
                  "--val-fraction", "0.01", "--segment-tokens", "262144"]
        rows = []
        for name, prefix, cores in (("1 process, 1 worker", [], 1),
                                    ("torchrun, 2 ranks × 1 worker", ["-m", "torch.distributed.run", "--standalone",
                                                                       "--nproc-per-node", "2"], 2)):
            out = tmp / name.split(",")[0].replace(" ", "-")
            cmd = [sys.executable, *prefix, *common, "--out", str(out)]  # torchrun takes the same `-m famex ...`
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - t0
            tokens = json.loads((out / "metrics.json").read_text())["tokens"]
            rows.append((name, out, tokens, seconds, cores))
        a, b = rows[0][1], rows[1][1]
        same = all((a / p.relative_to(a)).read_bytes() == (b / p.relative_to(a)).read_bytes()
                   for p in a.rglob("*.npy"))
        print("| run | tokens | seconds | tokens/s | tokens/s per core |\n|---|---:|---:|---:|---:|")
        for name, _, tokens, seconds, cores in rows:
            print(f"| {name} | {tokens:,} | {seconds:.1f} | {tokens / seconds:,.0f} | {tokens / seconds / cores:,.0f} |")
        print(f"\nspeed-up 2 ranks / 1 process: {rows[0][3] / rows[1][3]:.2f}x; shards byte-identical: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
