"""Atomic file writes: write to a temporary name in the same folder, then rename.

A killed process leaves either the old file or the new one, never half of one. The file gets the mode
any new file gets (0o666 less the umask: 0644 under the usual 022), not mkstemp's private 0600.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask. Read from /proc on Linux (no change to the process); elsewhere set and restored
    under a lock, briefly to the strict 077, so a file another thread creates meanwhile is private, not open."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


# -- a full disk: one line naming what could not be written, and the space it needs when known -----------

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left; a quota reached


class DiskFull(OSError):
    """No space left (ENOSPC, or a quota: EDQUOT) for `path`; `needed` and `free` in bytes where known.
    Its str() is the CLI's one-line message."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None, free: int | None = None):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.needed, self.free = needed, free

    def __str__(self) -> str:
        return disk_full_message(self)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def disk_full_message(e: OSError) -> str:
    """`disk full: PATH needs about N MB, M MB free` when a check found too little room; else
    `disk full: PATH (No space left on device[; needs about N MB])` for a write that failed on the way."""
    needed, free = getattr(e, "needed", None), getattr(e, "free", None)
    where = e.filename if e.filename is not None else "?"
    if needed and free is not None and free < needed:
        return f"disk full: {where} needs about {_mb(needed)}, {_mb(free)} free"
    return (f"disk full: {where} ({e.strerror or os.strerror(e.errno)}"
            + (f"; needs about {_mb(needed)})" if needed else ")"))


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space, in bytes, on the file system `path` would be written to (its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p if p.is_dir() else p.parent).free
    except OSError:
        return None


def require_space(path: str | os.PathLike, needed: int) -> None:
    """DiskFull before writing `path` when its file system has less than `needed` bytes free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise DiskFull(path, needed, free)


@contextlib.contextmanager
def writing(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Around code that writes `path`: check for `needed` bytes first (when known), and turn a full disk met
    on the way (an OSError that names a temporary file, or nothing) into a DiskFull naming `path`."""
    if needed:
        require_space(path, needed)
    try:
        yield
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(path, needed, free_bytes(path) if needed else None) from e
        raise


def is_disk_full(e: BaseException) -> bool:
    """An OSError of a full disk, or shutil's Error gathering one from a copytree (it keeps only the text)."""
    if isinstance(e, shutil.Error):
        return any(f"[Errno {n}]" in str(x) for x in (e.args[0] if e.args else ()) for n in DISK_FULL)
    return isinstance(e, OSError) and e.errno in DISK_FULL


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.chmod(tmp_path, default_file_mode())  # mkstemp made it 0600: readable by its owner only
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
