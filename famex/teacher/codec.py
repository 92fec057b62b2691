"""Encodings of sparse teacher distributions: one chunk of top-k (ids, probabilities) <-> bytes.

A chunk is ``T`` token positions, each with ``k`` vocabulary ids, their probabilities and the mass
left out (``1 - sum(probs)``, the probability of every other id). Two encodings:

``paper``
    The paper's layout, for fidelity: int32 ids and float32 probabilities, row-major, gzip.
    Ids and probabilities round-trip bit-exactly; the left-out mass is derived on decode.

``compact`` (the default)
    The k ids of a token, mapped through a frequency table (ids that are often in the top-k get
    small ranks), are sorted and delta-coded; each probability is quantized uniformly in the
    square-root domain; the left-out mass is kept on a fine log scale; every byte stream is
    compressed with zstd. The set of ids is exact; only the probabilities are approximated.

Why the square-root domain: the loss the store serves is a KL divergence, and for small errors
``KL(p || p + e) ~ sum e_i^2 / (2 p_i)``. A uniform step ``step`` in ``sqrt(p)`` makes every entry
contribute the same expected error, ``step^2 / 6`` nats per entry, so ``step = sqrt(6 kl / k)``
spends a KL budget evenly, and large probabilities get fine steps while the tail gets coarse ones.
Measured on the default teacher, this beats log-domain steps at equal KL (see docs/store-format.md).

Why ids are not dropped (no adaptive k): an id that is left out is merged into the left-out mass,
and the decoder can only spread that mass over the whole vocabulary. A tail entry at rank 256 is
typically 50-100x the average left-out probability, so dropping it costs about 3-4x its mass in
KL; on the default teacher that is more than any byte saving is worth (docs/store-format.md).

This module is pure: numpy arrays in, bytes out. It knows nothing of shards, files or models;
``famex.teacher.store`` puts chunk blobs into shards and keeps the id table per shard.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import zstandard

ENCODINGS = ("paper", "compact")
ENCODING_IDS = {"paper": 1, "compact": 2}

#: Default KL budget of the compact encoding's probability quantization (nats per token).
#: Half the 1e-3 target, because the step formula is an estimate (peaked tokens fall below it).
DEFAULT_KL_TARGET = 5e-4

#: zstd level: level 3 compresses these streams within 3% of level 19 at ~20x its speed.
ZSTD_LEVEL = 3

# Column groups of the sorted id list, each coded with its own entropy table: early columns
# (frequent ids) have small gaps, late ones large gaps. 8 groups saved ~3% over one stream.
_MAX_GROUPS = 8
# Tokens are also split by their left-out mass (flat distributions have higher levels and other
# gaps than peaked ones); the decoder reads the mass first. 4 buckets saved ~5% at k=256.
_MASS_EDGES = np.array([0.01, 0.05, 0.15])
# Escapes (values >= 255) are stored in three byte planes: ids up to 2**24.
_MAX_VOCAB = 1 << 24
# Mass left is stored as round(-log2(mass) * 512) in a uint16: relative error <= 0.07% down to
# 2**-128; the top code means exactly zero.
_MASS_SCALE = 512.0
_MASS_ZERO = 0xFFFF
_BLOB_HEAD = struct.Struct("<BBIII")  # encoding id, flags, T, k, vocab_size
_FLAG_TABLE = 1  # compact: the id table is embedded in the blob
# Decoded probabilities below this count as this value in the KL metric, so that a decoded zero
# where the exact one is positive (fp32 rounding of 1 - sum(p)) stays finite yet visible.
_KL_FLOOR = 1e-30


@dataclass(frozen=True)
class Decoded:
    """One decoded chunk. Within a token the k entries are in no particular order."""

    ids: np.ndarray  # [T, k] int32
    probs: np.ndarray  # [T, k] float32
    mass_left: np.ndarray  # [T] float32, 1 - sum(probs) as the teacher computed it


def step_for(kl_target: float, k: int) -> float:
    """The sqrt-domain quantization step that spends ``kl_target`` nats per token over k entries."""
    if kl_target <= 0:
        raise ValueError(f"kl_target must be positive, got {kl_target}")
    return float(np.sqrt(6.0 * kl_target / k))


def build_id_table(id_arrays: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """Ids ordered by how often they occur in the given top-k arrays (most frequent first).

    Ties and ids that never occur keep ascending id order, so the table is a deterministic
    permutation of ``range(vocab_size)`` (int64).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in id_arrays:
        counts += np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=vocab_size)[:vocab_size]
    return np.lexsort((np.arange(vocab_size), -counts)).astype(np.int64)


