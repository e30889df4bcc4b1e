"""Atomic, durable writes of files and folders (docs/design.md, "The data directory").

A file is written to a temporary name beside it, fsynced, renamed over the old one, and the
folder is fsynced, so a crash at any instant leaves the old file or the new one. A folder is
built under a temporary name beside its target and swapped in whole; readers call `recover`
first, which undoes the one window where a crash leaves the target missing (old set aside,
new not yet in place). Temporary names start with "." and carry the writer's pid, so they are
never read as data and a later writer can tell which are abandoned.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15)
AT_FDCWD = -100


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below `folder`, then the folders themselves."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write(path: Path, data: bytes | str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the block to write (any writer that takes a
    path); when the block succeeds, the file is fsynced and renamed over `path`. When it
    fails, the temporary file is removed and `path` is as it was. Two writers at once each
    have their own temporary name: the last rename wins, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = _scratch(path, "tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target`; when the block succeeds, its content
    becomes `target` in one step (replacing an existing one, or, with replace=False, giving
    way to one that another process put there first). When it fails, nothing changes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    tmp = _scratch(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if not target.exists():
            try:
                os.rename(tmp, target)
            except OSError:
                if replace or not target.exists():
                    raise
        elif replace:
            _swap(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, target: Path) -> None:
    """Put `new` at `target`; what was at `target` ends up at `new` (then removed)."""
    if _exchange(new, target):
        return
    old = _scratch(target, "old")
    os.rename(target, old)  # a crash from here to the next rename: recover() puts old back
    os.rename(new, target)
    os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    ok = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0
    return ok  # on failure (an old kernel or filesystem), fall back to two renames


def recover(target: Path) -> None:
    """Before reading `target`: if a crash left it set aside mid-swap, put it back."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.rename(aside[-1], target)
        fsync_dir(target.parent)


def recover_all(folder: Path) -> None:
    """recover() every target in `folder` that a crash left set aside mid-swap."""
    for aside in Path(folder).glob(".*.old-*-*"):
        recover(aside.parent / aside.name[1:].rsplit(".old-", 1)[0])


def sweep(target: Path) -> None:
    """Remove the temporary siblings of `target` that writers which died left behind."""
    recover(target)
    for path in target.parent.glob(f".{target.name}.*-*-*"):
        kind, pid = path.name[len(target.name) + 2 :].split("-")[:2]
        if kind in ("tmp", "old") and pid.isdigit() and not alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def is_scratch(path: Path) -> bool:
    """A temporary name of this module's, never data."""
    return path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name)


def temporary(target: Path) -> Path:
    """A temporary name beside `target` for a writer's own scratch (removed by a later
    sweep(target) if the writer dies)."""
    return _scratch(Path(target), "tmp")


def _scratch(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True
