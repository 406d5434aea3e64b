"""Checkpoint files that survive a crash, a full disk and a damaged file.

``AtomicCheckpointIO`` writes every checkpoint to a temporary sibling, fsyncs it, renames it over the target and
fsyncs the folder, so a checkpoint path holds either its previous version or the complete new one, whatever
moment the process dies at. Reading checks the file's integrity first (a checkpoint is a zip archive with a
CRC32 per member), so a truncated or bit-flipped file is reported by name, with the checkpoints next to it that
can be resumed from instead. The expert store's own half of a checkpoint, its snapshot, is written the same way
(:meth:`pragnosia_pl.store.ExpertStore.snapshot`), and lives as long as a checkpoint that names it.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from pragnosia_pl.faults import crash_point
from pragnosia_pl.residency import snapshot_named_by
from pragnosia_pl.store import fsync_dir


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated, damaged or not a checkpoint at all.

    Attributes:
        path: the bad file.
        alternatives: other checkpoints in its folder, newest first (what to resume from instead).
    """

    def __init__(self, message: str, *, path: str | Path, alternatives: list[str]) -> None:
        super().__init__(message)
        self.path = str(path)
        self.alternatives = alternatives


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with crash-safe writes and integrity-checked reads (local files; others as Lightning),
    which removes a ``PragnosiaLM`` store snapshot with the last checkpoint that names it.

    A checkpoint holds the shared parameters; the experts are in the store snapshot it names. Before a checkpoint
    file is written, its path joins the snapshot's holders (``<snapshot>.checkpoints``, next to the snapshot).
    When a checkpoint is removed (``ModelCheckpoint``'s ``save_top_k``) or written over (``last.ckpt``), the
    snapshot it named is removed too unless one of its holders still names it. Both happen only once the new
    checkpoint is on disk, so the last good checkpoint keeps its snapshot until then. A snapshot without a holders
    file (written under another ``CheckpointIO``) is never removed, nor is one a damaged checkpoint may name. A copy
    of a checkpoint file made outside Lightning is no holder: save one with ``trainer.save_checkpoint`` instead.

    ``pragnosia fit`` installs it unless the configuration names another ``CheckpointIO``; under any other, every
    snapshot is kept.

    Raises:
        OSError: (from :meth:`save_checkpoint`) the file could not be written, e.g. the disk is full; the message
            names the file, whose previous version is left intact.
        CorruptCheckpointError: (from :meth:`load_checkpoint`) the file is truncated or damaged.

    Example::

        trainer = Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True, save_top_k=1)])
    """

    def __init__(self) -> None:
        super().__init__()
        self._named: dict[tuple[Path, int, int], str | None] = {}  # (file, mtime, size) -> the snapshot it names

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        replaced, snapshot = self._snapshot_if_readable(target), snapshot_named_by(checkpoint)
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: an unpicklable checkpoint leaves no file behind
        data = buffer.getbuffer()
        try:
            if snapshot is not None:
                _add_holder(snapshot, target)
            with open(partial, "wb") as file:
                file.write(data[: len(data) // 2])
                file.flush()
                crash_point("checkpoint-write")
                file.write(data[len(data) // 2 :])
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
            fsync_dir(target.parent)
        except OSError as error:
            partial.unlink(missing_ok=True)
            self._release(snapshot)  # taken for this checkpoint, which never came to be
            previous = "its previous version is intact" if target.exists() else "it had no earlier version"
            previous += f", the other checkpoints in {target.parent} are untouched"
            raise OSError(
                error.errno, f"cannot write checkpoint {target}: {error.strerror or error}; {previous}"
            ) from error
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self._release(replaced)

    @override
    def remove_checkpoint(self, path: str | Path) -> None:
        snapshot = self._snapshot_if_readable(Path(path).absolute()) if _is_local(path) else None
        super().remove_checkpoint(path)
        self._release(snapshot)

    @override
    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if _is_local(path) and os.path.isfile(path):
            verify_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def _snapshot_of(self, checkpoint_file: Path) -> str | None:
        """The store snapshot ``checkpoint_file`` names (``None``: none, or no such file), read once per version of
        the file; its tensors stay unread. Raises what ``torch.load`` raises on a damaged file."""
        try:
            stat = checkpoint_file.stat()
        except FileNotFoundError:
            return None
        key = (checkpoint_file.resolve(), stat.st_mtime_ns, stat.st_size)
        if key not in self._named:
            checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False, mmap=True)
            self._named[key] = snapshot_named_by(checkpoint)
        return self._named[key]

    def _snapshot_if_readable(self, checkpoint_file: Path) -> str | None:
        try:
            return self._snapshot_of(checkpoint_file)
        except Exception:  # damaged: whatever it named is kept
            return None

    def _release(self, snapshot: str | None) -> None:
        """Remove ``snapshot`` and its holders file unless one of its holders still names it."""
        holders = None if snapshot is None else _holders_file(snapshot)
        if holders is None or not holders.is_file():
            return
        for holder in holders.read_text().splitlines():
            try:
                if self._snapshot_of(Path(holder)) == snapshot:
                    return
            except Exception:  # a damaged checkpoint may name it: keep it
                return
        shutil.rmtree(snapshot, ignore_errors=True)
        holders.unlink()


def _holders_file(snapshot: str) -> Path:
    """The list of the checkpoint files written to name ``snapshot``, one path a line."""
    path = Path(snapshot)
    return path.with_name(f"{path.name}.checkpoints")


def _add_holder(snapshot: str, checkpoint_file: Path) -> None:
    """Add ``checkpoint_file`` to ``snapshot``'s holders, durably (a crash must not lose a holder)."""
    holders = _holders_file(snapshot)
    if not holders.parent.is_dir():
        return  # not a snapshot on this machine's disk: nothing will ever remove it here
    known = holders.read_text().splitlines() if holders.is_file() else []
    if str(checkpoint_file) in known:
        return
    partial = holders.with_name(f".{holders.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "w") as file:
            file.write("".join(f"{line}\n" for line in [*known, str(checkpoint_file)]))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, holders)
    finally:
        partial.unlink(missing_ok=True)
    fsync_dir(holders.parent)


def verify_checkpoint(path: str | Path) -> None:
    """Checks that ``path`` is a complete checkpoint archive whose every member matches its CRC32.

    Raises:
        CorruptCheckpointError: the file is truncated, damaged or not a checkpoint; the message names it and
            the checkpoints next to it that can be resumed from instead.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        problem = None if bad_member is None else f"its member {bad_member} fails its checksum"
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        problem = f"{error}" if path.stat().st_size else "it is empty"
    if problem is None:
        return
    alternatives = _other_checkpoints(path)
    hint = (
        "resume from an earlier one: " + ", ".join(alternatives[:3])
        if alternatives
        else f"there is no other checkpoint in {path.parent}"
    )
    raise CorruptCheckpointError(
        f"checkpoint {path} is truncated or damaged ({problem}); {hint}", path=path, alternatives=alternatives
    )


def _other_checkpoints(path: Path) -> list[str]:
    others = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()]
    return [str(p) for p in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)]


def _is_local(path: str | Path) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)
