"""`famex verify PATH`: check a stage directory, or every stage of a run tree, before spending GPU hours on it.

For each stage directory (a directory with a meta.json): meta.json parses and matches its digest,
its status is ``complete``, every file its ``files`` list names is present with the recorded size
and sha256 (every byte hashed), no file is there that the list does not name, and every input it
recorded still has the content hash it had when the stage ran. One line per problem on stdout;
exit code 0 only when there is none.

What this module does not do: decode a logit store chunk by chunk (`famex logits verify` does), or
repair anything.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from famex import integrity
from famex.errors import FamexError
from famex.stage import COMPLETE, META, content_hash, read_meta, same_content


def stage_dirs(root: str | os.PathLike) -> list[Path]:
    """``root`` if it is a stage directory, else every stage directory below it (sorted)."""
    root = Path(root)
    if (root / META).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(META) if not any(part.startswith(".") for part in p.relative_to(root).parts))


def verify_stage(path: str | os.PathLike) -> list[str]:
    """Every problem of one stage directory, one line each (see the module docstring)."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except FamexError as e:
        return [str(e)]
    if meta is None:
        return [f"{path}: no {META} — not a famex stage directory"]
    if meta.get("status") != COMPLETE:
        return [f"{path}: status {meta.get('status')!r}, not 'complete' — rerun the stage that makes it"]
    if integrity.DIGEST not in meta or "files" not in meta:
        missing = " and ".join(k for k in (integrity.DIGEST, "files") if k not in meta)
        return [f"{path / META}: no {missing} recorded (written before famex recorded checksums) — cannot be verified; "
                f"rerun the stage into a new directory to get them"]
    problems = integrity.file_problems(path, meta["files"], full=True, skip=(META,))
    inputs = meta.get("inputs")
    for name, rec in sorted((inputs if isinstance(inputs, dict) else {}).items()):
        problems += _input_problems(path, name, rec)
    return problems


def _input_problems(path: Path, name: str, rec: object) -> list[str]:
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
        return [f"{path / META}: input {name!r} has no recorded path"]
    where = Path(rec["path"])
    if not where.exists():
        return [f"{path}: input {name} ({where}) is not there any more"]
    try:
        now = content_hash(where)
    except FamexError as e:
        return [f"{path}: input {name} ({where}) is damaged: {e}"]
    if not same_content(rec.get("hash"), where, current=now):
        return [f"{path}: input {name} ({where}) changed since this stage ran (content hash {str(rec.get('hash'))[:17]}…, now {now[:17]}…)"]
    return []


def verify(path: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The stage directories found under ``path`` and every problem of each."""
    path = Path(path)
    if not path.exists():
        raise FamexError(f"{path} does not exist — pass a stage directory or a run tree")
    dirs = stage_dirs(path)
    if not dirs:
        return [], [f"{path}: no stage directory (no {META}) found here or below"]
    return dirs, [line for d in dirs for line in verify_stage(d)]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a stage directory (has meta.json) or a run tree (runs/NAME/)")


def main(args: argparse.Namespace) -> int:
    dirs, problems = verify(args.path)
    for line in problems:
        print(line)
    from famex.utils import log

    log(f"famex verify: {len(dirs)} stage directories, {len(problems)} problem(s)")
    return 1 if problems else 0
