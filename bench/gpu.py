"""The GPU benchmark of issue 17: one script, one device, the figures the recipe's speed rests on.

    bench/gpu.sh            # on one H100 (≤ 8 minutes): apertus-v1.1-0.5b shape, T = 4096
    bench/gpu.sh --toy      # on CPU at a toy shape (tests/test_bench_gpu.py runs it: it cannot rot)

Prints, measured side by side in one process (steps of the variants alternate, so drift hits all):

- distill step tokens/s and MFU (model FLOPs / the card's peak dense bf16) with KD (0.9 KL over a
  top-k teacher row + 0.1 CE) and CE only — their ratio (goal ≤ 1.05×);
- the default attention kernel (`--attn auto`: flex with a document BlockMask on CUDA) against SDPA
  with the dense [B,1,T,T] mask — their ratio; peak memory of each;
- teacher-logit generation (forward + fp32 softmax + top-k, `famex.teacher.generate.topk_of_logits`)
  tokens/s and its overhead over the bare forward (goal ≤ 5%);
- GPTQ int4 wall time for the shape (`famex quantize --device`: block by block on the device);
- a QAD step (int4 fake-quant weights, straight-through) over a distill step.

MFU counts 6 × (matmul parameters, lm_head included) + 6 × layers × T × hidden per token (causal
attention, forward and backward) against `--peak-tflops` (989: H100 SXM dense bf16). On CPU it
prints no MFU. What this script does not do: multi-GPU, or the real teacher's 8B forward.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time

import torch

from famex.data.packing import model_inputs
from famex.distill.optim import AdEMAMix
from famex.distill.train import packed_loss
from famex.models import PRESETS, preset_config, resolve_attn
from famex.teacher.generate import topk_of_logits


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def packed_batch(B: int, T: int, V: int, k: int, docs: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens in ``docs`` packed documents per row, with a Zipf-like top-k teacher row per position."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    seg = (torch.arange(T) * docs // T).expand(B, T).contiguous()
    starts = torch.searchsorted(seg[0], torch.arange(docs))
    pos = (torch.arange(T) - starts[seg[0]]).expand(B, T).contiguous()
    tprobs = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    tprobs = (0.95 * tprobs / tprobs.sum()).expand(B, T, k).contiguous()
    tids = torch.randint(0, V, (B, T, k), generator=g)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": pos, "segment_ids": seg,
             "teacher_ids": tids, "teacher_probs": tprobs}
    return {key: v.to(device) for key, v in batch.items()}


def model_flops_per_token(model, T: int) -> float:
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6.0 * matmul + 6.0 * cfg.num_hidden_layers * T * cfg.hidden_size


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="CPU, tiny-apertus, vocab 512, T 64: the suite's run")
    ap.add_argument("--preset", default="apertus-v1.1-0.5b", choices=list(PRESETS))
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--calib-tokens", type=int, default=2 ** 17, help="GPTQ calibration tokens")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.toy:
        args.preset, args.vocab, args.seq_len, args.batch, args.k, args.steps = "tiny-apertus", 512, 64, 2, 16, 2
        args.calib_tokens = 256
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, T, V, k = args.batch, args.seq_len, args.vocab, args.k
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(args.preset, vocab_size=V), attn_implementation="sdpa").to(device)
    opt = AdEMAMix(model.parameters(), lr=1e-5)
    batch = packed_batch(B, T, V, k, docs=4, device=device)
    ce_batch = {key: v for key, v in batch.items() if not key.startswith("teacher_")}
    kernels = {"sdpa-dense": "sdpa", "default": resolve_attn("auto", device, training=device.type == "cuda")}
    out: dict[str, float | str] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                   "preset": args.preset, "tokens_per_step": B * T}

    def step(b, kl_weight):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = packed_loss(model, b, 1024, kl_weight=kl_weight).loss
        loss.backward()
        opt.step()

    # -- distill: KD vs CE, default kernel vs dense SDPA (alternating; the first step of each warms up)
    variants = [(kern, obj) for kern in kernels for obj in ("kd", "ce")]
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    peaks: dict[str, int] = {}
    for rep in range(args.steps + 1):
        for kern, obj in variants:
            model.set_attn_implementation(kernels[kern])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = timed(lambda: step(batch if obj == "kd" else ce_batch, 0.9 if obj == "kd" else 0.0), device)
            peaks[kern] = max(peaks.get(kern, 0), peak_bytes(device))
            if rep:
                times[(kern, obj)].append(t)
    flops = model_flops_per_token(model, T)
    for (kern, obj), ts in times.items():
        s = statistics.median(ts)
        out[f"distill_{obj}_{kern}_tokens_per_s"] = B * T / s
        if device.type == "cuda":
            out[f"distill_{obj}_{kern}_mfu"] = B * T * flops / s / (args.peak_tflops * 1e12)
    for kern in kernels:
        out[f"kd_over_ce_{kern}"] = statistics.median(times[(kern, "kd")]) / statistics.median(times[(kern, "ce")])
        out[f"peak_memory_gib_{kern}"] = peaks[kern] / 2**30
    out["sdpa_dense_over_default"] = statistics.median(times[("sdpa-dense", "kd")]) / statistics.median(times[("default", "kd")])

    # -- teacher logits: forward + top-k vs the bare forward
    model.set_attn_implementation(resolve_attn("auto", device))
    model.eval()
    inputs = model_inputs({key: batch[key] for key in ("input_ids", "position_ids", "segment_ids")},
                          model.config._attn_implementation)

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(**inputs).logits

    def forward_topk():
        logits = forward()
        ids, probs, mass = topk_of_logits(logits.reshape(-1, V), k)
        ids.to("cpu"), probs.to("cpu"), mass.to("cpu")

    lt: dict[str, list[float]] = {"bare": [], "topk": []}
    for rep in range(args.steps + 1):
        for name, fn in (("bare", forward), ("topk", forward_topk)):
            t = timed(fn, device)
            if rep:
                lt[name].append(t)
    out["logits_tokens_per_s"] = B * T / statistics.median(lt["topk"])
    out["logits_overhead"] = statistics.median(lt["topk"]) / statistics.median(lt["bare"]) - 1

    # -- QAD step (int4 fake-quant, RTN start) over the distill step, then GPTQ int4 of a fresh copy
    from famex.quant.formats import parse_format
    from famex.quant.qad import attach_fake_quant, init_quantization

    fmt = parse_format("int4")
    model.set_attn_implementation("sdpa" if device.type == "cpu" else kernels["default"])
    model.train()
    clean_config = copy.deepcopy(model.config)  # the quantization marker goes on the copies' configs
    qmodel = AutoModelForCausalLM.from_config(copy.deepcopy(clean_config), attn_implementation="sdpa").to(device)
    qmodel.load_state_dict(model.state_dict())
    start = init_quantization(qmodel, fmt, "rtn", None, False)
    attach_fake_quant(qmodel, fmt, start.qparams, start.activation_modules)
    qmodel.set_attn_implementation(model.config._attn_implementation)
    qopt = AdEMAMix(qmodel.parameters(), lr=1e-5)

    def qad_step():
        qopt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = packed_loss(qmodel, batch, 1024, kl_weight=1.0).loss
        loss.backward()
        qopt.step()

    qt: dict[str, list[float]] = {"qad": [], "distill": []}
    for rep in range(args.steps + 1):
        for name, fn in (("qad", qad_step), ("distill", lambda: step(batch, 0.9))):
            t = timed(fn, device)
            if rep:
                qt[name].append(t)
    out["qad_over_distill"] = statistics.median(qt["qad"]) / statistics.median(qt["distill"])
    del qmodel, qopt, opt

    from famex.data.packing import block_causal_mask
    from famex.quant.model import quantize_model

    gmodel = AutoModelForCausalLM.from_config(copy.deepcopy(clean_config), attn_implementation="sdpa")  # on the CPU
    rows = max(1, args.calib_tokens // T)
    calib = [{"input_ids": batch["input_ids"][:1].repeat(rows, 1), "position_ids": batch["position_ids"][:1].repeat(rows, 1),
              "attention_mask": block_causal_mask(batch["segment_ids"][:1]).repeat(rows, 1, 1, 1)}]
    # As `famex quantize --device` runs it: one decoder block at a time on the device.
    out["gptq_int4_seconds"] = timed(lambda: quantize_model(gmodel, fmt, "gptq", calib, device=device), device)

    # -- export: MLX packing of the int4 codes on the device against the CPU (the files must be the same)
    from famex.export.mlx import mlx_tensors
    from famex.quant.fake_quant import QParams

    def pack_all(dev):
        return {name: {key: t.cpu() for key, t in mlx_tensors(QParams(**{f: (v.to(dev) if v is not None else None)
                                                                           for f, v in vars(qp).items()}), fmt).items()}
                for name, qp in start.qparams.items()}

    on_cpu = {}
    out["export_mlx_seconds_cpu"] = timed(lambda: on_cpu.update(pack_all(torch.device("cpu"))), device)
    on_dev = {}
    out["export_mlx_seconds_device"] = timed(lambda: on_dev.update(pack_all(device)), device)
    out["export_mlx_identical"] = str(all(torch.equal(on_cpu[n][k], on_dev[n][k]) for n in on_cpu for k in on_cpu[n]))

    params = sum(p.numel() for p in model.parameters())
    print(f"famex GPU benchmark — {out['device']}, {args.preset} ({params / 1e6:.0f}M params, vocab {V}), "
          f"batch {B}×{T} tokens, k={k}, median of {args.steps} alternating steps")
    print("| figure | value | goal |\n|---|---|---|")
    goals = {"kd_over_ce_default": "≤ 1.05", "distill_kd_default_mfu": "≥ 0.40", "logits_overhead": "≤ 0.05"}
    for key, v in out.items():
        shown = f"{v:,.3f}" if isinstance(v, float) else str(v)
        print(f"| {key} | {shown} | {goals.get(key, '')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
