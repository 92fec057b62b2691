"""Reading documents from local text sources, one at a time, in a fixed order.

Supported: JSONL (``.jsonl``, ``.jsonl.gz``, ``.json`` with one object per line), Parquet, plain
``.txt`` (one file = one document), saved Hugging Face ``datasets`` directories
(``save_to_disk``), and directories of such files (recursively, sorted by path). The order is
deterministic so that a resumed `famex data` run can skip what it already wrote.

What this module does not do: tokenize, split or write anything.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from famex.errors import FamexError

TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in TEXT_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files and saved-dataset directories named by ``inputs``, in reading order."""
    if not inputs:
        raise FamexError("no input given — pass --input FILE_OR_DIR... (JSONL, Parquet, .txt or a saved datasets dir), or --demo")
    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FamexError(f"input not found: {path} — check the path (JSONL, Parquet, .txt files or directories)")
        if path.is_file():
            if _suffix(path) not in TEXT_SUFFIXES:
                raise FamexError(f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES)} or a saved datasets directory")
            out.append(path)
        elif is_saved_dataset(path):
            out.append(path)
        else:
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in TEXT_SUFFIXES)
            datasets_dirs = sorted(p for p in path.rglob("*") if is_saved_dataset(p))
            if not found and not datasets_dirs:
                raise FamexError(f"{path}: no JSONL, Parquet or .txt files (or saved datasets) found in this directory")
            out.extend(sorted(found + datasets_dirs))
    return out


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FamexError(
            f"{where}: invalid UTF-8 at byte {e.start} — re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(_decode(raw, where))
            except json.JSONDecodeError as e:
                raise FamexError(f"{where}: not valid JSON ({e.msg}) — each line must be one JSON object") from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise FamexError(f"{where}: no {field!r} field (found: {keys}) — pass --text-field NAME")
            text = record[field]
            if not isinstance(text, str):
                raise FamexError(f"{where}: field {field!r} is {type(text).__name__}, not text")
            yield text


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise FamexError(f"{path}: not a readable Parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise FamexError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}) — pass --text-field NAME")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _saved_dataset(path: Path, field: str) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    parts = [ds[name] for name in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    for part in parts:
        if field not in part.column_names:
            raise FamexError(f"{path}: no column {field!r} (columns: {', '.join(part.column_names)}) — pass --text-field NAME")
        for row in part.select_columns([field]).iter(batch_size=1024):
            yield from (t for t in row[field] if t is not None)


def iter_documents(paths: list[Path], field: str = "text") -> Iterator[str]:
    """Every document of every input, in order (empty documents included; callers skip them)."""
    for path in paths:
        if path.is_dir():
            yield from _saved_dataset(path, field)
            continue
        kind = _suffix(path)
        if kind in (".jsonl", ".jsonl.gz", ".json"):
            yield from _jsonl(path, field)
        elif kind == ".parquet":
            yield from _parquet(path, field)
        else:
            yield _decode(path.read_bytes(), str(path))
