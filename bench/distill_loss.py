"""Benchmark: peak memory and time of `distill_loss` (chunked) against the naive full-logits loss.

Naive = what one writes first: lm_head → full fp32 logits [N, V] → log_softmax → KL at the top-k
ids + CE at the labels, autograd for the backward. Chunked = `famex.distill.distill_loss`. Both do
forward + backward of 0.9·KL + 0.1·CE at the same inputs (default: the 0.5B student's lm_head,
d=1024, V=131,072, 4,096 tokens, k=256), and the bench checks that they agree. The chunked loss
runs in both of its gradient modes (gradient formed in the forward / logits recomputed in backward).

Peak memory is measured two ways, each variant in a fresh subprocess so neither sees the other:
- live tensors: a TorchDispatchMode sees every tensor an op returns, counts its storage once, and
  un-counts it when the storage is freed (weakref finalizer). The peak of that sum over forward +
  backward is what a device caching allocator would have to hold for tensors (autograd's saved
  tensors, each chunk's transient logits, the gradients) — the figure that matters on a GPU. It
  does not see scratch memory a kernel allocates and frees inside itself.
- process RSS high-water (getrusage ru_maxrss) minus the RSS just before the forward: the whole
  truth on CPU, kernel scratch included. It is sound here because glibc serves allocations above
  32 MiB with mmap and returns them on free, so RSS follows the live big buffers.
(tracemalloc cannot be used: it does not see torch's allocations.) The inputs (h, W, the teacher
top-k) exist before the measurement starts and are not counted; the gradients of h and W are.
On CUDA (--device cuda) the peak is torch.cuda.max_memory_allocated instead of RSS.

Time: the parent process runs naive and chunked alternately (--repeats each) and reports medians,
so the ratio is measured side by side. Usage:

    .venv/bin/python bench/distill_loss.py [--tokens 4096] [--vocab 131072] [--dim 1024] [--k 256]
        [--chunks 1024 512] [--tail renormalize|bucket] [--dtype fp32|bf16] [--device cpu|cuda] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from famex.distill.losses import distill_loss

MiB = 2**20


# ----------------------------------------------------------------------------------------------
# Inputs and the two variants


def make_inputs(args):
    """Seeded inputs without any [N, V] transient (the teacher top-k is synthetic)."""
    g = torch.Generator().manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, v, d, k = args.tokens, args.vocab, args.dim, args.k
    h = torch.randn(n, d, generator=g).to(dt).to(args.device).requires_grad_()
    w = torch.randn(v, d, generator=g).mul_(d**-0.5).to(args.device).requires_grad_()  # in place: no transient
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::97] = -100
    # k distinct ids per row: a random start and an odd stride modulo V (V is a power of two here;
    # otherwise a few duplicate ids would only make the naive and chunked results differ slightly).
    start = torch.randint(0, v, (n, 1), generator=g)
    stride = 2 * torch.randint(0, v // 2, (n, 1), generator=g) + 1
    ids = (start + stride * torch.arange(k)) % v
    probs = torch.softmax(torch.randn(n, k, generator=g) * 3, -1) * 0.95  # 5% left-out mass
    return h, w, labels.to(args.device), ids.to(args.device), probs.to(args.device)


def naive_loss(h, w, labels, ids, probs, tail, kl_weight=0.9):
    logits = F.linear(h, w.to(h.dtype)).float()
    ls = logits.log_softmax(-1)
    mask = labels != -100
    ce = -(ls.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1) * mask).sum()
    ls_k = ls.gather(1, ids)
    if tail == "renormalize":
        q = probs / probs.sum(-1, keepdim=True)
        kl = (q * q.log() - q * ls_k).sum(-1)
    else:
        r = 1 - probs.sum(-1)
        kl = (probs * probs.log() - probs * ls_k).sum(-1) + r * (r.log() - torch.log1p(-ls_k.exp().sum(-1)))
    kl = (kl * mask).sum()
    return (kl_weight * kl + (1 - kl_weight) * ce) / mask.sum()


def chunked_loss(h, w, labels, ids, probs, tail, chunk, grad_in_forward):
    return distill_loss(h, w, labels, ids, probs, tail=tail, chunk_tokens=chunk,
                        grad_in_forward=grad_in_forward).loss


def run_once(variant, inputs, args):
    h, w, labels, ids, probs = inputs
    h.grad = w.grad = None
    if variant == "naive":
        loss = naive_loss(h, w, labels, ids, probs, args.tail)
    else:
        _, chunk, mode = variant.split(":")
        loss = chunked_loss(h, w, labels, ids, probs, args.tail, int(chunk), mode == "fwd")
    loss.backward()
    if h.is_cuda:
        torch.cuda.synchronize()
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# Memory measurement (child process)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ops while the mode is active."""

    def __init__(self, preexisting):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.known = {t.untyped_storage().data_ptr() for t in preexisting}
        self.live = 0
        self.peak = 0

    def _free(self, ptr, nbytes):
        if self.sizes.get(ptr) == nbytes:
            del self.sizes[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr and ptr not in self.known and ptr not in self.sizes:
                    self.sizes[ptr] = st.nbytes()
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, ptr, st.nbytes())
        return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args) -> None:
    inputs = make_inputs(args)
    h, w, labels, ids, probs = inputs
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(args.child, inputs, args)
        proc_peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run_once(args.child, inputs, args)
        proc_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        if maxrss_before > base + 64 * MiB:
            print(f"warning: RSS high-water before the run was {(maxrss_before - base) / MiB:.0f} MiB above "
                  "the baseline; the RSS figure may be an overestimate", file=sys.stderr)
    h.grad = w.grad = None
    with LiveTensorBytes([h, w, labels, ids, probs]) as mode:
        run_once(args.child, inputs, args)
    print(json.dumps({"variant": args.child, "live_peak": mode.peak, "proc_peak": proc_peak}))


