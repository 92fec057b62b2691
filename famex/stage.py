"""The stage-directory contract (DESIGN.md): meta.json, metrics.json, skip-if-done, refuse-to-mix.

A stage writes one directory. Its ``meta.json`` holds ``stage``, ``status`` (running / failed /
complete), the resolved ``config``, the ``inputs`` with content hashes, ``famex_version``,
``started`` and ``finished``; it is rewritten atomically at every change of status. A stage whose
meta.json is complete with the same config and inputs is a no-op; one that was interrupted resumes
(the stage itself decides how); one made with other arguments is refused, naming what differs.

Integrity (`famex.integrity`): every meta.json carries a ``digest`` of its own fields, checked by
`read_meta`; a finished stage's meta.json lists every file of its directory with size and sha256
(``files``). Whoever takes a finished stage as input (`require_complete`, `content_hash`, so every
`Stage` at its start, before it writes anything) checks that list cheaply; `famex verify` in full.

What this module does not do: run anything. Stages call `Stage.begin` / `Stage.finish`, or wrap
their body with `run_stage`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

from famex import __version__
from famex.config import config_defaults, config_dict
from famex import integrity
from famex.errors import FamexError
from famex.utils import atomic_write_json, log, sha256_file

RUNNING, FAILED, COMPLETE = "running", "failed", "complete"
_SMALL_FILE = 1 << 22  # files up to 4 MiB are hashed whole; larger ones by size + head + tail


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


_VOLATILE_META = ("started", "finished", "error")
# Checksums are no part of a stage's identity: they follow from what it is (and metrics.json's
# timings differ between two runs of the same stage).
_NOT_IDENTITY = (*_VOLATILE_META, "files", integrity.DIGEST)
META = "meta.json"


def content_hash(path: str | os.PathLike) -> str:
    """A content hash of a file or directory, cheap enough to take on every stage start.

    A famex stage directory is identified by its meta.json (which already chains the hashes of
    its own inputs and its config); other directories by the names, sizes and contents of their
    files (large files by size plus their first and last MiB, so a 16 GB checkpoint costs 2 MiB).
    """
    path = Path(path)
    if path.is_file():
        return _file_hash(path)
    meta = path / META
    if meta.is_file():
        m = read_meta(path)
        if m.get("status") == COMPLETE:
            check_files(path, m)
            # When it ran is no part of what it is: two runs of the same stage on the same inputs hash alike.
            ident = {k: v for k, v in m.items() if k not in _NOT_IDENTITY}
            return "meta:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    if not path.is_dir():
        raise FamexError(f"input not found: {path}")
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(path)).encode())
            h.update(_file_hash(p).encode())
    return "dir:" + h.hexdigest()


def same_content(recorded: str | None, path: str | os.PathLike, current: str | None = None) -> bool:
    """Whether ``recorded`` (a `content_hash` some stage wrote down) still describes ``path``.

    ``current``: ``content_hash(path)`` when the caller has it already. Stages written before famex
    hashed a complete stage's meta.json without its timestamps recorded the hash of the whole
    file; those still match, so existing stores and runs stay usable.
    """
    if recorded == (current or content_hash(path)):
        return True
    meta = Path(path) / "meta.json"
    return bool(recorded) and meta.is_file() and recorded == "meta:" + sha256_file(meta)


def _same_path(a: Any, b: Any) -> bool:
    """Whether two config values are one existing file or directory spelled two ways (relative / absolute,
    through a link): ``runs/demo/teacher`` from the repository is ``/repo/runs/demo/teacher``. A path that
    does not exist from here (a relative one recorded elsewhere) is no match."""
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _file_hash(path: Path) -> str:
    size = path.stat().st_size
    if size <= _SMALL_FILE:
        return sha256_file(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
    return "sampled:" + h.hexdigest()


def read_meta(out: str | os.PathLike) -> dict[str, Any] | None:
    """The stage's meta.json (None when there is none), refused when it fails its digest."""
    p = Path(out) / META
    if not p.is_file():
        return None
    return integrity.read_json_checked(p, f"delete {Path(out)} and rerun the stage that makes it")