def encode_id_table(table: np.ndarray, used: int | None = None) -> bytes:
    """The first ``used`` entries of a table as zstd(uint32 LE); the rest is implied (ascending)."""
    used = len(table) if used is None else used
    return _zc(np.ascontiguousarray(table[:used], dtype="<u4").tobytes())


def decode_id_table(blob: bytes, vocab_size: int) -> np.ndarray:
    head = np.frombuffer(_zd(blob), dtype="<u4").astype(np.int64)
    if len(head) > vocab_size or (len(head) and head.max() >= vocab_size):
        raise ValueError("id table does not fit the vocabulary")
    seen = np.zeros(vocab_size, dtype=bool)
    seen[head] = True
    if seen.sum() != len(head):
        raise ValueError("id table repeats an id")
    return np.concatenate([head, np.flatnonzero(~seen)])


def used_entries(table: np.ndarray, id_arrays: Iterable[np.ndarray]) -> int:
    """How many leading table entries are needed to cover every id in ``id_arrays``."""
    rank = _inverse(table)
    return max((int(rank[np.asarray(a, dtype=np.int64)].max()) + 1 for a in id_arrays if np.size(a)), default=0)


def encode(
    ids,
    probs,
    vocab_size: int,
    *,
    encoding: str = "compact",
    mass_left=None,
    table: np.ndarray | None = None,
    kl_target: float = DEFAULT_KL_TARGET,
) -> bytes:
    """Encode one chunk: ``ids`` [T, k] ints, ``probs`` [T, k] float32, ``mass_left`` [T] or None.

    ``mass_left`` defaults to ``1 - sum(probs)``; pass the teacher's own value (computed from the
    logits outside the top-k) to keep it exact when the top-k holds nearly all the mass. For
    ``compact``, ``table`` is the shard's id table (`build_id_table`); without one, a table is built
    from this chunk and embedded in the blob.
    """
    ids = np.asarray(ids)
    probs = np.asarray(probs, dtype=np.float32)
    if ids.ndim != 2 or probs.shape != ids.shape:
        raise ValueError(f"ids and probs must both be [T, k]; got {ids.shape} and {probs.shape}")
    T, k = ids.shape
    if k < 1 or k > vocab_size:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {vocab_size}")
    if T and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids outside [0, {vocab_size})")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if encoding == "paper":
        return _encode_paper(ids, probs, vocab_size)
    if encoding == "compact":
        mass = _mass_or_default(mass_left, probs)
        return _encode_compact(ids.astype(np.int64), probs, mass, vocab_size, table, step_for(kl_target, k))
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


def decode(blob: bytes, table: np.ndarray | None = None) -> Decoded:
    """Decode a chunk blob from `encode`. Compact blobs without an embedded table need ``table``."""
    if len(blob) < _BLOB_HEAD.size:
        raise ValueError("chunk blob is truncated")
    enc, flags, T, k, vocab_size = _BLOB_HEAD.unpack_from(blob, 0)
    body = memoryview(blob)[_BLOB_HEAD.size :]
    if enc == ENCODING_IDS["paper"]:
        return _decode_paper(body, T, k)
    if enc == ENCODING_IDS["compact"]:
        return _decode_compact(body, flags, T, k, vocab_size, table)
    raise ValueError(f"unknown encoding id {enc} in chunk blob")