# ----------------------------------------------------------------------------------------------
# Parent: memory children, then side-by-side timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024])
    ap.add_argument("--tail", choices=["renormalize", "bucket"], default="renormalize")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the hidden states")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    variants = ["naive"] + [f"chunked:{c}:{m}" for c in args.chunks for m in ("fwd", "recompute")]
    base_cmd = [sys.executable, __file__] + [a for a in sys.argv[1:]]
    mem = {}
    for v in variants:
        out = subprocess.run(base_cmd + ["--child", v], check=True, capture_output=True, text=True)
        sys.stderr.write(out.stderr)
        mem[v] = json.loads(out.stdout.strip().splitlines()[-1])

    inputs = make_inputs(args)
    times = {v: [] for v in variants}
    losses, grads = {}, {}
    run_once("naive", inputs, args)  # warm-up (allocator, thread pools)
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            losses[v] = run_once(v, inputs, args)
            times[v].append(time.perf_counter() - t0)
            grads[v] = (inputs[0].grad.float().clone(), inputs[1].grad.float().clone())

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    n, vocab = args.tokens, args.vocab
    proc_name = "peak CUDA allocated" if args.device == "cuda" else "peak RSS increase"
    print(f"distill loss, forward + backward: N={n} tokens, V={vocab}, d={args.dim}, k={args.k}, "
          f"tail={args.tail}, hidden {args.dtype}, W fp32, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"(one fp32 [N, V] logits tensor = {n * vocab * 4 / MiB:,.0f} MiB; W and its gradient = "
          f"{vocab * args.dim * 4 / MiB:,.0f} MiB each)\n")
    print(f"| variant | peak live tensors (MiB) | {proc_name} (MiB) | time fwd+bwd (s, median of {args.repeats}) "
          "| memory ratio (live / process) | time ratio |")
    print("|---|---|---|---|---|---|")
    ref_live, ref_proc = mem["naive"]["live_peak"], mem["naive"]["proc_peak"]
    ref_t = statistics.median(times["naive"])
    for v in variants:
        t = statistics.median(times[v])
        live, proc = mem[v]["live_peak"], mem[v]["proc_peak"]
        if v == "naive":
            name = "naive (full logits)"
        else:
            _, chunk, mode = v.split(":")
            name = f"chunked {chunk} tok, " + ("grad in forward" if mode == "fwd" else "recompute in backward")
        print(f"| {name} | {live / MiB:,.0f} | {proc / MiB:,.0f} | {t:.2f} | "
              f"{live / ref_live:.3f} / {proc / ref_proc:.3f} | {t / ref_t:.2f}x |")
    print()
    for v in variants[1:]:
        print(f"{v}: loss {float(losses[v]):.6f} vs naive {float(losses['naive']):.6f}; "
              f"max rel. grad difference h {rel(grads[v][0], grads['naive'][0]):.1e}, "
              f"W {rel(grads[v][1], grads['naive'][1]):.1e}")


if __name__ == "__main__":
    main()
