"""File helpers of the stores: full reads and writes at an offset, fsync, atomic directory replacement, locks."""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import torch


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    return memoryview(tensor.detach().numpy()).cast("B")


def _pread_full(fd: int, view: memoryview, offset: int, align: int = 1) -> int:
    """Reads ``len(view)`` bytes at ``offset`` (looping over short reads); returns the count read (short at EOF).

    With ``align`` (``O_DIRECT``: offsets and lengths in whole blocks, ``view`` starting on a block) a short read
    is retried from the start of its last, partial block, so every retry is aligned too; a read that ends inside
    the first block it asked for is the end of the file."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(view) - done, offset + done)
            got = len(chunk)
            view[done : done + got] = chunk
        if got == 0:
            break
        if done + got == len(view):
            return len(view)
        aligned = (done + got) // align * align
        if aligned == done:  # less than one block: EOF (retrying would read the same bytes again)
            return done + got
        done = aligned
    return done


def _pwrite_full(fd: int, view: memoryview, offset: int, align: int = 1) -> None:
    """Writes ``view`` at ``offset``, looping over short writes (each retry from a multiple of ``align``)."""
    done = 0
    while done < len(view):
        if hasattr(os, "pwritev"):
            wrote = os.pwritev(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without pwritev
            wrote = os.pwrite(fd, view[done:], offset + done)
        if done + wrote == len(view):
            return
        aligned = (done + wrote) // align * align
        if aligned == done:
            raise OSError(errno.EIO, f"short write: {wrote} bytes at offset {offset + done}, less than one block")
        done = aligned


def _fdatasync(fd: int) -> None:
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


def _fsync_file(file) -> None:
    file.flush()
    os.fsync(file.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_replaceable(target: Path) -> bool:
    return target.is_dir() and ((target / "meta.json").is_file() or not any(target.iterdir()))


def _replace_dir(new: Path, target: Path) -> None:
    """Renames ``new`` to ``target``; an existing ``target`` is moved aside first and removed afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        os.rename(target, old)
    os.rename(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _lock_exclusively(fd: int, path: Path) -> None:
    """One live DiskStore per file: two stores (or DDP ranks) sharing a file would corrupt each other."""
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(
            f"{path} is in use by another DiskStore; give each store (and each DDP rank) its own model.store_dir"
        ) from None


def remove_stale_live_directories(root: Path, min_age_s: float = 60.0) -> list[Path]:
    """Removes the ``live-*`` scratch folders under ``root`` that a killed run left behind; returns them.

    A folder is stale when its record file is older than ``min_age_s`` and no open store holds its lock
    (a running store, a DDP rank's replica or a ``pragnosia generate`` keeps its file locked while it lives).
    Folders without a record file are left alone. Without ``fcntl`` (Windows) nothing is removed.
    """
    removed: list[Path] = []
    if fcntl is None or not root.is_dir():  # pragma: no cover - Windows
        return removed
    for folder in sorted(root.glob("live-*")):
        records = folder / "experts.bin"
        try:
            if not records.is_file() or time.time() - records.stat().st_mtime < min_age_s:
                continue
            fd = os.open(records, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while removing: no store can open it meanwhile
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed
