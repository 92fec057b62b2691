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

- on CPU (SDPA) with a boolean block-diagonal causal mask ``[B, 1, T, T]`` (True = may attend);
- with flash-attention on GPU, transformers reads packed sequences from the restarted
  ``position_ids`` alone, so no mask is passed.

What this module does not do: shuffle across epochs, shard across ranks or batch on its own (the
trainer and the logit store decide the order; `chunk_permutation` is the one shared rule).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from famex.errors import FamexError
from famex.stage import require_complete
from famex.utils import FileArray

IGNORE_INDEX = -100


class TokenSplit:
    """The concatenated token stream and document boundaries of one split, read from disk on demand.

    Memory does not grow with the split: the index is one row per shard (token and document
    offsets, from meta.json); tokens, masks and document lengths are read with ``pread`` when a
    window needs them (`famex.utils.FileArray`), through a bounded set of open files. Finding the
    documents of a window uses a per-shard coarse index (the start of every `DOC_BLOCK`-th
    document, built from the shard's lengths the first time it is touched, kept for the last
    `INDEX_CACHE` shards) plus at most one block of lengths. ``verify`` hashes every file first.
    """

    DOC_BLOCK = 1024
    INDEX_CACHE = 256
    OPEN_FILES = 64

    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = False):
        """``verify``: hash every token and mask shard now; else each is hashed the first time it is read."""
        self.dir = Path(data_dir)
        meta = require_complete(self.dir, "data", "data directory")
        self.meta = meta
        if split not in meta["splits"]:
            raise FamexError(f"{self.dir}: no split {split!r} (have {', '.join(meta['splits'])})")
        self._shards = meta["splits"][split]["shards"]
        # Chat data carries a per-token assistant mask beside every token shard.
        self.has_mask = bool(self._shards) and all("mask_file" in s for s in self._shards)
        # Each token, mask and lengths file is hashed against meta.json the first time it is opened
        # (all of them now with ``verify``); a file that passed is not hashed again by this reader.
        self._checked: set[tuple[int, str]] = set()
        if verify:
            for s, shard in enumerate(self._shards):
                for key in ("tokens_file", "docs_file") + (("mask_file",) if self.has_mask else ()):
                    self._check(s, key)
        self._starts = np.concatenate([[0], np.cumsum([int(s["tokens"]) for s in self._shards])]).astype(np.int64)
        self._doc_offsets = np.concatenate([[0], np.cumsum([int(s["docs"]) for s in self._shards])]).astype(np.int64)
        self.n_tokens = int(self._starts[-1])
        self.n_docs = int(self._doc_offsets[-1])
        self._files: OrderedDict[tuple[int, str], FileArray] = OrderedDict()
        self._index: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    # -- files
    def _existing(self, path: Path) -> Path:
        if not path.is_file():
            raise FamexError(f"{path} is missing — the data directory is incomplete; rerun `famex data`")
        return path

    def _file(self, s: int, key: str) -> FileArray:
        with self._lock:
            arr = self._files.get((s, key))
            if arr is not None:
                self._files.move_to_end((s, key))
                return arr
        shard = self._shards[s]
        path = self._check(s, key)
        try:
            arr = FileArray.npy(path)
        except (ValueError, OSError, EOFError) as e:
            raise FamexError(f"{path} does not load ({e}) — delete {self.dir} and rerun `famex data`") from None
        want = int(shard["docs"]) if key == "docs_file" else int(shard["tokens"])
        if len(arr) != want:
            raise FamexError(f"{arr.path}: holds {len(arr)} entries, the index says {want} — corrupt data directory")
        with self._lock:
            self._files[(s, key)] = arr
            while len(self._files) > self.OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        return arr

    def _check(self, s: int, key: str) -> Path:
        """The path of file ``key`` of shard ``s``, hashed against its meta.json sha256 once."""
        path = self._existing(self.dir / self._shards[s][key])
        if (s, key) not in self._checked:
            field = key.removesuffix("_file") + "_sha256"
            _check_sha(path, self._shards[s][field], field, self.dir)
            self._checked.add((s, key))
        return path

    def _shard_of(self, position: int) -> int:
        return int(np.searchsorted(self._starts, position, side="right") - 1)

    # -- tokens
    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` of the stream as int64, across shard boundaries."""
        return self._read("tokens_file", start, end)

    def mask(self, start: int, end: int) -> np.ndarray:
        """Assistant mask ``[start, end)`` of the stream (chat data only; 1 = assistant token)."""
        if not self.has_mask:
            raise FamexError(f"{self.dir} holds no assistant mask: it was not made with `famex data --chat`")
        return self._read("mask_file", start, end)

    def _read(self, key: str, start: int, end: int) -> np.ndarray:
        if start < 0 or end > self.n_tokens or start > end:
            raise IndexError(f"token range [{start}, {end}) outside [0, {self.n_tokens})")
        parts = []
        s = self._shard_of(start) if start < end else 0
        while start < end:
            base = int(self._starts[s])
            stop = min(end, int(self._starts[s + 1]))
            parts.append(self._file(s, key).read(start - base, stop - base).astype(np.int64))
            start = stop
            s += 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # -- documents
    def _coarse(self, s: int) -> np.ndarray:
        """Local start of every DOC_BLOCK-th document of shard ``s`` (int64)."""
        with self._lock:
            idx = self._index.get(s)
            if idx is not None:
                self._index.move_to_end(s)
                return idx
        lengths = self._file(s, "docs_file")
        n = len(lengths)
        idx = np.zeros((n + self.DOC_BLOCK - 1) // self.DOC_BLOCK, np.int64)
        pos, step = 0, self.DOC_BLOCK * 256  # summed in pieces: memory stays flat for huge shards
        for lo in range(0, n, step):
            part = lengths.read(lo, lo + step).astype(np.int64)
            starts = pos + np.concatenate([[0], np.cumsum(part)[:-1]])
            idx[lo // self.DOC_BLOCK: (lo + len(part) + self.DOC_BLOCK - 1) // self.DOC_BLOCK] = starts[::self.DOC_BLOCK]
            pos += int(part.sum())
        with self._lock:
            self._index[s] = idx
            while len(self._index) > self.INDEX_CACHE:
                self._index.popitem(last=False)
        return idx

    def doc_bounds(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """For each stream position in ``[start, end)``: its document's index and the document's start."""
        if start < 0 or end > self.n_tokens or start > end:
            raise IndexError(f"token range [{start}, {end}) outside [0, {self.n_tokens})")
        docs, firsts = [], []
        s = self._shard_of(start) if start < end else 0
        while start < end:
            base = int(self._starts[s])
            stop = min(end, int(self._starts[s + 1]))
            lo, hi = start - base, stop - base
            coarse = self._coarse(s)
            block = int(np.searchsorted(coarse, lo, side="right") - 1)
            first_doc = block * self.DOC_BLOCK
            lengths = self._file(s, "docs_file")
            # Documents are ≥ 1 token, so hi - lo + DOC_BLOCK lengths from the block start cover the window.
            part = lengths.read(first_doc, first_doc + self.DOC_BLOCK + (hi - lo) + 1).astype(np.int64)
            starts = int(coarse[block]) + np.concatenate([[0], np.cumsum(part)[:-1]])
            local = np.searchsorted(starts, np.arange(lo, hi), side="right") - 1
            docs.append(int(self._doc_offsets[s]) + first_doc + local)
            firsts.append(base + starts[local])
            start = stop
            s += 1
        if not docs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(docs), np.concatenate(firsts)

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document each stream position belongs to."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return np.zeros(0, np.int64)
        lo, hi = int(positions.min()), int(positions.max()) + 1
        return self.doc_bounds(lo, hi)[0][positions - lo]

    @property
    def doc_starts(self) -> np.ndarray:
        """Start of every document in the stream — the whole array (n_docs × 8 bytes): for small splits."""
        out = [int(self._starts[s]) + np.concatenate([[0], np.cumsum(self._file(s, "docs_file").read(0, int(sh["docs"])).astype(np.int64))[:-1]])
               for s, sh in enumerate(self._shards) if int(sh["docs"])]
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def _check_sha(path: Path, sha256: str, field: str, data_dir: Path) -> None:
    from famex.integrity import sha256_matches

    if not sha256_matches(path, sha256):
        raise FamexError(f"{path}: sha256 differs from meta.json's {field} — the file is corrupt; delete {data_dir} and rerun `famex data`")


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
        doc, doc_start = self.data.doc_bounds(start, start + T + 1)
        seg = doc - doc[0]
        doc_start = np.maximum(doc_start, start)
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


def model_inputs(batch: dict[str, torch.Tensor], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """Keyword arguments for a transformers causal LM forward over a packed batch.

    ``flash_attention_2`` (and other varlen kernels) detect packed documents from the restarted
    ``position_ids``; every other implementation gets the explicit block-diagonal boolean mask.
    """
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if not attn_implementation.startswith("flash_attention"):
        kwargs["attention_mask"] = block_causal_mask(batch["segment_ids"])
    return kwargs


class ChunkOrder:
    """The seeded order in which a split's chunks are visited, computed per position in O(1) memory.

    ``ChunkOrder(n, seed)[i]`` is the chunk visited at position ``i``: a 6-round Feistel network
    (splitmix64 rounds, keys drawn from ``seed``) on the smallest even-bit power of two ≥ n, walked
    back into ``[0, n)`` (cycle walking), so it is a permutation of ``range(n)`` that nobody has to
    store — at 1.7T tokens an array of the 415M chunk indices would be 3.3 GB per rank.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def _round(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        z = r ^ key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << h) | right

    def __getitem__(self, i):
        x = np.atleast_1d(np.asarray(i, dtype=np.int64))
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"position outside [0, {self.n})")
        y = self._encrypt(x.astype(np.uint64))
        out = y >= self.n
        while out.any():
            y[out] = self._encrypt(y[out])
            out = y >= self.n
        y = y.astype(np.int64)
        return y.reshape(np.shape(i)) if np.ndim(i) else int(y[0])


def chunk_permutation(n_chunks: int, seed: int) -> np.ndarray:
    """`ChunkOrder` as a whole array (n × 8 bytes: for the logit store's permutation file and small splits)."""
    return ChunkOrder(n_chunks, seed)[np.arange(n_chunks)]


def chunk_token_hash(input_ids: torch.Tensor | np.ndarray) -> str:
    """A hash of a chunk's input token ids, to prove two artefacts were made from the same chunk."""
    arr = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
