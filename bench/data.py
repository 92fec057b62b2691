"""Benchmark: `famex data` tokens/s against a plain single-process loop over the same tokenizer.

Both run in this one process tree on the same documents (the demo corpus), one after the other, so the
ratio is measured side by side. Usage:

    .venv/bin/python bench/data.py [--docs 4000] [--workers 0]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from famex.data.demo import demo_documents
from famex.data.prepare import DataConfig, prepare
from famex.models import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=0, help="0 = one per core")
    args = ap.parse_args()

    docs = [d for _, d in zip(range(args.docs), demo_documents())]
    tmp = Path(tempfile.mkdtemp())
    try:
        import json

        src = tmp / "docs.jsonl"
        with open(src, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        tok = load_tokenizer("default")
        tok.save_pretrained(tmp / "tok")

        t0 = time.perf_counter()
        n_loop = 0
        for d in docs:  # the obvious baseline: one process, one document at a time
            n_loop += len(tok(d)["input_ids"]) + 1
        loop_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        prepare(DataConfig(input=[str(src)], out=str(tmp / "out"), tokenizer=str(tmp / "tok"), workers=args.workers,
                           val_fraction=0.01))
        famex_s = time.perf_counter() - t0
        meta = json.loads((tmp / "out" / "metrics.json").read_text())
        n_famex = meta["tokens"]
        assert n_famex == n_loop, (n_famex, n_loop)
        print(f"| method | tokens | seconds | tokens/s |\n|---|---|---|---|")
        print(f"| single-process loop | {n_loop:,} | {loop_s:.2f} | {n_loop / loop_s:,.0f} |")
        print(f"| famex data (workers={meta['workers']}, incl. start-up and writing) | {n_famex:,} | {famex_s:.2f} | {n_famex / famex_s:,.0f} |")
        print(f"\nratio famex / loop: {loop_s / famex_s:.2f}x")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