def blob_info(blob: bytes) -> dict:
    """Encoding, T, k and vocabulary size from a blob's head, without decoding it."""
    enc, flags, T, k, vocab_size = _BLOB_HEAD.unpack_from(blob, 0)
    names = {v: n for n, v in ENCODING_IDS.items()}
    return {"encoding": names.get(enc, f"unknown({enc})"), "T": T, "k": k, "vocab_size": vocab_size}


def kl_decoded_vs_exact(exact_ids, exact_probs, exact_mass, ids, probs, mass) -> np.ndarray:
    """Per-token KL(exact || decoded) in nats over the k listed ids plus one bucket for the rest.

    Both sides must list the same ids per token (in any order). With equal id sets this equals
    the full-vocabulary KL under any common way of spreading the left-out mass, so it measures
    the encoding's error alone, not the top-k truncation. Each side is first rescaled to sum to 1:
    an fp32 softmax is off by ~1e-6 in total, which would otherwise show up as encoding error.
    """
    eo = np.argsort(exact_ids, axis=1, kind="stable")
    do = np.argsort(ids, axis=1, kind="stable")
    if not np.array_equal(np.take_along_axis(np.asarray(exact_ids), eo, 1), np.take_along_axis(np.asarray(ids), do, 1)):
        raise ValueError("decoded ids differ from the exact ones; KL over k+1 buckets needs equal id sets")
    p = np.take_along_axis(np.asarray(exact_probs, dtype=np.float64), eo, 1)
    q = np.take_along_axis(np.asarray(probs, dtype=np.float64), do, 1)
    pm, qm = np.asarray(exact_mass, np.float64), np.asarray(mass, np.float64)
    ps, qs = p.sum(1) + pm, q.sum(1) + qm
    p, pm = p / ps[:, None], pm / ps
    q, qm = q / qs[:, None], qm / qs
    return _kl_terms(p, q).sum(1) + _kl_terms(pm, qm)


def _kl_terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = p * (np.log(np.maximum(p, _KL_FLOOR)) - np.log(np.maximum(q, _KL_FLOOR)))
    return np.where(p > 0, t, 0.0)


# --- paper ---------------------------------------------------------------------------------


def _encode_paper(ids: np.ndarray, probs: np.ndarray, vocab_size: int) -> bytes:
    T, k = ids.shape
    raw = np.ascontiguousarray(ids, dtype="<i4").tobytes() + np.ascontiguousarray(probs, dtype="<f4").tobytes()
    # mtime=0 keeps the bytes a function of the data alone (resume must be byte-identical).
    return _BLOB_HEAD.pack(ENCODING_IDS["paper"], 0, T, k, vocab_size) + gzip.compress(raw, compresslevel=6, mtime=0)


def _decode_paper(body: memoryview, T: int, k: int) -> Decoded:
    raw = gzip.decompress(body)
    n = T * k
    if len(raw) != 8 * n:
        raise ValueError(f"paper chunk holds {len(raw)} bytes, expected {8 * n}")
    ids = np.frombuffer(raw, dtype="<i4", count=n).reshape(T, k).astype(np.int32)
    probs = np.frombuffer(raw, dtype="<f4", offset=4 * n).reshape(T, k).astype(np.float32)
    mass = np.clip(1.0 - probs.astype(np.float64).sum(1), 0.0, 1.0).astype(np.float32)
    return Decoded(ids, probs, mass)


# --- compact -------------------------------------------------------------------------------


