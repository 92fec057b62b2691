"""Benchmark: the paper's quantization ablation (Fig. 4 and Fig. 5) on a distilled demo student.

Builds (and caches under ``--work``; every step is a famex stage that skips itself when done) a
real if small LM: ``famex data --demo``, the default teacher's top-k logits over train and val
(``famex logits``), ``famex distill --student demo-apertus-s`` with checkpoints, and ``famex
average`` of the final model with the last two checkpoints. Then, for each format (int2 / int3 /
int4 / int6 weight-only, fp8 / nvfp4 weights + activations) and each of RTN, GPTQ (act-order,
static groups) and QAD (``famex quantize --method qad`` from its RTN start, KL to the stored
teacher logits), with and without norm fusion, it measures the validation loss (next-token CE on
the val split, `validate_chunks`) and reports its increase over the unquantized model. The same
again on the weight-averaged student, each gap against the averaged model's own unquantized loss
(paper: averaging shrinks the gap of RTN up to 10%, GPTQ ≈2%, QAD ≈0%).

Prints Markdown tables and the winning combination per format; ``--json`` keeps the raw figures
(written after every variant, and read back so that a rerun skips variants already measured).

Usage (about 30-40 minutes on 2 busy CPU cores; run it in the background):
    nohup .venv/bin/python bench/quant_ablation.py --work /tmp/famex-ablation > ablation.md 2> ablation.log &
Options: --max-tokens 60000 --distill-iters 120 --qad-iters 20 --qad-batch 4 [--qad-lr LR]
    --formats int2,int3,int4,int6,fp8,nvfp4 --methods rtn,gptq,qad --no-averaging --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from famex.data.packing import PackedChunks
from famex.distill.train import open_store, validate_chunks
from famex.quant import parse_format, quantize_model

NAMES = {"rtn": "RTN", "gptq": "GPTQ", "qad": "QAD"}


def build_student(work: Path, args) -> dict[str, Path]:
    """data → logits (train, val) → distill → average; each a famex stage that is skipped when complete."""
    from famex.data.prepare import DataConfig, prepare
    from famex.distill.average import AverageConfig, average
    from famex.distill.train import DistillConfig, distill
    from famex.distill.trainer import checkpoint_dirs
    from famex.teacher.generate import LogitsConfig, generate

    paths = {k: work / k for k in ("data", "logits-train", "logits-val", "student", "average")}
    t0 = time.perf_counter()
    prepare(DataConfig(demo=True, max_tokens=args.max_tokens, seq_len=args.seq_len, val_fraction=args.val_fraction,
                       out=str(paths["data"]), workers=1))
    for split in ("train", "val"):
        generate(LogitsConfig(teacher="default", data=str(paths["data"]), split=split, top_k=args.k,
                              out=str(paths[f"logits-{split}"]), workers=1))
    log(f"data + logits ready ({time.perf_counter() - t0:.0f}s)")
    save_every = max(1, args.distill_iters // 6)
    distill(DistillConfig(student=args.student, data=str(paths["data"]), logits=str(paths["logits-train"]),
                          val_logits=str(paths["logits-val"]), out=str(paths["student"]), iters=args.distill_iters,
                          lr=args.distill_lr, global_batch=args.distill_batch, micro_batch=args.distill_batch,
                          save_every=save_every, keep_last=3, eval_every=0, log_every=10))
    log(f"student ready ({time.perf_counter() - t0:.0f}s): {json.loads((paths['student'] / 'metrics.json').read_text())}")
    if args.averaging:
        last = [p for _, p in checkpoint_dirs(paths["student"])][-2:]
        average(AverageConfig(checkpoints=[str(p) for p in last] + [str(paths["student"])], out=str(paths["average"])))
    return paths


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Evaluator:
    def __init__(self, paths: dict[str, Path]):
        self.val = PackedChunks(paths["data"], "val")
        self.store = open_store(str(paths["logits-val"]), self.val, "val store")

    def __call__(self, model) -> dict[str, float]:
        r = validate_chunks(model, self.val, self.store, 0, 1)
        return {"val_loss": r["ce"], "val_kl": r["kl"]}


def run_variant(source: Path, fmt_name: str, method: str, nf: bool, paths, calib, ev: Evaluator, work: Path, args) -> dict:
    from famex.models import load_model

    fmt = parse_format(fmt_name)
    t0 = time.perf_counter()
    if method == "qad":
        from famex.quant.stage import QuantizeConfig, quantize_stage

        out = work / "qad" / f"{source.name}-{fmt.name}{'-nf' if nf else ''}"
        cfg = QuantizeConfig(method="qad", model=str(source), format=fmt.name, norm_fusion=nf, data=str(paths["data"]),
                             logits=str(paths["logits-train"]), val_logits=str(paths["logits-val"]), out=str(out),
                             iters=args.qad_iters, global_batch=args.qad_batch, micro_batch=args.qad_batch,
                             lr=args.qad_lr, save_every=0, eval_every=0, log_every=5, calib_tokens=args.calib_tokens)
        cfg.validate()
        quantize_stage(cfg)
        m = json.loads((out / "metrics.json").read_text())
        row = {"val_loss": m["val_ce"], "val_kl": m["val_kl"], "start_val_loss": m.get("start_val_ce"),
               "lr": json.loads((out / "meta.json").read_text())["lr"]}
    else:
        model = load_model(source)
        quantize_model(model, fmt, method, calib, norm_fusion=nf, act_order=method == "gptq")
        row = ev(model)
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/famex-quant-ablation"), help="cache of the student and QAD runs")
    p.add_argument("--max-tokens", type=int, default=60_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--k", type=int, default=64, help="teacher top-k stored")
    p.add_argument("--student", default="demo-apertus-s")
    p.add_argument("--distill-iters", type=int, default=120)
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument("--distill-lr", type=float, default=3e-3)
    p.add_argument("--formats", default="int2,int3,int4,int6,fp8,nvfp4")
    p.add_argument("--methods", default="rtn,gptq,qad")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--qad-iters", type=int, default=20)
    p.add_argument("--qad-batch", type=int, default=4)
    p.add_argument("--qad-lr", type=float, default=None, help="default: a tenth of --distill-lr (famex quantize's default)")
    p.add_argument("--no-averaging", dest="averaging", action="store_false")
    p.add_argument("--threads", type=int, default=1, help="2 spinning threads on a busy 2-core machine are many times slower")
    p.add_argument("--json", type=Path, default=None, help="raw figures (default: WORK/results.json)")
    args = p.parse_args(argv)
    # famex quantize's default for a distill output; spelled out so the averaged model (an average
    # stage, whose meta.json has no LR) gets the same.
    args.qad_lr = args.qad_lr or args.distill_lr / 10
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.work / "results.json"
    saved = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results: dict[str, dict] = saved.get("results", {})

    from famex.models import load_model
    from famex.quant.stage import calibration_batches

    t_start = time.perf_counter()
    paths = build_student(args.work, args)
    ev = Evaluator(paths)
    calib = calibration_batches(PackedChunks(paths["data"], "train"), args.calib_tokens, seed=0)
    sources = ["student"] + (["average"] if args.averaging else [])
    formats = [parse_format(f).name for f in args.formats.split(",")]
    methods = args.methods.split(",")
    base = {}
    for src in sources:
        base[src] = ev(load_model(paths[src]))
        log(f"{src}: unquantized val loss {base[src]['val_loss']:.4f}, KL to teacher {base[src]['val_kl']:.4f}")

    def save():
        json_path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "unquantized": base,
                                         "results": results}, indent=2))

    for src in sources:
        for fmt in formats:
            for method in methods:
                for nf in (False, True):
                    key = f"{src}|{fmt}|{method}|{int(nf)}"
                    if key in results:
                        continue
                    row = run_variant(paths[src], fmt, method, nf, paths, calib, ev, args.work, args)
                    row["delta"] = row["val_loss"] - base[src]["val_loss"]
                    results[key] = row
                    save()
                    log(f"{src:8s} {fmt:6s} {method:4s}{'+nf' if nf else '   '} Δloss {row['delta']:+.4f} "
                        f"KL {row['val_kl']:.4f} ({row['seconds']:.0f}s)")
    save()
    report(args, paths, base, results, sources, formats, methods, time.perf_counter() - t_start)
    return 0


def report(args, paths, base, results, sources, formats, methods, seconds) -> None:
    student = json.loads((paths["student"] / "metrics.json").read_text())
    val = PackedChunks(paths["data"], "val")
    print(f"Student: {args.student} distilled from the default teacher (SmolLM2-135M-Instruct, top-{args.k} logits) for "
          f"{args.distill_iters} steps × {args.distill_batch} × {args.seq_len} tokens on `famex data --demo --max-tokens "
          f"{args.max_tokens}`; validation: {len(val)} chunks ({len(val) * args.seq_len} tokens). Unquantized val loss "
          f"{base['student']['val_loss']:.4f} (KL to the teacher {base['student']['val_kl']:.4f})"
          + (f"; averaged (final + last 2 checkpoints) {base['average']['val_loss']:.4f}" if "average" in base else "")
          + f". QAD: {args.qad_iters} steps × {args.qad_batch} × {args.seq_len} tokens, AdamW + cosine, RTN start, "
          f"KL (bucket tail) to the stored logits. GPTQ: act-order, static groups, {args.calib_tokens} calibration tokens. "
          f"Total {seconds / 60:.1f} min. (distill train loss {student.get('train_loss', float('nan')):.3f})\n")
    cols = [(m, nf) for m in methods for nf in (False, True)]
    print("Validation-loss increase over the unquantized student (lower is better; **bold** = best per format):\n")
    print("| format | " + " | ".join(f"{NAMES[m]}{' + NF' if nf else ''}" for m, nf in cols) + " | winner |")
    print("|---|" + "---:|" * len(cols) + "---|")
    for fmt in formats:
        cells = {c: results.get(f"student|{fmt}|{c[0]}|{int(c[1])}") for c in cols}
        best = min((c for c in cols if cells[c]), key=lambda c: cells[c]["delta"])
        txt = [("**{:+.4f}**" if c == best else "{:+.4f}").format(cells[c]["delta"]) if cells[c] else "—" for c in cols]
        print(f"| {fmt} | " + " | ".join(txt) + f" | {NAMES[best[0]]}{' + NF' if best[1] else ''} |")
    print("\nNorm fusion, per method: Δ loss with NF − without (negative = NF helps):\n")
    print("| format | " + " | ".join(NAMES[m] for m in methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for fmt in formats:
        diffs = []
        for m in methods:
            a, b = results.get(f"student|{fmt}|{m}|0"), results.get(f"student|{fmt}|{m}|1")
            diffs.append(f"{b['delta'] - a['delta']:+.4f}" if a and b else "—")
        print(f"| {fmt} | " + " | ".join(diffs) + " |")
    if "qad" in methods:
        print("\nQAD against its RTN start (val loss increase before → after QAD; KL to the teacher after):\n")
        print("| format | NF | RTN start Δ | QAD Δ | QAD KL | lr |")
        print("|---|---|---:|---:|---:|---:|")
        for fmt in formats:
            for nf in (0, 1):
                r = results.get(f"student|{fmt}|qad|{nf}")
                if r and r.get("start_val_loss") is not None:
                    print(f"| {fmt} | {'yes' if nf else 'no'} | {r['start_val_loss'] - base['student']['val_loss']:+.4f} | "
                          f"{r['delta']:+.4f} | {r['val_kl']:.4f} | {r['lr']:g} |")
    if "average" in sources:
        print("\nWeight averaging (final model + last two checkpoints): each gap against its own unquantized loss; "
              "change = (gap with averaging − gap without) / gap without (negative = averaging helps):\n")
        print("| format | method | gap, last | gap, averaged | change |")
        print("|---|---|---:|---:|---:|")
        for fmt in formats:
            for m in methods:
                for nf in (0, 1):
                    a, b = results.get(f"student|{fmt}|{m}|{nf}"), results.get(f"average|{fmt}|{m}|{nf}")
                    if a and b:
                        change = (b["delta"] - a["delta"]) / abs(a["delta"]) if a["delta"] else float("nan")
                        print(f"| {fmt} | {NAMES[m]}{' + NF' if nf else ''} | {a['delta']:+.4f} | {b['delta']:+.4f} | {change:+.0%} |")


if __name__ == "__main__":
    raise SystemExit(main())
