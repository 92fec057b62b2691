"""Encodings of sparse teacher distributions: one chunk of top-k (ids, probabilities) <-> bytes.

A chunk is ``T`` token positions, each with ``k`` vocabulary ids, their probabilities and the mass
left out (``1 - sum(probs)``, the probability of every other id). Two encodings:

``paper``
    The paper's layout, for fidelity: int32 ids and float32 probabilities, row-major, gzip.
    Ids and probabilities round-trip bit-exactly; the left-out mass is derived on decode.

``compact`` (the default)
    *Adaptive k*: per token, the ids of probability below a threshold (``drop_below``) move into
    the left-out mass (`keep_mask`). The kept ids, mapped through a frequency table (ids often in
    the top-k get small ranks), are sorted and delta-coded; each kept probability is quantized
    uniformly in the square-root domain; the left-out mass (now including the dropped mass) is
    kept on a fine log scale; every byte stream is compressed with zstd. The kept ids are exact,
    the probabilities approximate. A decoded token lists ``k_t <= k`` ids and pads the rest with
    id -1 and probability 0, which the distillation loss reads as padding.

Why the square-root domain: the store serves a KL loss, and for small errors both
``KL(p || p + e)`` and ``KL(p + e || p)`` are ``~ sum e_i^2 / (2 p_i)``. A uniform step ``step`` in
``sqrt(p)`` makes every entry contribute the same expected error, ``step^2 / 6`` nats, so
``step = sqrt(6 kl / k_mean)`` spends a KL budget evenly; large probabilities get fine steps,
the tail coarse ones. Measured on the default teacher, this beats log-domain steps at equal KL.

Why adaptive k: every listed id costs ~10 bits (its place in the id set plus its level) whatever
its probability, and the tail of a top-256 is long: on the default teacher half of the top-256
ids of a position have probability below 2.5e-4, together ~0.9% of the mass. Listing them is
most of the bytes; dropping them is what brings k = 256 from ~340 to ~180 bytes/token. What it costs
is measured separately from the encoding's own error (docs/store-format.md):

- `kl_decoded_vs_exact` (and `kl_exact_vs_decoded`, the other direction): the encoding's error on
  the ids a token lists, against the *exact top-k_t* (the teacher's probabilities of those ids,
  everything else in the tail). The compact encoder's ``kl_target`` is spent here.
- `kl_decoded_vs_top_k`: against the whole exact top-k, where a dropped id costs about its own
  probability: adaptive k's information loss, ~the dropped mass.

Neither counts the top-k truncation itself (the teacher's mass outside its top-k).

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
# Blob encoding ids. 2 was the compact layout of store format 1 (fixed k); it is refused on decode.
ENCODING_IDS = {"paper": 1, "compact": 3}
_OLD_COMPACT = 2

#: Default KL budget of the compact encoding's probability quantization (nats per token, mean
#: over a chunk), in KL(decoded || exact top-k_t): 10% under the 1e-3 target, because the step
#: is set from an estimate of the error (measured within ~2%).
DEFAULT_KL_TARGET = 9e-4
#: Default adaptive-k threshold: ids of probability below it move into the left-out mass (0 =
#: fixed k). On the default teacher's top-256 of the demo corpus, in a full 131,072-token shard,
#: it lists ~123 ids per position, drops ~0.9% of the mass and takes 182 bytes/token, 11% under
#: the issue's 205 (2e-4: 197, 3e-4: 169; docs/store-format.md has the sweep).
DEFAULT_DROP_BELOW = 2.5e-4

#: zstd level: level 3 compresses these streams within 3% of level 19 at ~20x its speed.
ZSTD_LEVEL = 3

# Column groups of the sorted id list, each coded with its own entropy table: early columns
# (frequent ids) have small gaps, late ones large gaps. 8 groups saved ~3% over one stream.
_MAX_GROUPS = 8
# Tokens are also split by their left-out mass (flat distributions have higher levels and other
# gaps than peaked ones); the decoder reads the mass first. 4 buckets saved ~5% at k=256.
_MASS_EDGES = np.array([0.01, 0.05, 0.15])
_N_BUCKETS = len(_MASS_EDGES) + 1
# Escapes (values >= 255) are stored in three byte planes: ids up to 2**24.
_MAX_VOCAB = 1 << 24
# Mass left is stored as round(-log2(mass) * 512) in a uint16: relative error <= 0.07% down to
# 2**-128; the top code means exactly zero.
_MASS_SCALE = 512.0
_MASS_ZERO = 0xFFFF
_BLOB_HEAD = struct.Struct("<BBIII")  # encoding id, flags, T, k, vocab_size
_FLAG_TABLE = 1  # compact: the id table is embedded in the blob
# Probabilities below this count as this value in the KL metrics, so that a zero where the other
# side is positive (fp32 rounding of 1 - sum(p)) stays finite yet visible.
_KL_FLOOR = 1e-30


@dataclass(frozen=True)
class Decoded:
    """One decoded chunk. Within a token the entries are in no particular order.

    A token of a compact chunk may list fewer than k ids (adaptive k): the remaining slots hold
    id -1 and probability 0.
    """

    ids: np.ndarray  # [T, k] int32, -1 in padding slots
    probs: np.ndarray  # [T, k] float32, 0 in padding slots
    mass_left: np.ndarray  # [T] float32: 1 - sum(probs), dropped entries included


def step_for(kl_target: float, k: float) -> float:
    """The sqrt-domain quantization step that spends ``kl_target`` nats per token over k entries."""
    if kl_target <= 0:
        raise ValueError(f"kl_target must be positive, got {kl_target}")
    return float(np.sqrt(6.0 * kl_target / max(k, 1.0)))


def keep_mask(probs, drop_below: float) -> np.ndarray:
    """Adaptive k: which entries each token keeps (``[T, k]`` bool).

    An entry whose probability is below ``drop_below`` is dropped into the left-out mass, except
    that every token keeps its most probable entry (ties: the first column). ``drop_below = 0``
    keeps every entry (fixed k). A threshold on each id's probability, rather than a budget per
    token, is the least mass moved for a given number of ids dropped: every listed id costs about
    the same bytes whatever its probability, so the cheapest ids to stop listing are the least
    probable ones of the whole chunk, wherever they are.
    """
    p = np.asarray(probs, dtype=np.float64)
    T, k = p.shape
    keep = p >= drop_below
    if T and k:
        keep[np.arange(T), np.argmax(p, axis=1)] = True
    return keep


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
    drop_below: float = DEFAULT_DROP_BELOW,
) -> bytes:
    """Encode one chunk: ``ids`` [T, k] ints, ``probs`` [T, k] float32, ``mass_left`` [T] or None.

    ``mass_left`` defaults to ``1 - sum(probs)``; pass the teacher's own value (computed from the
    logits outside the top-k) to keep it exact when the top-k holds nearly all the mass. For
    ``compact``: ``table`` is the shard's id table (`build_id_table`; without one, a table is built
    from this chunk and embedded in the blob); ids of probability below ``drop_below`` move into
    the left-out mass (adaptive k, `keep_mask`; 0 keeps all k ids); ``kl_target`` is the mean
    KL(decoded || exact top-k_t) per token that the quantization of the kept probabilities may
    cost: the step is set per chunk from it and the mean number of kept ids.
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
        if not kl_target > 0:
            raise ValueError(f"kl_target must be positive, got {kl_target}")
        if not 0 <= drop_below < 1:
            raise ValueError(f"drop_below must be a probability in [0, 1), got {drop_below}")
        mass = _mass_or_default(mass_left, probs)
        return _encode_compact(ids.astype(np.int64), probs, mass, vocab_size, table, kl_target, drop_below)
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
    if enc == _OLD_COMPACT:
        raise ValueError("compact chunk of store format 1 (fixed k), which this famex no longer reads — regenerate the store")
    raise ValueError(f"unknown encoding id {enc} in chunk blob")


