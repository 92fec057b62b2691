"""Checksums of what a stage writes, and the checks readers and `famex verify` make with them.

Two mechanisms, used everywhere:

- a JSON document a famex stage writes (``meta.json``, a logit store's ``manifest.json``,
  ``quantization.json``) carries a ``digest``: the sha256 of each top-level field's canonical JSON
  (sorted keys, no whitespace). A reader recomputes it and names the field that no longer matches,
  so a flipped byte that still parses (a ``dtype`` or ``split`` value) is caught; whitespace, which
  parses to the same object, is harmless and not flagged. Documents written before famex recorded
  digests have none and are read as they are (unless a key one byte away from ``digest`` shows that
  the key itself was damaged).
- a file list ``{relative path: {"bytes", "sha256"}}`` of a directory: recorded in a stage's
  ``meta.json`` (``files``) when the stage finishes, and in ``checksums.json`` inside a trainer
  checkpoint before its atomic rename.

Cost: whoever takes a finished stage as input makes the *read-time* check: every listed file
present with its recorded size, and hashed whole, except the bulk files whose own reader checks
what it reads (`SELF_CHECKED`: logit-store shards, chunk by chunk; data token and mask shards, each
on first use, and their document lengths; trainer checkpoints, by their checksums.json on resume). A file that passed once is
not hashed again in the same process while its size and mtime stay the same, so a recipe that
takes one model as input of ten stages hashes it once. `famex verify` hashes everything.

What this module does not do: decide what a stage writes, or walk a run tree (`famex.verify` does).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from famex.errors import FamexError
from famex.utils import atomic_write_json, read_json, sha256_file

DIGEST = "digest"
CHECKSUMS = "checksums.json"
#: Files (glob patterns on the path relative to the stage directory) the read-time check leaves to
#: their reader: `famex.teacher.store.LogitStore` checks every chunk of a shard before decoding it,
#: `famex.data.packing.TokenSplit` hashes a token, lengths or mask shard the first time it opens it, the
#: trainer checks a checkpoint's checksums.json when it resumes from it.
SELF_CHECKED = ("shard-*.fxl", "*/tokens-*.npy", "*/docs-*.npy", "*/mask-*.npy", "checkpoints/*")
#: Hidden names that are real output, not temporary files: torch.distributed.checkpoint's index.
HIDDEN_FILES = (".metadata",)
# Files that matched their recorded sha256 in this process, by (path, size, mtime_ns, sha256): a
# memo of work done, never a reason to accept a file that changed since.
_PASSED: set[tuple[str, int, int, str]] = set()


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj``: what it parses to, not how it was spelled."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def field_digests(doc: dict[str, Any]) -> dict[str, str]:
    """sha256 (first 16 hex digits) of each top-level field of ``doc`` except the digest itself."""
    return {k: hashlib.sha256(canonical(v)).hexdigest()[:16] for k, v in doc.items() if k != DIGEST}


def with_digest(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` plus its ``digest`` (see the module docstring)."""
    return {**{k: v for k, v in doc.items() if k != DIGEST}, DIGEST: field_digests(doc)}


def digest_problems(doc: Any, path: str | os.PathLike) -> list[str]:
    """Why ``doc`` (read from ``path``) does not match its own digest; [] when it does or has none."""
    if not isinstance(doc, dict):
        return [f"{path}: not a JSON object"]
    recorded = doc.get(DIGEST)
    if recorded is None:
        damaged = [k for k in doc if len(k) == len(DIGEST) and sum(a != b for a, b in zip(k, DIGEST)) == 1]
        return [f"{path}: field {damaged[0]!r} looks like a damaged {DIGEST!r} key"] if damaged else []
    if not isinstance(recorded, dict):
        return [f"{path}: field {DIGEST!r} is not a table of field digests"]
    now = field_digests(doc)
    problems = [f"{path}: field {k!r} differs from its recorded digest" for k in sorted(now) if recorded.get(k) != now[k]]
    problems += [f"{path}: field {k!r} is recorded in the digest but missing" for k in sorted(set(recorded) - set(now))]
    return problems


def check_digest(doc: Any, path: str | os.PathLike, fix: str) -> None:
    """Raise `FamexError` naming the file and the field when ``doc`` does not match its digest."""
    problems = digest_problems(doc, path)
    if problems:
        raise FamexError(f"{problems[0]} — the file is corrupt; {fix}")


