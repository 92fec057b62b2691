"""Benchmark: one QAD optimizer step against one plain distillation step of the same model, in one run.

Both steps are what `famex.distill.trainer.train` does per micro-batch, minus the bookkeeping:
forward through the model, the sparse-KL loss (`packed_loss`, KL weight 1 as in QAD), backward,
gradient clipping and an AdamW step. The QAD model is the same model with every block linear
fake-quantized (`famex.quant.qad.attach_fake_quant`, fixed RTN scales; W+A formats also quantize
the linear inputs). Steps alternate plain / QAD / plain / ... so a busy machine slows both alike;
the figures are medians of process CPU time (the wall clock is printed beside it).

The overhead is a cost per weight (the fake quantization of every linear, forward and backward)
against a cost per token (the matmuls), so it shrinks as the micro-batch grows: at the paper's
micro-batches of thousands of tokens per rank it is smaller than on this CPU. The target is
QAD ≤ 1.15× the plain step.

Usage:
    .venv/bin/python bench/qad.py [--model demo-apertus-s | default | MODEL_DIR] [--formats int4,int2,fp8,nvfp4]
        [--batch 4] [--seq 256] [--k 64] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from famex.distill.train import packed_loss
from famex.quant import parse_format, quantize_model
from famex.quant.model import detach_activation_quant
from famex.quant.qad import attach_fake_quant

VOCAB = 49152


def load(spec: str):
    from famex.models import PRESETS, build_student, load_model

    if spec in PRESETS:
        return build_student(spec, VOCAB, seed=0)
    return load_model(spec)


def synthetic_batch(batch: int, seq: int, k: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows of three documents each, with a teacher top-k per position (ids distinct, probs summing below 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    seg = torch.zeros(batch, seq, dtype=torch.long)
    seg[:, seq // 3:] += 1
    seg[:, 2 * seq // 3:] += 1
    pos = torch.cat([torch.arange(n) for n in (seq // 3, 2 * seq // 3 - seq // 3, seq - 2 * seq // 3)]).expand(batch, seq).clone()
    labels = torch.where(torch.cat([seg[:, 1:] == seg[:, :-1], torch.ones(batch, 1, dtype=torch.bool)], 1), ids[:, 1:], -100)
    logits = torch.randn(batch, seq, vocab, generator=g) * 3
    top = logits.softmax(-1).topk(k, dim=-1)
    return {"input_ids": ids[:, :-1], "labels": labels, "position_ids": pos, "segment_ids": seg,
            "teacher_ids": top.indices, "teacher_probs": top.values}


def make_step(model, lr: float = 1e-5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        out = packed_loss(model, batch, 1024, kl_weight=1.0, tail="bucket")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        return float(out.loss.detach())

    return step


def timed(fn, batch) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn(batch)
    return time.process_time() - c, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo-apertus-s", help="a preset (random init), 'default' (the 135M teacher) or a model directory")
    p.add_argument("--formats", default="int4,int2,fp8,nvfp4")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="2 spinning threads on a busy 2-core machine are many times slower")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = load(args.model)
    base.train()
    vocab = base.config.vocab_size
    batch = synthetic_batch(args.batch, args.seq, args.k, vocab)
    calib = [{k: batch[k] for k in ("input_ids", "position_ids")}]
    n_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, {base.config.num_hidden_layers} layers; micro-batch "
          f"{args.batch}×{args.seq} = {args.batch * args.seq} tokens, top-{args.k}; {args.threads} threads", file=sys.stderr)

    rows = []
    for name in args.formats.split(","):
        fmt = parse_format(name)
        plain = copy.deepcopy(base)
        qad = copy.deepcopy(base)
        result = quantize_model(qad, fmt, "rtn", calib if fmt.activations == "nvfp4" else None)
        detach_activation_quant(qad)
        attach_fake_quant(qad, fmt, result.qparams, result.activation_modules)
        qad.train()
        steps = {"plain": make_step(plain), "qad": make_step(qad)}
        for fn in steps.values():  # warm-up: allocator, first-call overheads
            fn(batch)
        cpu = {k: [] for k in steps}
        wall = {k: [] for k in steps}
        for _ in range(args.reps):
            for key, fn in steps.items():
                c, w = timed(fn, batch)
                cpu[key].append(c)
                wall[key].append(w)
        row = {"format": fmt.name, **{f"{k}_cpu": statistics.median(v) for k, v in cpu.items()},
               **{f"{k}_wall": statistics.median(v) for k, v in wall.items()}}
        row["ratio_cpu"] = row["qad_cpu"] / row["plain_cpu"]
        row["ratio_wall"] = row["qad_wall"] / row["plain_wall"]
        rows.append(row)
        print(f"{fmt.name:8s} plain {row['plain_cpu']:.3f}s  qad {row['qad_cpu']:.3f}s  ×{row['ratio_cpu']:.3f} (CPU); "
              f"wall ×{row['ratio_wall']:.3f}", file=sys.stderr)
        del plain, qad

    print(f"\nQAD step vs plain distillation step, {args.model}, micro-batch {args.batch}×{args.seq} tokens, "
          f"{args.threads} threads, median of {args.reps} alternating steps (CPU = process CPU seconds):\n")
    print("| format | plain step CPU s | QAD step CPU s | QAD / plain (CPU) | QAD / plain (wall) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['plain_cpu']:.3f} | {r['qad_cpu']:.3f} | {r['ratio_cpu']:.3f}× | {r['ratio_wall']:.3f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
