"""Checkpoint files that survive a crash, a full disk and a damaged file.

``AtomicCheckpointIO`` writes every checkpoint to a temporary sibling, fsyncs it, renames it over the target and
fsyncs the folder, so a checkpoint path holds either its previous version or the complete new one, whatever
moment the process dies at. Reading checks the file's integrity first (a checkpoint is a zip archive with a
CRC32 per member), so a truncated or bit-flipped file is reported by name, with the checkpoints next to it that
can be resumed from instead. The expert store's own half of a checkpoint, its snapshot, is written the same way
(:meth:`pragnosia_pl.store.ExpertStore.snapshot`).
"""

from __future__ import annotations

import glob
import io
import os
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
    """``TorchCheckpointIO`` with crash-safe writes and integrity-checked reads (local files; others as Lightning).

    ``pragnosia fit`` installs it unless the configuration names another ``CheckpointIO``.

    Raises:
        OSError: (from :meth:`save_checkpoint`) the file could not be written, e.g. the disk is full; the message
            names the file, whose previous version is left intact.
        CorruptCheckpointError: (from :meth:`load_checkpoint`) the file is truncated or damaged.

    Example::

        trainer = Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: an unpicklable checkpoint leaves no file behind
        data = buffer.getbuffer()
        try:
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
            previous = "its previous version is intact" if target.exists() else "it had no earlier version"
            previous += f", the other checkpoints in {target.parent} are untouched"
            raise OSError(
                error.errno, f"cannot write checkpoint {target}: {error.strerror or error}; {previous}"
            ) from error
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

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
