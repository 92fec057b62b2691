"""Finding input files, and reading documents from local text sources, one at a time, in a fixed order.

Supported: JSONL (``.jsonl``, ``.jsonl.gz``, ``.json`` with one object per line), Parquet, plain
``.txt`` (one file = one document), saved Hugging Face ``datasets`` directories
(``save_to_disk``), and directories of such files (recursively, sorted by path). The order is
deterministic so that a resumed `famex data` run can skip what it already wrote.

`expand_inputs` finds the files of both kinds of input: text documents, and chat or preference
records (`famex.data.chat` reads those). Which suffix is read how is data (`FORMATS`), and so is
which formats each kind takes (`INPUT_KINDS`): chat and preference records come from JSONL,
Parquet or saved datasets, never from ``.txt``. A file named explicitly with a suffix its kind does
not read is refused before the stage starts, for chat input as for text; inside a directory such
files are skipped.

What this module does not do: tokenize, split or write anything.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from famex.errors import FamexError

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}
"""How a file is read, by its suffix (case-insensitive); a ``.json`` file holds one JSON object per line too."""

INPUT_KINDS = {
    "text": ("jsonl", "parquet", "text"),
    "chat": ("jsonl", "parquet"),
}
"""The file formats each kind of input reads: documents (text), or chat and preference records (chat)."""

_DEMO_OPTION = {"text": "--demo", "chat": "--demo-chat"}


def file_format(path: Path) -> str | None:
    """The `FORMATS` entry of a file's suffix (the longest suffix that matches), None when famex does not read it."""
    name = path.name.lower()
    matches = [s for s in FORMATS if name.endswith(s)]
    return FORMATS[max(matches, key=len)] if matches else None


def suffixes(kind: str) -> list[str]:
    """The file suffixes an input of ``kind`` reads."""
    return [s for s, fmt in FORMATS.items() if fmt in INPUT_KINDS[kind]]


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def expand_inputs(inputs: list[str], kind: str = "text") -> list[Path]:
    """Files and saved-dataset directories named by ``inputs``, in reading order, for an input of ``kind``.

    Directories are searched recursively (sorted by path) for files of the kind's formats and saved
    datasets; a file named explicitly must be of one of those formats.
    """
    readable = ", ".join(suffixes(kind))
    what = f"{readable} files, directories of them, or saved datasets directories"
    if not inputs:
        raise FamexError(f"no input given — pass --input FILE_OR_DIR... ({what}), or {_DEMO_OPTION[kind]}")
    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FamexError(f"input not found: {path} — check the path ({what})")
        if path.is_file():
            if file_format(path) not in INPUT_KINDS[kind]:
                raise FamexError(f"{path}: unsupported file type for {kind} input; use {readable} or a saved datasets directory")
            out.append(path)
        elif is_saved_dataset(path):
            out.append(path)
        else:
            datasets_dirs = sorted(p for p in path.rglob("*") if is_saved_dataset(p))
            # A saved dataset's own files (state.json, dataset_info.json) are not inputs of their own.
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p) in INPUT_KINDS[kind]
                           and not any(d in p.parents for d in datasets_dirs))
            if not found and not datasets_dirs:
                raise FamexError(f"{path}: no {readable} files (or saved datasets) found in this directory")
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
        fmt = file_format(path)
        if fmt == "jsonl":
            yield from _jsonl(path, field)
        elif fmt == "parquet":
            yield from _parquet(path, field)
        else:
            yield _decode(path.read_bytes(), str(path))