def kept_summary(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Per position of a chunk blob: how many ids it lists and its decoded left-out mass.

    For compact blobs only the mass and dropped-count streams are decompressed (a few bytes per
    position), so a writer can report adaptive k over every position cheaply; other blobs are
    decoded whole.
    """
    enc, flags, T, k, vocab_size = _BLOB_HEAD.unpack_from(blob, 0)
    if enc != ENCODING_IDS["compact"]:
        dec = decode(blob)
        return (dec.probs > 0).sum(1), dec.mass_left.astype(np.float64)
    body = memoryview(blob)[_BLOB_HEAD.size :]
    pos = 8 + 8 * _N_BUCKETS
    if flags & _FLAG_TABLE:
        pos += 4 + struct.unpack_from("<I", body, pos)[0]
    (nframes,) = struct.unpack_from("<I", body, pos)
    lengths = struct.unpack_from(f"<{nframes}I", body, pos + 4)
    pos += 4 + 4 * nframes
    need = 2 + _N_BUCKETS + 3
    streams = []
    for n in lengths[:need]:
        streams.append(_zd(body[pos : pos + n]) if n else b"")
        pos += n
    code = (np.frombuffer(streams[0], np.uint8).astype(np.int64) << 8) | np.frombuffer(streams[1], np.uint8)
    mass = _mass_value(code)
    dropped = _read_values(streams[2:need], _bucket_rows(mass), [(0, 1)], np.ones((T, 1), dtype=bool))[:, 0]
    return k - dropped, mass


def blob_info(blob: bytes) -> dict:
    """Encoding, T, k and vocabulary size from a blob's head, without decoding it."""
    enc, flags, T, k, vocab_size = _BLOB_HEAD.unpack_from(blob, 0)
    names = {v: n for n, v in ENCODING_IDS.items()}
    return {"encoding": names.get(enc, f"unknown({enc})"), "T": T, "k": k, "vocab_size": vocab_size}


# --- the KL metrics ------------------------------------------------------------------------


def kl_decoded_vs_exact(exact_ids, exact_probs, exact_mass, ids, probs, mass) -> np.ndarray:
    """Per-token ``D_KL(decoded || exact top-k_t)`` in nats (the store's ``kl_decoded_vs_exact``).

    What the encoding loses on the ids it lists. Both distributions live on the ``k_t`` ids the
    decoded token lists plus one tail bucket for every other id. The exact side is the teacher's
    own probabilities of those ids, its tail the rest (its left-out mass plus the exact mass of
    any id adaptive k dropped: the *exact top-k_t*); the decoded side is the decoded
    probabilities and left-out mass. Each side is rescaled to total 1 first: an fp32 softmax is
    off by ~1e-6 in total, which would otherwise show up as encoding error. Decoded ids must be a
    subset of the exact ones (padding slots, probability 0, are ignored). Neither the top-k
    truncation nor adaptive k's shorter lists count here; `kl_decoded_vs_top_k` counts the
    latter.
    """
    return kl_metrics(exact_ids, exact_probs, exact_mass, ids, probs, mass)["kl_decoded_vs_exact"]


def kl_exact_vs_decoded(exact_ids, exact_probs, exact_mass, ids, probs, mass) -> np.ndarray:
    """Per-token ``D_KL(exact top-k_t || decoded)``: `kl_decoded_vs_exact` in the other direction."""
    return kl_metrics(exact_ids, exact_probs, exact_mass, ids, probs, mass)["kl_exact_vs_decoded"]


def kl_decoded_vs_top_k(exact_ids, exact_probs, exact_mass, ids, probs, mass) -> np.ndarray:
    """Per-token ``D_KL(decoded || exact top-k)``: the encoding *and* adaptive k's dropped ids.

    The outcomes are the exact token's k ids plus one tail bucket. An id adaptive k dropped has
    decoded probability 0 and adds nothing itself; its mass moved into the decoded tail, whose
    term grows from ``m`` to ``(m + D) ln(1 + D / m) ~ D``: a dropped id costs about its own
    probability (at least ``-ln(1 - D)`` for a dropped mass ``D``, whatever the decoder did with
    it). With no drops this equals `kl_decoded_vs_exact`.
    """
    return kl_metrics(exact_ids, exact_probs, exact_mass, ids, probs, mass)["kl_decoded_vs_top_k"]


#: The names `kl_metrics` returns, as shard stats and metrics.json spell them.
KL_FIGURES = ("kl_decoded_vs_exact", "kl_exact_vs_decoded", "kl_decoded_vs_top_k")


def kl_metrics(exact_ids, exact_probs, exact_mass, ids, probs, mass) -> dict[str, np.ndarray]:
    """The three per-token KL figures above, keyed by name, from one alignment of the two sides."""
    p, pm, q, qm, listed = _aligned(exact_ids, exact_probs, exact_mass, ids, probs, mass)
    pt, pmt = _restricted(p, pm, listed)
    return {
        "kl_decoded_vs_exact": _kl_terms(q, pt).sum(1) + _kl_terms(qm, pmt),
        "kl_exact_vs_decoded": _kl_terms(pt, q).sum(1) + _kl_terms(pmt, qm),
        "kl_decoded_vs_top_k": _kl_terms(q, p).sum(1) + _kl_terms(qm, pm),
    }


def _restricted(p: np.ndarray, pm: np.ndarray, listed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k_t: unlisted ids' probabilities moved into the tail."""
    return np.where(listed, p, 0.0), pm + np.where(listed, 0.0, p).sum(1)


def _aligned(exact_ids, exact_probs, exact_mass, ids, probs, mass):
    """Both sides on the exact ids' order, each normalized to total 1; plus which ids are listed."""
    eids = np.asarray(exact_ids, dtype=np.int64)
    T, k = eids.shape
    p = np.asarray(exact_probs, dtype=np.float64)
    pm = np.asarray(exact_mass, dtype=np.float64)
    dids = np.asarray(ids, dtype=np.int64)
    dp = np.asarray(probs, dtype=np.float64)
    qm = np.asarray(mass, dtype=np.float64)
    real = dp > 0
    # Place each listed decoded id at its exact slot: search the row's sorted exact ids, with the
    # row number folded into the key so one flat searchsorted serves every row.
    span = int(max(eids.max(initial=0), dids.max(initial=0))) + 1
    order = np.argsort(eids, axis=1, kind="stable")
    keys = (np.take_along_axis(eids, order, 1) + np.arange(T)[:, None] * span).ravel()
    r, c = np.nonzero(real)
    want = dids[r, c] + r * span
    at = np.searchsorted(keys, want)
    if len(want) and (at.max() >= len(keys) or not np.array_equal(keys[np.minimum(at, len(keys) - 1)], want)):
        raise ValueError("the decoded distribution lists an id that is not in the exact top-k of its token")
    q = np.zeros((T, k))
    slot = order.ravel()[at] if len(want) else at
    np.add.at(q, (r, slot), dp[r, c])
    listed = np.zeros((T, k), dtype=bool)
    listed[r, slot] = True
    if T and listed.sum() != len(want):
        raise ValueError("the decoded distribution lists the same id twice")
    ps, qs = p.sum(1) + pm, q.sum(1) + qm
    return p / ps[:, None], pm / ps, q / qs[:, None], qm / qs, listed


def _kl_terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Elementwise p ln(p / q), 0 where p = 0."""
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


def _bucket_rows(mass: np.ndarray) -> list[np.ndarray]:
    """Positions per left-out-mass bucket (ascending): with the column groups, the coding contexts."""
    bucket = np.digitize(mass, _MASS_EDGES)
    return [np.flatnonzero(bucket == b) for b in range(_N_BUCKETS)]


def _n_streams(k: int) -> int:
    """mass (2), dropped counts (buckets + 3 escape planes), gaps and levels (buckets x groups + 3 each)."""
    return 2 + (_N_BUCKETS + 3) + 2 * (_N_BUCKETS * len(_groups(k)) + 3)


def _encode_compact(ids, probs, mass, vocab_size, table, kl_target, drop_below) -> bytes:
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
    if T and (np.diff(np.sort(rank, axis=1), axis=1) == 0).any():
        raise ValueError("a token lists the same id twice; top-k ids must be distinct")

    p_all = probs.astype(np.float64)
    keep = keep_mask(p_all, drop_below)
    kept = keep.sum(1)
    # Dropped entries sort after every kept one (rank >= vocab_size) and are cut off by `valid`.
    rank = np.where(keep, rank, vocab_size + rank)
    order = np.argsort(rank, axis=1, kind="stable")
    rank = np.take_along_axis(rank, order, 1)
    p = np.take_along_axis(p_all, order, 1)
    valid = np.arange(k)[None, :] < kept[:, None]
    prev = np.concatenate([np.full((T, 1), -1, dtype=np.int64), rank[:, :-1]], 1)
    gaps = np.where(valid, rank - prev - 1, 0)
    # The KL budget is spread evenly over the kept ids.
    step = step_for(kl_target, kept.mean() if T else float(k))
    levels = np.where(valid, np.rint(np.sqrt(p) / step), 0).astype(np.int64)
    # The mass (with the dropped entries) is quantized first: the decoder reads it first and
    # derives the contexts from it.
    code = _mass_code(np.minimum(mass + np.where(keep, 0.0, p_all).sum(1), 1.0))
    rows = _bucket_rows(_mass_value(code))
    groups = _groups(k)

    # Level 0 (sqrt(p) below step/2) decodes to the mean of the exact probabilities it stands for,
    # per mass bucket: tiny for peaked tokens, larger for flat ones.
    zero = np.array([_mean_or(p[r][valid[r] & (levels[r] == 0)], step * step / 12.0) for r in rows])

    streams = [(code >> 8).astype(np.uint8).tobytes(), (code & 0xFF).astype(np.uint8).tobytes()]
    streams += _value_streams((k - kept)[:, None], np.ones((T, 1), dtype=bool), rows, [(0, 1)])
    streams += _value_streams(gaps, valid, rows, groups)
    streams += _value_streams(levels, valid, rows, groups)

    frames = [_zc(s) if s else b"" for s in streams]
    out = [
        _BLOB_HEAD.pack(ENCODING_IDS["compact"], flags, T, k, vocab_size),
        struct.pack("<d", step),
        struct.pack(f"<{_N_BUCKETS}d", *zero),
    ]
    if flags & _FLAG_TABLE:
        out.append(struct.pack("<I", len(table_blob)) + table_blob)
    out.append(struct.pack("<I", len(frames)) + struct.pack(f"<{len(frames)}I", *map(len, frames)))
    out.extend(frames)
    return b"".join(out)


def _decode_compact(body: memoryview, flags, T, k, vocab_size, table) -> Decoded:
    (step,) = struct.unpack_from("<d", body, 0)
    zero = np.array(struct.unpack_from(f"<{_N_BUCKETS}d", body, 8))
    pos = 8 + 8 * _N_BUCKETS
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
    if nframes != _n_streams(k) or pos != len(body):
        raise ValueError("compact chunk has an unexpected stream layout")

    code = (np.frombuffer(streams[0], np.uint8).astype(np.int64) << 8) | np.frombuffer(streams[1], np.uint8)
    if code.shape != (T,):
        raise ValueError("compact chunk's mass stream has the wrong length")
    mass = _mass_value(code)
    rows = _bucket_rows(mass)
    groups = _groups(k)
    at, n_ctx = 2, _N_BUCKETS * len(groups)
    dropped = _read_values(streams[at : at + _N_BUCKETS + 3], rows, [(0, 1)], np.ones((T, 1), dtype=bool))[:, 0]
    at += _N_BUCKETS + 3
    if T and dropped.max() >= k:
        raise ValueError("compact chunk drops every entry of a token")
    valid = np.arange(k)[None, :] < (k - dropped)[:, None]
    gaps = _read_values(streams[at : at + n_ctx + 3], rows, groups, valid)
    at += n_ctx + 3
    levels = _read_values(streams[at : at + n_ctx + 3], rows, groups, valid)

    rank = np.cumsum(np.where(valid, gaps + 1, 0), axis=1) - 1
    if T and rank[valid].max() >= vocab_size:
        raise ValueError("compact chunk decodes to ids outside the vocabulary")
    ids = np.where(valid, np.asarray(table)[np.clip(rank, 0, vocab_size - 1)], -1).astype(np.int32)
    rec = np.square(levels * step)
    for b, r in enumerate(rows):
        rec[r] = np.where(levels[r] == 0, zero[b], rec[r])
    rec = np.where(valid, rec, 0.0)
    total = rec.sum(1)
    # A token whose entries all decode to 0 (only possible when its exact ones are all 0) keeps 0s.
    probs = rec * np.divide(1.0 - mass, total, out=np.zeros_like(total), where=total > 0)[:, None]
    return Decoded(ids, probs.astype(np.float32), mass.astype(np.float32))


def _mean_or(values: np.ndarray, default: float) -> float:
    return float(values.mean()) if values.size else default


def _value_streams(values: np.ndarray, valid: np.ndarray, rows, groups) -> list[bytes]:
    """One uint8 stream per (bucket rows, column group) of the valid entries, then 3 escape planes.

    Values >= 255 are written as 255 and their ``value - 255`` goes, byte by byte, into three
    planes, one byte per escape in row-major order of the valid entries.
    """
    out = []
    for r in rows:
        for lo, hi in groups:
            out.append(np.minimum(values[r, lo:hi][valid[r, lo:hi]], 255).astype(np.uint8).tobytes())
    e = values[valid & (values >= 255)] - 255
    return out + [((e >> s) & 0xFF).astype(np.uint8).tobytes() for s in (0, 8, 16)]


def _read_values(streams, rows, groups, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(valid.shape, dtype=np.int64)
    i = 0
    for r in rows:
        for lo, hi in groups:
            a = np.frombuffer(streams[i], dtype=np.uint8)
            i += 1
            sub = valid[r, lo:hi]
            if a.size != int(sub.sum()):
                raise ValueError("compact chunk stream has the wrong length")
            block = np.zeros(sub.shape, dtype=np.int64)
            block[sub] = a
            out[r, lo:hi] = block
    planes = [np.frombuffer(s, dtype=np.uint8).astype(np.int64) for s in streams[i : i + 3]]
    esc = valid & (out == 255)
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
