"""Benchmark: does distillation beat plain cross-entropy at demo scale?

Trains the same student (same init seed, same chunks in the same order, same steps and LR) twice:
distilled from the default teacher's stored top-k (0.9 KL + 0.1 CE) and with CE alone. Prints the
validation CE of both at every evaluation and writes the curves to WORK/kd_vs_ce.png. Stages are the
real ones (famex data / logits / distill), cached under --work, so a rerun only redoes what changed.

    .venv/bin/python bench/kd_vs_ce.py [--work bench/out/kd] [--tokens 150000] [--iters 120] [--preset demo-apertus-s]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from famex.data.prepare import DataConfig, prepare
from famex.distill.train import DistillConfig, distill
from famex.teacher.generate import LogitsConfig, generate


def curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    return [(r["tokens"], r["val_ce"]) for r in rows if "val_ce" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="bench/out/kd")
    ap.add_argument("--tokens", type=int, default=150_000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--preset", default="demo-apertus-s")
    ap.add_argument("--iters", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)

    data = work / "data"
    prepare(DataConfig(demo=True, out=str(data), max_tokens=args.tokens, seq_len=args.seq_len, val_fraction=0.05))
    stores = {}
    for split in ("train", "val"):
        stores[split] = work / f"logits-{split}"
        generate(LogitsConfig(teacher="default", data=str(data), split=split, top_k=args.top_k, out=str(stores[split])))
    runs = {}
    for name, logits in (("kd", str(stores["train"])), ("ce", "none")):
        runs[name] = work / f"distill-{name}"
        distill(DistillConfig(
            student=args.preset, data=str(data), logits=logits, val_logits=str(stores["val"]), out=str(runs[name]),
            iters=args.iters, lr=args.lr, global_batch=args.batch, micro_batch=args.batch, seed=args.seed,
            eval_every=max(1, args.iters // 6), save_every=0, log_every=max(1, args.iters // 24),
        ))
    curves = {name: curve(path) for name, path in runs.items()}
    metrics = {name: json.loads((path / "metrics.json").read_text()) for name, path in runs.items()}
    data_metrics = json.loads((data / "metrics.json").read_text())
    epochs = args.iters * args.batch * args.seq_len / max(1, data_metrics["tokens_train"])
    print(f"student {args.preset}, {args.iters} steps × {args.batch} × {args.seq_len} tokens "
          f"({epochs:.2f} epochs of {data_metrics['tokens_train']:,} train tokens), teacher top-{args.top_k}")
    print("| tokens seen | val CE, distilled | val CE, CE only |\n|---|---|---|")
    for (t, kd), (_, ce) in zip(curves["kd"], curves["ce"]):
        print(f"| {t:,} | {kd:.4f} | {ce:.4f} |")
    kd, ce = metrics["kd"]["val_loss"], metrics["ce"]["val_loss"]
    verdict = "distillation wins" if kd < ce else "CE-only wins"
    print(f"\nfinal val CE: distilled {kd:.4f}, CE only {ce:.4f} ({kd - ce:+.4f}): {verdict}")
    if "val_kl" in metrics["kd"]:
        print(f"final val KL to the teacher: distilled {metrics['kd']['val_kl']:.4f}, CE only {metrics['ce'].get('val_kl', float('nan')):.4f}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, label in (("kd", "distilled (0.9 KL + 0.1 CE)"), ("ce", "CE only")):
        xs, ys = zip(*curves[name])
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation CE (nats/token)")
    ax.set_title(f"{args.preset}: distillation vs CE only")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "kd_vs_ce.png", dpi=120)
    print(f"curves: {work / 'kd_vs_ce.png'}")


if __name__ == "__main__":
    main()
