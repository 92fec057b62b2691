"""Packed chunks of a `famex data` directory, as the teacher, the trainer and the evaluator see them.

Chunk ``i`` of a split is the window ``tokens[i*T : i*T + T + 1]`` of the split's concatenated
documents (T = seq_len): inputs are its first T tokens, targets its last T. Each position carries
the id of the document it belongs to (``segment_ids``), its position inside that document
(``position_ids``, restarting at 0 where a document starts, and at the chunk start), and a label
that is ``-100`` where the next token belongs to another document — the model is never asked to
predict across a document boundary. In chat data (``famex data --chat``) a label is also ``-100``
where the next token is not an assistant token (the per-token mask beside the shards), so every
loss downstream (SFT, distillation, QAD) trains on assistant tokens only; ``loss_mask=False``
ignores the mask. Attention is masked across documents:

- SDPA (the CPU default) gets a boolean block-diagonal causal mask ``[B, 1, T, T]`` (True = may attend);
- flex attention (the GPU default) gets a document `BlockMask` (`document_block_mask`): only the
  tiles of T×T that hold any allowed pair are computed and no T×T tensor exists;
- with flash-attention on GPU, transformers reads packed sequences from the restarted
  ``position_ids`` alone, so no mask is passed.

What this module does not do: shuffle across epochs, shard across ranks or batch on its own (the
trainer and the logit store decide the order; `chunk_permutation` is the one shared rule).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from famex.errors import FamexError
from famex.stage import require_complete
from famex.utils import sha256_file

IGNORE_INDEX = -100


class TokenSplit:
    """The concatenated token stream and document boundaries of one split, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = False):
        self.dir = Path(data_dir)
        meta = require_complete(self.dir, "data", "data directory")
        self.meta = meta
        if split not in meta["splits"]:
            raise FamexError(f"{self.dir}: no split {split!r} (have {', '.join(meta['splits'])})")
        shards = meta["splits"][split]["shards"]
        self._tokens = []
        self._masks: list[np.ndarray] = []
        lengths = []
        # Chat data carries a per-token assistant mask beside every token shard.
        self.has_mask = bool(shards) and all("mask_file" in s for s in shards)
        for shard in shards:
            tok_path, doc_path = self.dir / shard["tokens_file"], self.dir / shard["docs_file"]
            for path, key in ((tok_path, "tokens_sha256"), (doc_path, "docs_sha256")):
                if not path.is_file():
                    raise FamexError(f"{path} is missing — the data directory is incomplete; rerun `famex data`")
                if verify and sha256_file(path) != shard[key]:
                    raise FamexError(f"{path}: checksum mismatch — the file is corrupt; delete {self.dir} and rerun `famex data`")
            toks = np.load(tok_path, mmap_mode="r")
            if len(toks) != shard["tokens"]:
                raise FamexError(f"{tok_path}: holds {len(toks)} tokens, the index says {shard['tokens']} — corrupt data directory")
            self._tokens.append(toks)
            lengths.append(np.load(doc_path))
            if self.has_mask:
                mask_path = self.dir / shard["mask_file"]
                if not mask_path.is_file():
                    raise FamexError(f"{mask_path} is missing — the data directory is incomplete; rerun `famex data`")
                if verify and sha256_file(mask_path) != shard["mask_sha256"]:
                    raise FamexError(f"{mask_path}: checksum mismatch — the file is corrupt; delete {self.dir} and rerun `famex data`")
                mask = np.load(mask_path, mmap_mode="r")
                if len(mask) != len(toks):
                    raise FamexError(f"{mask_path}: {len(mask)} mask entries for {len(toks)} tokens — corrupt data directory")
                self._masks.append(mask)
        self.n_tokens = int(sum(len(t) for t in self._tokens))
        self._starts = np.concatenate([[0], np.cumsum([len(t) for t in self._tokens])]).astype(np.int64)
        doc_lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64) if len(doc_lengths) else doc_lengths
        self.n_docs = len(doc_lengths)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` of the stream as int64, across shard boundaries."""
        return self._read(self._tokens, start, end)

    def mask(self, start: int, end: int) -> np.ndarray:
        """Assistant mask ``[start, end)`` of the stream (chat data only; 1 = assistant token)."""
        if not self.has_mask:
            raise FamexError(f"{self.dir} holds no assistant mask: it was not made with `famex data --chat`")
        return self._read(self._masks, start, end)

    def _read(self, arrays: list[np.ndarray], start: int, end: int) -> np.ndarray:
        if start < 0 or end > self.n_tokens or start > end:
            raise IndexError(f"token range [{start}, {end}) outside [0, {self.n_tokens})")
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        s = first
        while start < end:
            base = int(self._starts[s])
            stop = min(end, int(self._starts[s + 1]))
            parts.append(np.asarray(arrays[s][start - base: stop - base], dtype=np.int64))
            start = stop
            s += 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document each stream position belongs to."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1


class PackedChunks:
    """Fixed-length chunks of a split with labels, document-relative positions and segment ids."""

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int | None = None, verify: bool = False,
                 loss_mask: bool = True):
        self.data = TokenSplit(data_dir, split, verify=verify)
        # Chat data: label only assistant tokens (``loss_mask=False`` labels every token, e.g. for a
        # KL over whole conversations).
        self.loss_mask = loss_mask and self.data.has_mask
        self.split = split
        self.seq_len = int(seq_len or self.data.meta["seq_len"])
        self.tokenizer_hash = self.data.meta["tokenizer"]["hash"]
        self.vocab_size = self.data.meta["tokenizer"]["vocab_size"]

    def __len__(self) -> int:
        return max(0, (self.data.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} outside [0, {len(self)})")
        T = self.seq_len
        start = i * T
        window = self.data.tokens(start, start + T + 1)
        doc = self.data.doc_index(np.arange(start, start + T + 1))
        seg = doc - doc[0]
        doc_start = np.maximum(self.data.doc_starts[doc], start)
        positions = np.arange(start, start + T + 1) - doc_start
        keep = seg[1:] == seg[:-1]
        if self.loss_mask:
            keep &= self.data.mask(start + 1, start + T + 1) > 0
        labels = np.where(keep, window[1:], IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(window[:-1].copy()),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "position_ids": torch.from_numpy(positions[:-1].astype(np.int64)),
            "segment_ids": torch.from_numpy(seg[:-1].astype(np.int64)),
        }

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate([self[int(i)] for i in indices])


def collate(chunks: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([c[key] for c in chunks]) for key in chunks[0]}


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, T, T]`` mask: position q may attend to k iff k ≤ q and both are in one document."""
    T = segment_ids.shape[-1]
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)


def document_block_mask(segment_ids: torch.Tensor):
    """The `block_causal_mask` pattern as a flex-attention `BlockMask` (B × 1 head × T × T, never dense).

    On CUDA the block mask is built by a compiled kernel; on CPU (tests) eagerly, which evaluates
    the pattern densely once but is still exact.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids

    def same_document_causal(b, h, q, k):
        return (q >= k) & (seg[b, q] == seg[b, k])

    B, T = seg.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=seg.device, _compile=seg.device.type == "cuda")


def model_inputs(batch: dict[str, torch.Tensor], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """Keyword arguments for a transformers causal LM forward over a packed batch.

    ``flash_attention_2`` (and other varlen kernels) detect packed documents from the restarted
    ``position_ids``; ``flex_attention`` gets a document `BlockMask`; every other implementation
    gets the explicit block-diagonal boolean mask.
    """
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if attn_implementation == "flex_attention":
        kwargs["attention_mask"] = document_block_mask(batch["segment_ids"])
    elif not attn_implementation.startswith("flash_attention"):
        kwargs["attention_mask"] = block_causal_mask(batch["segment_ids"])
    return kwargs


def chunk_permutation(n_chunks: int, seed: int) -> np.ndarray:
    """The seeded order in which a split's chunks are visited (shared by the logit store and the trainer)."""
    return np.random.default_rng(seed).permutation(n_chunks)


def chunk_token_hash(input_ids: torch.Tensor | np.ndarray) -> str:
    """A hash of a chunk's input token ids, to prove two artefacts were made from the same chunk."""
    arr = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
