"""The sparse teacher-logit store on disk: shard files, manifest, writer helpers, reader, verify.

A store directory holds::

    manifest.json        what was stored and how (teacher, tokenizer, data, encoding, k, T, seq_len,
                         permutation, shard list with sha256 checksums), and a digest of its own fields
    permutation.bin      uint64 LE: the data chunk index at each store position
    shard-NNNNN.fxl      ~131,072 tokens each: a self-describing header, then one record per chunk

Chunks are stored in *store order*, a seeded permutation of the data's chunks fixed at generation
time, so a trainer that visits chunks in that order reads the shards strictly sequentially. Each
record holds, for the ``seq_len`` positions of one chunk, the input token ids it was made from and
the top-k ids, probabilities and left-out mass (see `famex.teacher.codec`). docs/store-format.md
gives the layout byte by byte.

Every byte of a shard is covered by a checksum that the reader checks before using it: the header
by its own sha256, the id table and each chunk record by sha256s listed in the header. The
manifest carries a ``digest`` of its fields (`famex.integrity`), checked when the store is opened,
and every shard header is cross-checked against it (params, positions, token hash, stats). Shards are
written whole through a temporary file and a rename, so a shard that exists is a finished one.

What this module does not do: run the teacher (`famex.teacher.generate` does) or decide which
rank writes which shard beyond the `shard_plan` rule.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import zstandard

from famex import integrity
from famex.errors import FamexError
from famex.teacher import codec
from famex.utils import FileArray, atomic_write_bytes, atomic_write_json, read_json, sha256_file

MAGIC = b"FAMEXLGT"
#: 2: compact with adaptive k (per-token kept counts, padding on decode). 1 (fixed k) is refused.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PERMUTATION = "permutation.bin"
#: Tokens per shard (the paper's groups of ~131k tokens); a shard holds whole chunks.
TOKENS_PER_SHARD = 131072
_PREFIX = struct.Struct("<8sII32s")  # magic, format version, header length, sha256(header)
#: Chunks per shard that are decoded again at write time to measure the encoding's KL.
KL_SAMPLE_CHUNKS = 4
#: Keys every manifest has (generate.py adds teacher, tokenizer and data identity to them).
REQUIRED_PARAMS = ("encoding", "k", "vocab_size", "seq_len")
#: Header fields that must equal the manifest's where the manifest has them.
_SHARED_PARAMS = (*REQUIRED_PARAMS, "format_version", "store_id", "kl_target", "drop_below")


@dataclass
class ChunkLogits:
    """One chunk as the writer takes it: ``T = seq_len`` positions of one data chunk."""

    data_index: int
    token_ids: np.ndarray  # [T] input token ids of the chunk
    ids: np.ndarray  # [T, k] top-k vocabulary ids
    probs: np.ndarray  # [T, k] float32 probabilities
    mass_left: np.ndarray | None = None  # [T] 1 - sum(probs), from the teacher's logits


@dataclass
class StoreChunk:
    """One chunk as the reader yields it (torch tensors, CPU)."""

    position: int  # place in store order
    data_index: int  # index of the chunk in the data split (`famex.data.packing.PackedChunks`)
    token_ids: torch.Tensor  # [T] int64, the inputs the teacher saw
    ids: torch.Tensor  # [T, k] int64; -1 in padding slots (compact: adaptive k kept fewer ids)
    probs: torch.Tensor  # [T, k] float32; 0 in padding slots
    mass_left: torch.Tensor  # [T] float32: 1 - sum(probs), the dropped ids' mass included


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.fxl"


def chunks_per_shard(seq_len: int, tokens_per_shard: int = TOKENS_PER_SHARD) -> int:
    return max(1, tokens_per_shard // seq_len)


def shard_plan(n_chunks: int, per_shard: int) -> list[tuple[int, int]]:
    """Store-position ranges ``[start, stop)`` of each shard."""
    return [(s, min(s + per_shard, n_chunks)) for s in range(0, n_chunks, per_shard)]


def tokens_hash(token_arrays: Iterable[np.ndarray]) -> str:
    """sha256 of the token ids of consecutive chunks, each as int64 little-endian."""
    h = hashlib.sha256()
    for t in token_arrays:
        h.update(np.ascontiguousarray(np.asarray(t), dtype="<i8").tobytes())
    return h.hexdigest()


# --- writing ---------------------------------------------------------------------------------


def encode_shard(
    chunks: Sequence[ChunkLogits],
    *,
    shard: int,
    position_start: int,
    encoding: str,
    vocab_size: int,
    k: int,
    seq_len: int,
    kl_target: float = codec.DEFAULT_KL_TARGET,
    drop_below: float = codec.DEFAULT_DROP_BELOW,
    store_id: str | None = None,
    kl_chunks: int = KL_SAMPLE_CHUNKS,
) -> bytes:
    """The bytes of one shard file holding ``chunks`` at store positions ``position_start...``.

    ``store_id`` (a hash of everything that decides the store's content) is written into the header
    so that resume never takes a shard of another store for one of this store. The header's
    ``stats`` hold, over all positions, the mean exact top-k mass, the mean mass the decoded ids
    keep and their mean number (adaptive k); and, measured by decoding up to ``kl_chunks`` of its
    chunks (evenly spaced) and comparing with the exact input, the encoding's KL in both directions
    (against the exact top-k_t) and the KL against the whole exact top-k (adaptive k's drops included).
    """
    if not chunks:
        raise ValueError("a shard needs at least one chunk")
    table = None
    payload: list[bytes] = []
    header: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "encoding": encoding,
        "vocab_size": int(vocab_size),
        "k": int(k),
        "seq_len": int(seq_len),
        "shard": int(shard),
        "positions": [int(position_start), int(position_start + len(chunks))],
        "token_ids_sha256": tokens_hash(c.token_ids for c in chunks),
    }
    if store_id is not None:
        header["store_id"] = store_id
    offset = 0
    if encoding == "compact":
        header["kl_target"] = float(kl_target)
        header["drop_below"] = float(drop_below)
        # One id table per shard: built from every chunk in it, so it costs <1 byte/token.
        table = codec.build_id_table((c.ids for c in chunks), vocab_size)
        blob = codec.encode_id_table(table, codec.used_entries(table, (c.ids for c in chunks)))
        header["id_table"] = {"offset": 0, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        payload.append(blob)
        offset = len(blob)
    records = []
    logit_blobs = []
    for c in chunks:
        token_ids = np.asarray(c.token_ids)
        if token_ids.shape != (seq_len,) or np.shape(c.ids) != (seq_len, k):
            raise ValueError(
                f"chunk {c.data_index}: token_ids {token_ids.shape} and ids {np.shape(c.ids)} must be [{seq_len}] and [{seq_len}, {k}]"
            )
        tok = zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL).compress(np.ascontiguousarray(token_ids, dtype="<u4").tobytes())
        logits = codec.encode(
            c.ids, c.probs, vocab_size, encoding=encoding, mass_left=c.mass_left, table=table, kl_target=kl_target,
            drop_below=drop_below,
        )
        records.append(
            {
                "data_index": int(c.data_index),
                "offset": offset,
                "tokens_bytes": len(tok),
                "logits_bytes": len(logits),
                "sha256": hashlib.sha256(tok + logits).hexdigest(),
            }
        )
        payload += [tok, logits]
        logit_blobs.append(logits)
        offset += len(tok) + len(logits)
    header["chunks"] = records
    header["payload_bytes"] = offset
    header["stats"] = _shard_stats(chunks, logit_blobs, table, kl_chunks, encoding)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head), hashlib.sha256(head).digest()) + head + b"".join(payload)


def _shard_stats(chunks, logit_blobs, table, kl_chunks, encoding) -> dict[str, Any]:
    """Masses and kept counts over all positions; the decoded-vs-exact KLs over sampled chunks."""
    mass = np.concatenate([_exact_mass(c) for c in chunks])
    if encoding == "compact":  # from the mass and count streams alone
        kept, left = zip(*(codec.kept_summary(b) for b in logit_blobs))
        kept_mass = 1.0 - np.concatenate(left)
    else:  # paper lists every id and decodes to exactly the fp32 probabilities it was given
        kept = [np.full(len(c.ids), np.shape(c.ids)[1]) for c in chunks]
        kept_mass = np.concatenate([np.asarray(c.probs, dtype=np.float64).sum(1) for c in chunks])
    sample = sorted({int(round(x)) for x in np.linspace(0, len(chunks) - 1, min(max(kl_chunks, 0), len(chunks)))})
    kls: dict[str, list[np.ndarray]] = {}
    for i in sample:
        c = chunks[i]
        dec = codec.decode(logit_blobs[i], table=table)
        for key, v in codec.kl_metrics(c.ids, c.probs, _exact_mass(c), dec.ids, dec.probs, dec.mass_left).items():
            kls.setdefault(key, []).append(v)
    kl_positions = int(sum(len(x) for x in kls.get("kl_decoded_vs_exact", [])))
    return {
        "positions": int(len(mass)),
        "mass_covered": float(1.0 - mass.mean()),
        "mass_kept": float(kept_mass.mean()),
        "mean_kept_k": float(np.concatenate(kept).mean()),
        "kl_positions": kl_positions,
        **{key: float(np.concatenate(kls[key]).mean()) if kl_positions else None for key in codec.KL_FIGURES},
    }


def _exact_mass(c: ChunkLogits) -> np.ndarray:
    if c.mass_left is not None:
        return np.asarray(c.mass_left, dtype=np.float64)
    return np.clip(1.0 - np.asarray(c.probs, dtype=np.float64).sum(1), 0.0, 1.0)


def write_shard(store_dir: str | os.PathLike, data: bytes, shard: int) -> dict[str, Any]:
    """Write one encoded shard atomically; return its manifest entry."""
    path = Path(store_dir) / shard_name(shard)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise FamexError(
            f"could not write {path} ({e.strerror or e}); free space or choose another --out, then rerun to resume "
            f"(finished shards are kept, no partial shard is left)"
        ) from None
    return shard_entry(path, data)


def shard_entry(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """The manifest entry of a shard file: name, size, sha256, positions, token hash."""
    path = Path(path)
    header = read_header(path)
    sha = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    return {
        "file": path.name,
        "bytes": len(data) if data is not None else path.stat().st_size,
        "sha256": sha,
        "positions": header["positions"],
        "token_ids_sha256": header["token_ids_sha256"],
        "stats": header["stats"],
    }


def shard_is_complete(store_dir: str | os.PathLike, shard: int, positions: tuple[int, int], params: dict) -> bool:
    """True when the shard file exists with a valid header for exactly these positions and params.

    Used by resume: writes are atomic, so a shard that exists was written whole; its header is
    checked so a shard of another store is never taken for one of this store.
    """
    path = Path(store_dir) / shard_name(shard)
    if not path.is_file():
        return False
    try:
        header = read_header(path)
    except FamexError:
        return False
    same = all(header.get(key) == params.get(key) for key in (*REQUIRED_PARAMS, "store_id"))
    size_ok = path.stat().st_size == _PREFIX.size + _header_len(path) + header["payload_bytes"]
    return same and tuple(header["positions"]) == tuple(positions) and size_ok


def write_permutation(store_dir: str | os.PathLike, permutation, block: int = 1 << 20) -> dict[str, Any]:
    """Write ``permutation`` (an array, or anything indexable by an array of positions with a length,
    such as `famex.data.packing.ChunkOrder`) block by block: memory stays flat in its length."""
    digest = hashlib.sha256()

    def pieces():
        for lo in range(0, len(permutation), block):
            data = np.ascontiguousarray(permutation[np.arange(lo, min(lo + block, len(permutation)))], dtype="<u8").tobytes()
            digest.update(data)
            yield data

    atomic_write_bytes(Path(store_dir) / PERMUTATION, pieces())
    return {"file": PERMUTATION, "dtype": "<u8", "count": len(permutation), "sha256": digest.hexdigest()}


def write_manifest(
    store_dir: str | os.PathLike, params: dict[str, Any], permutation, shards: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write permutation.bin and manifest.json (last: a store with a manifest is a finished store)."""
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ValueError(f"manifest params lack {missing}")
    shards = sorted(shards, key=lambda s: s["positions"][0])
    expected = 0
    for s in shards:
        if s["positions"][0] != expected:
            raise FamexError(f"store {store_dir}: shards do not cover positions from {expected}; a shard is missing — rerun to finish it")
        expected = s["positions"][1]
    if expected != len(permutation):
        raise FamexError(f"store {store_dir}: shards cover {expected} of {len(permutation)} chunks; rerun to finish the store")
    manifest = {
        "format": "famex-logit-store",
        "format_version": FORMAT_VERSION,
        **params,
        "chunks": int(len(permutation)),
        "tokens": int(len(permutation) * params["seq_len"]),
        "bytes": int(sum(s["bytes"] for s in shards)),
        "permutation": write_permutation(store_dir, permutation),
        "shards": shards,
    }
    manifest = integrity.with_digest(manifest)
    atomic_write_json(Path(store_dir) / MANIFEST, manifest)
    return manifest


def refuse_other_format(store_dir: str | os.PathLike) -> None:
    """Raise if ``store_dir`` holds a store (finished or not) of another format version.

    Resume and "already complete" must never take an old store for a current one: its shards
    would be skipped and then refused by every reader.
    """
    store_dir = Path(store_dir)
    found = None
    mpath = store_dir / MANIFEST
    if mpath.is_file():
        try:
            found = read_json(mpath).get("format_version")
        except (json.JSONDecodeError, UnicodeDecodeError):
            found = None
    for path in sorted(store_dir.glob("shard-*.fxl"))[:1] if found is None else []:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
        if len(prefix) == _PREFIX.size and prefix[:8] == MAGIC:
            found = _PREFIX.unpack(prefix)[1]
    if found is not None and found != FORMAT_VERSION:
        raise FamexError(
            f"{store_dir} holds a logit store of format version {found}; this famex writes version {FORMAT_VERSION} "
            f"(compact with adaptive k) — delete {store_dir} or choose another --out, then rerun"
        )


# --- reading ---------------------------------------------------------------------------------


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
    return _PREFIX.unpack(prefix)[2] if len(prefix) == _PREFIX.size else 0


def parse_header(data: bytes | memoryview, name: str) -> tuple[dict[str, Any], int]:
    """Check a shard's prefix and header; return the header and where its payload starts."""
    if len(data) < _PREFIX.size:
        raise FamexError(f"{name}: truncated shard (no header) — delete it and rerun `famex logits` to rewrite it")
    magic, version, n, digest = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise FamexError(f"{name}: not a famex logit shard (bad magic) — delete it and rerun `famex logits`")
    if version != FORMAT_VERSION:
        raise FamexError(
            f"{name}: shard format version {version}, this famex reads {FORMAT_VERSION} — regenerate the store with `famex logits`"
        )
    head = bytes(data[_PREFIX.size : _PREFIX.size + n])
    if len(head) != n or hashlib.sha256(head).digest() != digest:
        raise FamexError(f"{name}: header checksum mismatch — the shard is corrupt; delete it and rerun `famex logits`")
    return json.loads(head), _PREFIX.size + n


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        n = _PREFIX.unpack(prefix)[2] if len(prefix) == _PREFIX.size and prefix[:8] == MAGIC else 0
        data = prefix + f.read(n)
    return parse_header(data, str(path))[0]


@dataclass
class _Shard:
    path: Path
    header: dict[str, Any]
    payload: int  # file offset of the payload
    table: np.ndarray | None


class LogitStore:
    """Read a logit store: ``store[i]`` (random access by store position) or ``store.stream()``.

    ``stream()`` reads shards in order with a background thread that reads, checks and decodes
    ahead of the consumer (decompression releases the GIL). Every chunk is checked against its
    checksum before it is decoded; a mismatch raises `FamexError` naming the shard.
    """

    def __init__(self, path: str | os.PathLike, prefetch: int = 8, cache_shards: int = 4):
        self.dir = Path(path)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise FamexError(f"{self.dir} is not a finished logit store (no {MANIFEST}) — run `famex logits` (again) to finish it")
        self.manifest = integrity.read_json_checked(mpath, "the store is damaged; regenerate it with `famex logits`")
        if self.manifest.get("format") != "famex-logit-store":
            raise FamexError(f"{mpath} is not a famex logit store manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise FamexError(
                f"{self.dir}: store format version {self.manifest.get('format_version')}, this famex reads {FORMAT_VERSION} "
                f"(version 2 added adaptive k to the compact encoding) — regenerate it with `famex logits` into a new --out"
            )
        self.encoding: str = self.manifest["encoding"]
        self.k: int = int(self.manifest["k"])
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.seq_len: int = int(self.manifest["seq_len"])
        self.permutation = self._read_permutation()
        self._starts = [s["positions"][0] for s in self.manifest["shards"]]
        self.prefetch = prefetch
        self._cache: OrderedDict[int, _Shard] = OrderedDict()
        self._cache_size = cache_shards
        self._lock = threading.Lock()

    def _read_permutation(self) -> np.ndarray:
        info = self.manifest["permutation"]
        path = self.dir / info["file"]
        if not path.is_file():
            raise FamexError(f"{path} is missing — the store is incomplete; rerun `famex logits`")
        # Hashed in pieces and read per position (8 bytes × 415M chunks at 1.7T tokens: never in memory).
        if sha256_file(path) != info["sha256"]:
            raise FamexError(f"{path}: checksum mismatch — the store's permutation is corrupt; regenerate the store")
        arr = FileArray(path, "<u8", path.stat().st_size // 8)
        if len(arr) != int(self.manifest["chunks"]):
            raise FamexError(f"{path}: {len(arr)} entries for {self.manifest['chunks']} chunks — the store is damaged; regenerate it")
        return arr

    def __len__(self) -> int:
        return int(self.manifest["chunks"])

    @property
    def tokens(self) -> int:
        return len(self) * self.seq_len

    def data_index(self, position: int) -> int:
        """The data chunk stored at ``position``."""
        return int(self.permutation[position])

    def __getitem__(self, position: int) -> StoreChunk:
        if not 0 <= position < len(self):
            raise IndexError(f"store position {position} outside [0, {len(self)})")
        si = bisect.bisect_right(self._starts, position) - 1
        shard = self._shard(si)
        rec = shard.header["chunks"][position - shard.header["positions"][0]]
        with open(shard.path, "rb") as f:
            f.seek(shard.payload + rec["offset"])
            data = f.read(rec["tokens_bytes"] + rec["logits_bytes"])
        return self._decode(shard, position, rec, data)

    def __iter__(self) -> Iterator[StoreChunk]:
        return self.stream()

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[StoreChunk]:
        """Chunks at positions ``[start, stop)`` in store order, read and decoded ahead by a thread."""
        stop = len(self) if stop is None else min(stop, len(self))
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        halt = threading.Event()
        end = object()

        def put(item) -> bool:
            while not halt.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                pos = start
                while pos < stop:
                    si = bisect.bisect_right(self._starts, pos) - 1
                    path = self.dir / self.manifest["shards"][si]["file"]
                    data = self._read_file(path)
                    header, payload = parse_header(data, str(path))
                    shard = _Shard(path, header, payload, _table(path, header, _table_bytes(header, data, payload)))
                    self._check_header(si, shard)
                    first, last = header["positions"]
                    while pos < min(last, stop):
                        rec = header["chunks"][pos - first]
                        o = payload + rec["offset"]
                        chunk = self._decode(shard, pos, rec, memoryview(data)[o : o + rec["tokens_bytes"] + rec["logits_bytes"]])
                        if not put(chunk):
                            return
                        pos += 1
                put(end)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(e)

        thread = threading.Thread(target=work, name="famex-logit-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            halt.set()
            thread.join()

    # -- internals

    def _read_file(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FamexError(f"{path} is missing — the store is incomplete; rerun `famex logits` on it") from None

    def _shard(self, si: int) -> _Shard:
        with self._lock:
            if si in self._cache:
                self._cache.move_to_end(si)
                return self._cache[si]
        path = self.dir / self.manifest["shards"][si]["file"]
        try:
            with open(path, "rb") as f:
                prefix = f.read(_PREFIX.size)
                n = _PREFIX.unpack(prefix)[2] if len(prefix) == _PREFIX.size and prefix[:8] == MAGIC else 0
                head = prefix + f.read(n)
                header, payload = parse_header(head, str(path))
                tinfo = header.get("id_table")
                tdata = b""
                if tinfo:
                    f.seek(payload + tinfo["offset"])
                    tdata = f.read(tinfo["bytes"])
        except FileNotFoundError:
            raise FamexError(f"{path} is missing — the store is incomplete; rerun `famex logits` on it") from None
        table = _table(path, header, tdata)
        shard = _Shard(path, header, payload, table)
        self._check_header(si, shard)
        with self._lock:
            self._cache[si] = shard
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return shard

    def _check_header(self, si: int, shard: _Shard) -> None:
        entry = self.manifest["shards"][si]
        h = shard.header
        for key in _SHARED_PARAMS:
            if (key in REQUIRED_PARAMS or key in self.manifest) and h.get(key) != self.manifest.get(key):
                raise FamexError(f"{shard.path}: {key} {h.get(key)!r} differs from the manifest's {self.manifest.get(key)!r} — the shard belongs to another store")
        for key in ("positions", "token_ids_sha256", "stats"):
            if key in entry and integrity.canonical(h.get(key)) != integrity.canonical(entry[key]):  # NaN == NaN here
                raise FamexError(f"{shard.path}: header field {key} differs from the manifest's entry for {entry.get('file')} — "
                                 f"the shard belongs to another store or the manifest is damaged; regenerate the store")

    def _decode(self, shard: _Shard, position: int, rec: dict, data) -> StoreChunk:
        data = bytes(data)
        if hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise FamexError(
                f"{shard.path}: chunk at store position {position} fails its checksum — the shard is corrupt; "
                f"delete it and rerun `famex logits` to rewrite it"
            )
        if rec["data_index"] != int(self.permutation[position]):
            raise FamexError(f"{shard.path}: chunk at position {position} is data chunk {rec['data_index']}, the permutation says {self.permutation[position]}")
        n = rec["tokens_bytes"]
        try:
            token_ids = np.frombuffer(zstandard.ZstdDecompressor().decompress(data[:n]), dtype="<u4")
            dec = codec.decode(data[n:], table=shard.table)
        except (ValueError, zstandard.ZstdError) as e:
            raise FamexError(f"{shard.path}: chunk at store position {position} does not decode ({e}) — regenerate the shard") from None
        return StoreChunk(
            position=position,
            data_index=int(rec["data_index"]),
            token_ids=torch.from_numpy(token_ids.astype(np.int64)),
            ids=torch.from_numpy(dec.ids.astype(np.int64)),
            probs=torch.from_numpy(dec.probs),
            mass_left=torch.from_numpy(dec.mass_left),
        )


def _table_bytes(header: dict, data, payload: int) -> bytes:
    info = header.get("id_table")
    if not info:
        return b""
    return bytes(memoryview(data)[payload + info["offset"] : payload + info["offset"] + info["bytes"]])


def _table(path: Path, header: dict, blob: bytes) -> np.ndarray | None:
    """The shard's id table (compact encoding), checked against its sha256."""
    info = header.get("id_table")
    if not info:
        return None
    if len(blob) != info["bytes"] or hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise FamexError(f"{path}: id table checksum mismatch — the shard is corrupt; delete it and rerun `famex logits`")
    try:
        return codec.decode_id_table(blob, header["vocab_size"])
    except (ValueError, zstandard.ZstdError) as e:
        raise FamexError(f"{path}: id table does not decode ({e}) — regenerate the shard") from None


def verify(path: str | os.PathLike, decode: bool = True) -> dict[str, Any]:
    """Check every shard of a store against the manifest (sha256, header, every chunk).

    Returns a summary (shards, chunks, tokens, bytes). Raises `FamexError` listing every problem
    found, each naming its file.
    """
    store = LogitStore(path)
    problems: list[str] = []
    for si, entry in enumerate(store.manifest["shards"]):
        p = store.dir / entry["file"]
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest — corrupt or replaced")
            continue
        if decode:
            try:
                for _ in store.stream(*entry["positions"]):
                    pass
            except FamexError as e:
                problems.append(str(e))
    listed = {s["file"] for s in store.manifest["shards"]}
    problems += [f"{p}: a shard file the manifest does not list" for p in sorted(store.dir.glob("shard-*.fxl")) if p.name not in listed]
    if problems:
        raise FamexError(f"store {store.dir} failed verification ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return {"shards": len(listed), "chunks": len(store), "tokens": store.tokens, "bytes": int(store.manifest["bytes"])}
