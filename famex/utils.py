"""Small helpers every stage uses: atomic writes, hashing, progress bars, logging.

Nothing here knows about models or stages. Writes go to a temporary file in the same directory
and are renamed into place, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

_QUIET = {"on": False}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and metric lines (``--quiet``)."""
    _QUIET["on"] = bool(quiet)


def is_quiet() -> bool:
    return _QUIET["on"] or os.environ.get("FAMEX_QUIET") == "1"


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar, off under ``--quiet``; into a log file (stderr not a terminal) it writes every 30 s."""
    disable = kwargs.pop("disable", False) or is_quiet()
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable, **kwargs)


def log(msg: str) -> None:
    """One line of human-readable status on stderr (silent under ``--quiet``)."""
    if not is_quiet():
        print(msg, file=sys.stderr, flush=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or an iterable of pieces written in turn) to ``path`` through a temp
    file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            for piece in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def make_shareable(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file under a directory) the usual umask permissions.

    safetensors (like mkstemp) creates files readable by their owner only; checkpoints are read
    by other users and jobs (a serving process, a cluster's other accounts), so they get 0666 & ~umask.
    """
    path = Path(path)
    mode = 0o666 & ~_umask()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        if f.stat().st_mode & 0o777 != mode:
            os.chmod(f, mode)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` only on success.

    An existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        make_shareable(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of all regular files below ``path`` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class FileArray:
    """A 1-D array on disk read with ``pread``: no mapping, no copy of the file in memory.

    Reading a window costs one system call; pages go through the page cache (shared by every
    process on the node, reclaimable) instead of into this process's resident memory, as they
    would with ``np.memmap`` touched across the whole file. Safe to read from several threads.
    ``offset`` is where the data starts (a ``.npy`` header is skipped by `FileArray.npy`).
    """

    def __init__(self, path: str | os.PathLike, dtype, length: int, offset: int = 0):
        import numpy as np

        self.path, self.dtype, self.offset = Path(path), np.dtype(dtype), int(offset)
        self.length = int(length)
        self._fd: int | None = None

    @classmethod
    def npy(cls, path: str | os.PathLike) -> "FileArray":
        """A 1-D ``.npy`` file (as ``np.save`` writes it) by its header."""
        import numpy as np

        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
        if len(shape) != 1:
            raise ValueError(f"{path}: expected a 1-D array, found shape {shape}")
        return cls(path, dtype, shape[0], offset)

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, end: int):
        """Elements ``[start, end)`` as a fresh numpy array."""
        import numpy as np

        start, end = max(0, start), min(end, self.length)
        if end <= start:
            return np.zeros(0, self.dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        size = self.dtype.itemsize
        want = (end - start) * size
        data = os.pread(self._fd, want, self.offset + start * size)
        if len(data) != want:
            raise OSError(f"{self.path}: short read ({len(data)} of {want} bytes) — the file is truncated")
        return np.frombuffer(data, dtype=self.dtype)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self.length)
            return self.read(start, stop)[::step] if step != 1 else self.read(start, stop)
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} outside [0, {self.length})")
        return self.read(i, i + 1)[0]

    def __array__(self, dtype=None, copy=None):
        arr = self.read(0, self.length)
        return arr.astype(dtype) if dtype is not None else arr

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