def check_files(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """The cheap check of a finished stage's files against its meta.json (see `famex.integrity`)."""
    if "files" not in meta:
        if integrity.DIGEST in meta:  # a digested meta.json of a finished stage always lists its files
            raise FamexError(f"{Path(path) / META}: field 'files' is missing — delete {path} and rerun the stage that makes it")
        return  # written before famex recorded checksums
    problems = integrity.file_problems(path, meta["files"], full=False)
    if problems:
        raise FamexError(f"{problems[0]} — {path} is damaged; delete it and rerun the stage that makes it "
                         f"(`famex verify {path}` lists every problem)")


def is_complete(out: str | os.PathLike, stage: str | None = None) -> bool:
    meta = read_meta(out)
    return bool(meta and meta.get("status") == COMPLETE and (stage is None or meta.get("stage") == stage))


def require_complete(path: str | os.PathLike, stage: str | Iterable[str], what: str) -> dict[str, Any]:
    """The meta.json of an input directory that must be a finished stage of a given kind."""
    path = Path(path)
    stages = {stage} if isinstance(stage, str) else set(stage)
    meta = read_meta(path)
    if meta is None:
        raise FamexError(f"{what} {path} has no meta.json — make it with `famex {sorted(stages)[0]}` first")
    if meta.get("stage") not in stages:
        raise FamexError(f"{what} {path} was made by `famex {meta.get('stage')}`, expected `famex {' or '.join(sorted(stages))}`")
    if meta.get("status") != COMPLETE:
        raise FamexError(f"{what} {path} is not complete (status {meta.get('status')!r}) — rerun the stage that makes it")
    check_files(path, meta)
    return meta


class Stage:
    """One stage run writing ``out``: begin (or skip), then finish or fail."""

    def __init__(self, out: str | os.PathLike, stage: str, config: Any, inputs: dict[str, Any] | None = None,
                 identity_exclude: Iterable[str] = ()):
        self.out = Path(out)
        self.stage = stage
        self.config = config_dict(config) if dataclasses.is_dataclass(config) else dict(config)
        # An option a newer famex added, at its default, is no difference from a meta.json without it.
        self.defaults = config_defaults(config) if dataclasses.is_dataclass(config) else {}
        self.inputs = {
            name: {"path": str(p), "hash": content_hash(p)} for name, p in (inputs or {}).items() if p is not None
        }
        # Options that change how fast a stage runs but not what it writes (workers, batch size of
        # an exact computation, output path) are left out of the identity check.
        self.identity_exclude = set(identity_exclude) | {"out", "quiet", "config"}
        self.meta: dict[str, Any] = {}

    def _identity(self, config: dict[str, Any], inputs: dict[str, Any]) -> tuple[dict, dict]:
        cfg = {k: v for k, v in config.items() if k not in self.identity_exclude}
        ins = {k: v.get("hash") for k, v in inputs.items()}
        return cfg, ins

    def _same_input(self, name: str, recorded: dict[str, Any] | None) -> bool:
        new = self.inputs.get(name)
        if recorded is None or new is None:
            return recorded is None and new is None
        return same_content(recorded.get("hash"), new["path"], current=new["hash"])

    def differences(self, meta: dict[str, Any]) -> list[str]:
        old_cfg, old_in = self._identity(meta.get("config", {}), meta.get("inputs", {}))
        new_cfg, new_in = self._identity(self.config, self.inputs)
        added = {k for k in set(new_cfg) - set(old_cfg) if k in self.defaults and new_cfg[k] == self.defaults[k]}
        diffs = [f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in sorted(set(old_cfg) | set(new_cfg))
                 if old_cfg.get(k) != new_cfg.get(k) and k not in added and not _same_path(old_cfg.get(k), new_cfg.get(k))]
        old_inputs = meta.get("inputs", {})
        diffs += [f"input {k} changed" for k in sorted(set(old_in) | set(new_in))
                  if old_in.get(k) != new_in.get(k) and not self._same_input(k, old_inputs.get(k))]
        return diffs

    def begin(self, extra: dict[str, Any] | None = None) -> bool:
        """Start (or resume) the stage; True when it is already complete with the same arguments."""
        old = read_meta(self.out)
        if old is not None:
            if old.get("stage") != self.stage:
                raise FamexError(
                    f"{self.out} holds the output of `famex {old.get('stage')}`, not `famex {self.stage}`; choose another --out"
                )
            diffs = self.differences(old)
            if diffs:
                raise FamexError(
                    f"{self.out} was made with other arguments ({'; '.join(diffs)}); refusing to mix them — "
                    f"use another --out, or delete {self.out} to start fresh"
                )
            if old.get("status") == COMPLETE:
                log(f"famex {self.stage}: {self.out} is already complete with these arguments; nothing to do")
                self.meta = old
                return True
            log(f"famex {self.stage}: resuming the interrupted run in {self.out}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "stage": self.stage,
            "status": RUNNING,
            "config": self.config,
            "inputs": self.inputs,
            "famex_version": __version__,
            "started": (old or {}).get("started") or _now(),
            "finished": None,
            **(extra or {}),
        }
        self._write()
        return False

    def update(self, **extra: Any) -> None:
        self.meta.update(extra)
        self._write()

    def finish(self, metrics: dict[str, Any] | None = None, unlisted: Iterable[str] = (), **extra: Any) -> None:
        """Mark the stage complete with the file list of its directory (``unlisted``: relative paths
        of work files the stage deletes right after, left out of the list)."""
        if metrics is not None:
            atomic_write_json(self.out / "metrics.json", metrics)
        self.meta.update(extra, status=COMPLETE, finished=_now())
        self.meta["files"] = integrity.file_records(self.out, skip=(META, *unlisted))
        self._write()

    def fail(self, error: BaseException) -> None:
        if not self.meta:
            return
        self.meta.update(status=FAILED, finished=None,
                         error="".join(traceback.format_exception_only(type(error), error)).strip())
        self._write()

    def _write(self) -> None:
        if self.meta.get("status") != COMPLETE:
            self.meta.pop("files", None)  # resumed: the list is made again when it finishes
        atomic_write_json(self.out / META, integrity.with_digest(self.meta))


def run_stage(out: str | os.PathLike, stage: str, config: Any, inputs: dict[str, Any] | None,
              body: Callable[[Stage], dict[str, Any] | None], identity_exclude: Iterable[str] = (),
              extra: dict[str, Any] | None = None) -> Stage:
    """Begin ``stage`` in ``out``; run ``body(stage)`` unless already complete; finish with its metrics."""
    st = Stage(out, stage, config, inputs, identity_exclude)
    if st.begin(extra):
        return st
    try:
        metrics = body(st)
    except BaseException as e:
        st.fail(e)
        raise
    st.finish(metrics)
    return st