def _groups(k: int) -> list[tuple[int, int]]:
    g = min(_MAX_GROUPS, k)
    bounds = [(i * k) // g for i in range(g + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(g)]


def _contexts(mass: np.ndarray, k: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Rows per left-out-mass bucket and the column groups: the (bucket, group) coding contexts."""
    bucket = np.digitize(mass, _MASS_EDGES)
    return [np.flatnonzero(bucket == b) for b in range(len(_MASS_EDGES) + 1)], _groups(k)


def _encode_compact(ids, probs, mass, vocab_size, table, step) -> bytes:
    T, k = ids.shape
    if vocab_size > _MAX_VOCAB:
        raise ValueError(f"the compact encoding supports vocabularies up to {_MAX_VOCAB}, got {vocab_size}")
    flags = 0
    table_blob = b""
    if table is None:
        table = build_id_table([ids], vocab_size)
        table_blob = encode_id_table(table, used_entries(table, [ids]))
        flags |= _FLAG_TABLE
    elif len(table) != vocab_size:
        raise ValueError(f"id table has {len(table)} entries for a vocabulary of {vocab_size}")
    rank = _inverse(table)[ids]
    order = np.argsort(rank, axis=1, kind="stable")
    rank = np.take_along_axis(rank, order, 1)
    p = np.take_along_axis(probs, order, 1).astype(np.float64)
    prev = np.concatenate([np.full((T, 1), -1, dtype=np.int64), rank[:, :-1]], 1)
    gaps = rank - prev - 1
    if T and gaps.min() < 0:
        raise ValueError("a token lists the same id twice; top-k ids must be distinct")
    levels = np.rint(np.sqrt(p) / step).astype(np.int64)
    # The mass is quantized first: the decoder reads it first and derives the contexts from it.
    code = _mass_code(mass)
    rows, groups = _contexts(_mass_value(code), k)

    # Level 0 (sqrt(p) below step/2) decodes to the mean of the exact probabilities it stands for,
    # per mass bucket: tiny for peaked tokens, larger for flat ones.
    zero = np.array([_mean_or(p[r][levels[r] == 0], step * step / 12.0) for r in rows])

    streams = [(code >> 8).astype(np.uint8).tobytes(), (code & 0xFF).astype(np.uint8).tobytes()]
    for values in (gaps, levels):
        for r in rows:
            for lo, hi in groups:
                streams.append(np.minimum(values[r, lo:hi], 255).astype(np.uint8).tobytes())
        streams.extend(_escape_planes(values))

    frames = [_zc(s) if s else b"" for s in streams]
    out = [
        _BLOB_HEAD.pack(ENCODING_IDS["compact"], flags, T, k, vocab_size),
        struct.pack("<d", step),
        struct.pack(f"<{len(zero)}d", *zero),
    ]
    if flags & _FLAG_TABLE:
        out.append(struct.pack("<I", len(table_blob)) + table_blob)
    out.append(struct.pack("<I", len(frames)) + struct.pack(f"<{len(frames)}I", *map(len, frames)))
    out.extend(frames)
    return b"".join(out)


def _decode_compact(body: memoryview, flags, T, k, vocab_size, table) -> Decoded:
    (step,) = struct.unpack_from("<d", body, 0)
    n_buckets = len(_MASS_EDGES) + 1
    zero = np.array(struct.unpack_from(f"<{n_buckets}d", body, 8))
    pos = 8 + 8 * n_buckets
    if flags & _FLAG_TABLE:
        (n,) = struct.unpack_from("<I", body, pos)
        table = decode_id_table(bytes(body[pos + 4 : pos + 4 + n]), vocab_size)
        pos += 4 + n
    elif table is None:
        raise ValueError("compact chunk needs its shard's id table")
    (nframes,) = struct.unpack_from("<I", body, pos)
    lengths = struct.unpack_from(f"<{nframes}I", body, pos + 4)
    pos += 4 + 4 * nframes
    streams = []
    for n in lengths:
        streams.append(_zd(body[pos : pos + n]) if n else b"")
        pos += n
    groups = _groups(k)
    n_ctx = (len(_MASS_EDGES) + 1) * len(groups)
    if nframes != 2 + 2 * (n_ctx + 3) or pos != len(body):
        raise ValueError("compact chunk has an unexpected stream layout")

    code = (np.frombuffer(streams[0], np.uint8).astype(np.int64) << 8) | np.frombuffer(streams[1], np.uint8)
    if code.shape != (T,):
        raise ValueError("compact chunk's mass stream has the wrong length")
    mass = _mass_value(code)
    rows, groups = _contexts(mass, k)
    at = 2
    gaps = _read_values(streams[at : at + n_ctx + 3], rows, groups, T, k)
    at += n_ctx + 3
    levels = _read_values(streams[at : at + n_ctx + 3], rows, groups, T, k)

    rank = np.cumsum(gaps + 1, axis=1) - 1
    if T and rank[:, -1].max() >= vocab_size:
        raise ValueError("compact chunk decodes to ids outside the vocabulary")
    ids = np.asarray(table)[rank].astype(np.int32)
    rec = np.square(levels * step)
    for b, r in enumerate(rows):
        rec[r] = np.where(levels[r] == 0, zero[b], rec[r])
    total = rec.sum(1)
    # A token whose entries all decode to 0 (only possible when its exact ones are all 0) keeps 0s.
    probs = rec * np.divide(1.0 - mass, total, out=np.zeros_like(total), where=total > 0)[:, None]
    return Decoded(ids, probs.astype(np.float32), mass.astype(np.float32))


def _mean_or(values: np.ndarray, default: float) -> float:
    return float(values.mean()) if values.size else default


def _escape_planes(values: np.ndarray) -> list[bytes]:
    """Values >= 255 (marked 255 in the byte streams) as three byte planes of ``value - 255``."""
    e = values[values >= 255].ravel() - 255  # row-major order
    return [((e >> s) & 0xFF).astype(np.uint8).tobytes() for s in (0, 8, 16)]


def _read_values(streams, rows, groups, T, k) -> np.ndarray:
    out = np.empty((T, k), dtype=np.int64)
    i = 0
    for r in rows:
        for lo, hi in groups:
            a = np.frombuffer(streams[i], dtype=np.uint8)
            i += 1
            if a.size != len(r) * (hi - lo):
                raise ValueError("compact chunk stream has the wrong length")
            out[r, lo:hi] = a.reshape(len(r), hi - lo)
    planes = [np.frombuffer(s, dtype=np.uint8).astype(np.int64) for s in streams[i : i + 3]]
    esc = out == 255
    if any(p.size != int(esc.sum()) for p in planes):
        raise ValueError("compact chunk escape stream has the wrong length")
    out[esc] += planes[0] | (planes[1] << 8) | (planes[2] << 16)
    return out


def _mass_or_default(mass_left, probs: np.ndarray) -> np.ndarray:
    if mass_left is None:
        return np.clip(1.0 - probs.astype(np.float64).sum(1), 0.0, 1.0)
    mass = np.asarray(mass_left, dtype=np.float64)
    if mass.shape != probs.shape[:1]:
        raise ValueError(f"mass_left must be [T]={probs.shape[:1]}, got {mass.shape}")
    return np.clip(mass, 0.0, 1.0)


def _mass_code(mass: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        code = np.rint(-np.log2(mass) * _MASS_SCALE)
    return np.where(mass > 0, np.minimum(code, _MASS_ZERO - 1), _MASS_ZERO).astype(np.int64)


def _mass_value(code: np.ndarray) -> np.ndarray:
    return np.where(code == _MASS_ZERO, 0.0, np.exp2(-code / _MASS_SCALE))


def _inverse(table: np.ndarray) -> np.ndarray:
    inv = np.empty(len(table), dtype=np.int64)
    inv[np.asarray(table, dtype=np.int64)] = np.arange(len(table))
    return inv


def _zc(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def _zd(data) -> bytes:
    return zstandard.ZstdDecompressor().decompress(bytes(data))
