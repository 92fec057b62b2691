"""Benchmark: few-shot items/s of famex's scoring engine against lm-eval's plain HF backend.

Both engines score the same items of one task with the same model in this one process, one after
the other (``--repeats`` alternating rounds, best time kept), through `evaluate_fewshot`; the
prompts, few-shot examples and metrics are lm-eval's in both, only the model loop differs
(`famex.eval.engine`). Printed: items/s of each, their ratio, the largest per-item log-likelihood
difference and whether the accuracies agree, then a plain forward's tokens/s for scale. Usage:

    .venv/bin/python bench/eval.py [--model default|tiny-apertus|demo-apertus-s|DIR] [--task arc_easy]
                                   [--limit 100] [--shots 0] [--batch-size 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("FAMEX_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load(spec: str):
    from famex.models import PRESETS, build_student, load_teacher, load_tokenizer

    if spec in PRESETS:  # a random student of that shape with the default teacher's vocabulary
        tok = load_tokenizer("default")
        return build_student(spec, len(tok), tok).eval(), tok
    return load_teacher(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default' teacher, a preset (random weights), or a model dir")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--engines", default="famex,hflm")
    args = ap.parse_args()

    import torch
    import transformers

    from famex.eval.fewshot import evaluate_fewshot

    transformers.utils.logging.disable_progress_bar()
    from famex.eval.footprint import throughput

    model, tok = load(args.model)
    engines = args.engines.split(",")
    best: dict[str, float] = {}
    runs: dict[str, dict] = {}
    for _ in range(args.repeats):
        for engine in engines:
            res = evaluate_fewshot(model, tok, [args.task], shots=args.shots, limit=args.limit,
                                   batch_size=args.batch_size, per_item=True, engine=engine)
            entry = res["tasks"][args.task]
            best[engine] = min(best.get(engine, float("inf")), entry["seconds"])
            runs[engine] = entry

    n = runs[engines[0]]["n"]
    print(f"model {args.model}, task {args.task}, {n} items, {args.shots}-shot, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| engine | seconds | items/s | acc | acc_norm |\n|---|---|---|---|---|")
    for engine in engines:
        e = runs[engine]
        print(f"| {engine} | {best[engine]:.1f} | {n / best[engine]:.2f} | {e['acc']:.4f} | {e.get('acc_norm') or float('nan'):.4f} |")
    if {"famex", "hflm"} <= set(engines):
        a, b = runs["famex"]["items"], runs["hflm"]["items"]
        diff = max(abs(x - y) for ia, ib in zip(a, b) for x, y in zip(ia["loglikelihoods"], ib["loglikelihoods"]))
        same = all(runs["famex"].get(m) == runs["hflm"].get(m) for m in ("acc", "acc_norm"))
        print(f"\nratio famex / hflm items/s: {best['hflm'] / best['famex']:.2f}x; "
              f"max |Δ log-likelihood| {diff:.2e}; accuracies identical: {same}")
    tps = throughput(model, seq_len=512, batch=1)
    print(f"plain forward, 1 x 512 tokens: {tps:,.0f} tokens/s")


if __name__ == "__main__":
    main()
