"""What a model costs to keep and to run: bytes of weights on disk, bits per weight, forward tokens/s.

These are the cost axis of the family's Pareto front. ``model_size`` counts only weight files
(config, tokenizer and README files are the same for every variant and would blur small models);
``bits_per_weight`` divides by the parameter count the caller chooses (normally the unquantized
model's, so embeddings and any unquantized layers count at their stored width).

What this module does not do: memory at run time (KV cache, activations) or generation speed.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from time import perf_counter

from famex.errors import FamexError

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz")
"""Weight files of HF (safetensors), GGUF and MLX exports; ``*.bin`` counts when named like weights."""


def _is_weight_file(path: Path) -> bool:
    if path.name.startswith("."):  # temporary files of an interrupted atomic write
        return False
    if path.suffix in WEIGHT_SUFFIXES:
        return True
    # Old-style PyTorch checkpoints; training_args.bin and the like are not weights.
    return path.suffix == ".bin" and path.name.startswith(("pytorch_model", "model"))


def model_size(path: str | os.PathLike) -> int:
    """Bytes of the weight files of a model directory (top level only), or of one GGUF file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FamexError(f"model not found: {path}; pass a model directory or a .gguf file")
    files = [p for p in path.iterdir() if p.is_file() and _is_weight_file(p)]
    if not files:
        raise FamexError(
            f"{path} holds no weight files (*.safetensors, *.gguf, *.npz, pytorch_model*.bin); "
            "pass the directory a model was saved or exported to"
        )
    return sum(p.stat().st_size for p in files)


def bits_per_weight(nbytes: int, params: int) -> float:
    """Average stored bits per parameter: 8 · bytes / parameters."""
    if params <= 0:
        raise FamexError(f"bits per weight needs a positive parameter count, got {params}")
    return 8.0 * nbytes / params


def throughput(model, seq_len: int = 512, batch: int = 1, iters: int = 3, warmup: int = 1, seed: int = 0) -> float:
    """Tokens per second of one forward pass (all positions through the output layer) on random ids.

    The median of ``iters`` timed passes after ``warmup`` untimed ones, under ``no_grad``, on the
    model's own device and dtype. The model's train/eval mode is restored afterwards.
    """
    import torch

    if seq_len < 1 or batch < 1 or iters < 1:
        raise FamexError(f"throughput needs seq_len, batch and iters >= 1 (got {seq_len}, {batch}, {iters})")
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for _ in range(warmup + iters):
                sync()
                t0 = perf_counter()
                model(input_ids=ids, use_cache=False)
                sync()
                times.append(perf_counter() - t0)
    finally:
        model.train(was_training)
    return batch * seq_len / statistics.median(times[warmup:])