def read_json_checked(path: str | os.PathLike, fix: str) -> Any:
    """A JSON document, refused (naming the file) when it does not parse or fails its digest."""
    try:
        doc = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FamexError(f"{path} is not valid JSON ({e}) — the file is corrupt; {fix}") from None
    check_digest(doc, path, fix)
    return doc


# --- file lists ------------------------------------------------------------------------------


def _listed(root: Path, skip: Iterable[str]) -> list[Path]:
    """Regular files under ``root``, sorted; hidden names (temporary files, but `HIDDEN_FILES`) and nested stage
    directories (their own meta.json lists their files) left out."""
    skip = set(skip)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d / "meta.json").is_file())
        for name in sorted(filenames):
            p = here / name
            rel = p.relative_to(root).as_posix()
            if (not name.startswith(".") or name in HIDDEN_FILES) and rel not in skip and p.is_file() and not p.is_symlink():
                found.append(p)
    return found


def file_records(root: str | os.PathLike, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``root`` (see `_listed`)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _listed(root, skip)}


def self_checked(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in SELF_CHECKED)


def sha256_matches(path: Path, sha256: str) -> bool:
    """Whether ``path`` hashes to ``sha256`` (remembered for this process while the file is unchanged)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, sha256)
    if key in _PASSED:
        return True
    if sha256_file(path) != sha256:
        return False
    _PASSED.add(key)
    return True


def file_problems(root: str | os.PathLike, records: Any, full: bool = True, skip: Iterable[str] = (),
                  unlisted: bool | None = None) -> list[str]:
    """Files of ``records`` missing, of another size or of another sha256 (all hashed when ``full``,
    else all but `SELF_CHECKED` ones); with ``unlisted`` (default: ``full``), also files the list
    does not name."""
    root = Path(root)
    if not isinstance(records, dict):
        return [f"{root}: the recorded file list is not a table"]
    problems = []
    for rel, rec in sorted(records.items()):
        p = root / rel
        if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or not isinstance(rec.get("sha256"), str):
            problems.append(f"{p}: its checksum record is malformed")
        elif not p.is_file():
            problems.append(f"{p}: missing")
        elif (size := p.stat().st_size) != rec["bytes"]:
            problems.append(f"{p}: {size} bytes, {rec['bytes']} recorded (truncated or appended to)")
        elif (full or not self_checked(rel)) and not sha256_matches(p, rec["sha256"]):
            problems.append(f"{p}: sha256 differs from the recorded one (corrupt or replaced)")
    if full if unlisted is None else unlisted:
        problems += _unlisted(root, records, skip)
    return problems


def _unlisted(root: Path, records: dict, skip: Iterable[str]) -> list[str]:
    return [f"{p}: a file no checksum list names" for p in _listed(root, skip) if p.relative_to(root).as_posix() not in records]


def write_checksums(root: str | os.PathLike, known: dict[str, dict[str, Any]] | None = None) -> None:
    """Write ``checksums.json`` (the file list of ``root``, with its digest) into ``root``.

    ``known``: records already made by whoever wrote those files (each rank hashes its own
    checkpoint shards); the other files are hashed here.
    """
    root = Path(root)
    known = dict(known or {})
    records = {**file_records(root, skip=(CHECKSUMS, *known)), **known}
    atomic_write_json(root / CHECKSUMS, with_digest({"files": dict(sorted(records.items()))}))


def check_checksums(root: str | os.PathLike, fix: str, full: bool = True, share: tuple[int, int] = (0, 1)) -> None:
    """Raise `FamexError` naming the file when ``root`` no longer matches its ``checksums.json``.

    ``share = (i, n)``: check only every n-th listed file from the i-th (the ranks of a job split the
    hashing; share 0 also looks for files the list does not name). A directory without a
    checksums.json (written before famex recorded them) passes.
    """
    path = Path(root) / CHECKSUMS
    if not path.is_file():
        return
    doc = read_json_checked(path, fix)
    records = doc.get("files")
    i, n = share
    if isinstance(records, dict) and n > 1:
        mine = {k: v for j, (k, v) in enumerate(sorted(records.items())) if j % n == i}
        problems = file_problems(root, mine, full=full, skip=(CHECKSUMS,), unlisted=False)
        if full and i == 0:
            problems += _unlisted(Path(root), records, (CHECKSUMS,))
    else:
        problems = file_problems(root, records, full=full, skip=(CHECKSUMS,))
    if problems:
        raise FamexError(f"{problems[0]} — {fix}")
