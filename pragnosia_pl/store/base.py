"""The store interface (:class:`ExpertStore`), its snapshot format, and the errors and handles it returns."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from pragnosia_pl.faults import crash_point
from pragnosia_pl.store.files import (
    _byte_view,
    _fsync_file,
    _is_replaceable,
    _replace_dir,
    fsync_dir,
)

RecordInit = Callable[[int, torch.Tensor], None]
"""``init_record(expert_id, out)`` fills the zeroed CPU float32 vector ``out`` (``record_numel``
elements) with the expert's initial record, deterministically from ``(seed, expert_id)``."""

RecordPart = Literal["record", "params", "state"]
"""What a read moves: the whole ``record``, its leading ``params`` (``params_numel`` elements) or the ``state``
after them (optimizer state and step)."""

STORE_KINDS = ("device", "host", "disk", "direct")
RECORD_PARTS = ("record", "params", "state")
SNAPSHOT_FORMAT = "pragnosia-expert-store"
SNAPSHOT_VERSION = 1
# Snapshot and restore stream records through a buffer of at most this size (one record if records are larger).
# Small, so a checkpoint adds a few MiB to the process, the same whether 8 or 10⁶ experts were materialized.
SNAPSHOT_CHUNK_BYTES = 4 << 20
HOST_CHUNK_BYTES = 32 << 20  # HostStore's record arenas grow geometrically up to about this size


class CorruptRecordError(RuntimeError):
    """A record failed its checksum or is incomplete (a truncated file).

    Attributes:
        expert_id: the expert whose record is bad (``None`` when the damage is not tied to one expert).
        path: the file that holds the bad record.
    """

    def __init__(self, message: str, *, expert_id: int | None = None, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.expert_id = expert_id
        self.path = None if path is None else str(path)


class Pending:
    """Handle of an asynchronous store operation; :meth:`wait` blocks until its effect is visible.

    For a CUDA copy on a side stream, ``wait()`` makes the *current* CUDA stream wait for it (the host
    does not block), which is what kernels that use the buffer afterwards need. Errors raised by a
    worker thread are re-raised by ``wait()``.
    """

    __slots__ = ("_future", "_event", "_device")

    def __init__(
        self,
        future: Future | None = None,
        event: torch.cuda.Event | None = None,
        device: torch.device | None = None,
    ) -> None:
        self._future = future
        self._event = event
        self._device = device

    def wait(self) -> None:
        if self._future is not None:
            self._future.result()
        if self._event is not None:
            torch.cuda.current_stream(self._device).wait_event(self._event)

    def done(self) -> bool:
        if self._future is not None and not self._future.done():
            return False
        return self._event is None or self._event.query()

    @staticmethod
    def wait_all(pending: list[Pending]) -> None:
        """Waits for every handle, then raises the first failure among them: none is dropped unwaited."""
        failure = None
        for handle in pending:
            try:
                handle.wait()
            except Exception as error:
                failure = failure or error
        if failure is not None:
            raise failure


class ExpertStore(ABC):
    """Fixed-size float32 records of ``num_experts`` experts, lazily initialised.

    A record is two parts: its first ``params_numel`` elements (an expert's parameters) and the rest (its
    optimizer state): a read may move either part alone (:data:`RecordPart`), so a pass that only runs the
    expert reads its parameters only. Writes always move the whole record.

    Subclasses implement ``_read``/``_write`` (synchronous, arguments already validated) and
    ``_clear``; they may override ``_read_async``/``_write_async`` to overlap transfers with compute.

    Args:
        num_experts: number of records (n ≥ 1).
        record_numel: float32 elements per record (R ≥ 1).
        init_record: fills the initial record of an expert that was never written (see :data:`RecordInit`).
        params_numel: elements of the leading part (1 ≤ P ≤ R); ``None``: the whole record (no state part).

    Raises:
        ValueError: ``num_experts`` or ``record_numel`` below 1, ``params_numel`` outside [1, R].

    Example::

        store = HostStore(num_experts=1024, record_numel=4096, init_record=init)
        slot = torch.empty(4096)
        store.read(7, slot)  # initial record of expert 7; nothing is materialized
        slot.add_(1.0)
        store.write(7, slot)  # expert 7 is materialized now
        store.snapshot("ckpt/experts")
    """

    kind: ClassVar[str]

    def __init__(
        self, num_experts: int, record_numel: int, init_record: RecordInit, params_numel: int | None = None
    ) -> None:
        for name, value in (("num_experts", num_experts), ("record_numel", record_numel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an integer ≥ 1")
        if not callable(init_record):
            raise ValueError(f"init_record must be callable, got {type(init_record).__name__}")
        params_numel = record_numel if params_numel is None else params_numel
        if isinstance(params_numel, bool) or not isinstance(params_numel, int) or not 1 <= params_numel <= record_numel:
            raise ValueError(f"params_numel ({params_numel!r}) must be an integer in [1, record_numel={record_numel}]")
        self.num_experts = num_experts
        self.record_numel = record_numel
        self.record_bytes = record_numel * 4
        self.params_numel = params_numel
        # (first, end) element of each part of a record
        self.part_bounds: dict[str, tuple[int, int]] = dict(
            record=(0, record_numel), params=(0, params_numel), state=(params_numel, record_numel)
        )
        self.init_record = init_record
        self._written: set[int] = set()  # materialized ids as issued (async writes count at issue time)
        self._counters = dict(reads=0, writes=0, bytes_read=0, bytes_written=0, lazy_reads=0)
        self._closed = False

    # ---------------------------------------------------------------- public API

    def read(self, expert_id: int, into: torch.Tensor, part: RecordPart = "record") -> None:
        """Copies the record of ``expert_id`` into ``into`` (contiguous 1-D float32 of ``record_numel``, CPU or
        CUDA); with ``part`` only that part of it, at its place in ``into`` (the rest of ``into`` keeps what it held
        or, for an unmaterialized expert, may take the rest of its initial record).

        An unmaterialized expert yields its initial record and stays unmaterialized.
        """
        expert_id = self._check_id(expert_id)
        into = self._prepare(into, "into")
        self._count_read(expert_id, self._check_part(part))
        self._read(expert_id, into, part)

    def write(self, expert_id: int, src: torch.Tensor) -> None:
        """Stores ``src`` as the record of ``expert_id``, which becomes materialized."""
        expert_id = self._check_id(expert_id)
        src = self._prepare(src, "src")
        self._write(expert_id, src)
        self._count_write(expert_id)

    def read_async(self, expert_id: int, into: torch.Tensor, part: RecordPart = "record") -> Pending:
        """Starts :meth:`read`; ``into`` holds the record (``part``) once the returned handle's ``wait()``
        returns."""
        expert_id = self._check_id(expert_id)
        into = self._prepare(into, "into")
        self._count_read(expert_id, self._check_part(part))
        return self._read_async(expert_id, into, part)

    def write_async(self, expert_id: int, src: torch.Tensor) -> Pending:
        """Starts :meth:`write`; the caller must not modify ``src`` until the handle's ``wait()`` returns."""
        expert_id = self._check_id(expert_id)
        src = self._prepare(src, "src")
        self._count_write(expert_id)
        return self._write_async(expert_id, src)

    def synchronize(self) -> None:
        """Waits until every operation issued so far has finished."""

    def materialized(self, expert_id: int) -> bool:
        """Whether ``expert_id`` has been written (as issued: includes writes still in flight)."""
        return self._check_id(expert_id) in self._written

    def materialized_ids(self) -> list[int]:
        """The materialized expert ids, ascending."""
        return sorted(self._written)

    def stats(self) -> dict[str, float]:
        """Cumulative traffic (``reads``, ``writes``, ``bytes_read``, ``bytes_written``, ``lazy_reads``; a part read
        counts as a read of that part's bytes) and the current number of ``materialized`` experts."""
        stats = {key: float(value) for key, value in self._counters.items()}
        stats["materialized"] = float(len(self._written))
        return stats

    def close(self) -> None:
        """Finishes pending operations and releases files and threads. Idempotent."""
        if not self._closed:
            self.synchronize()
            self._closed = True

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_experts={self.num_experts}, record_numel={self.record_numel}, "
            f"materialized={len(self._written)})"
        )

    # ---------------------------------------------------------------- snapshot / restore

    def snapshot(self, directory: str | Path) -> None:
        """Writes a consistent copy of the store's materialized records to ``directory``.

        The copy is written to a temporary sibling directory, fsynced and renamed into place, so
        ``directory`` holds either the previous snapshot or the complete new one. It shares nothing
        with the live store: later writes cannot change it. Records stream through a buffer of at most
        :data:`SNAPSHOT_CHUNK_BYTES`, never the whole store. Pending operations are waited for first;
        dirty experts in an :class:`~pragnosia_pl.expert_cache.ExpertCache` must be flushed by the caller.

        Raises:
            FileExistsError: ``directory`` exists and is neither empty nor a snapshot.
            OSError: the snapshot could not be written (e.g. the disk is full); ``directory`` and every other
                snapshot are left as they were.
        """
        self._check_open()
        self.synchronize()
        target = Path(directory)
        if target.exists() and not _is_replaceable(target):
            raise FileExistsError(f"{target} exists and is not an expert-store snapshot; refusing to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            ids = self.materialized_ids()
            crcs = np.empty(len(ids), dtype=np.int64)
            rows = self._chunk_rows(len(ids))
            buffer = torch.empty(rows, self.record_numel)  # (rows, R)
            with open(partial / "records.bin", "wb") as file:
                for start in range(0, len(ids), rows):
                    chunk = ids[start : start + rows]
                    for row, expert_id in enumerate(chunk):
                        self._read(expert_id, buffer[row], "record")
                        crcs[start + row] = zlib.crc32(_byte_view(buffer[row]))
                    file.write(_byte_view(buffer[: len(chunk)]))
                _fsync_file(file)
            with open(partial / "index.npy", "wb") as file:
                np.save(file, np.stack([np.asarray(ids, dtype=np.int64), crcs], axis=1).reshape(-1, 2))
                _fsync_file(file)
            meta = dict(
                format=SNAPSHOT_FORMAT,
                version=SNAPSHOT_VERSION,
                num_experts=self.num_experts,
                record_numel=self.record_numel,
                dtype="float32",
                byteorder=sys.byteorder,
                materialized=len(ids),
                store=self.kind,
            )
            with open(partial / "meta.json", "w") as file:
                json.dump(meta, file, indent=2)
                _fsync_file(file)
            fsync_dir(partial)
            crash_point("snapshot-write")
            _replace_dir(partial, target)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise OSError(
                error.errno,
                f"cannot write the expert-store snapshot {target}: {error.strerror or error}; "
                "earlier snapshots are intact",
            ) from error
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def restore(self, directory: str | Path) -> None:
        """Makes the live store exactly the snapshot in ``directory`` (of any store kind).

        Experts materialized after the snapshot become unmaterialized again. Every checksum is verified
        before the live store is touched, so a failed restore leaves it unchanged.

        Raises:
            FileNotFoundError: ``directory`` holds no snapshot.
            ValueError: the snapshot's format, ``num_experts``, ``record_numel`` or dtype do not match.
            CorruptRecordError: a record fails its checksum, or ``records.bin`` has the wrong size.
        """
        self._check_open()
        self.synchronize()
        records_path, index = self._open_snapshot(Path(directory))
        for _ in self._snapshot_records(records_path, index):
            pass
        self._clear()
        self._written.clear()
        for expert_id, record in self._snapshot_records(records_path, index):
            self._write(expert_id, record)
            self._written.add(expert_id)

    def _open_snapshot(self, directory: Path) -> tuple[Path, np.ndarray]:
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no expert-store snapshot at {directory} (meta.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("version") != SNAPSHOT_VERSION:
            raise ValueError(
                f"{meta_path}: unsupported snapshot format {meta.get('format')!r} version {meta.get('version')!r} "
                f"(expected {SNAPSHOT_FORMAT!r} version {SNAPSHOT_VERSION})"
            )
        expected = dict(
            num_experts=self.num_experts, record_numel=self.record_numel, dtype="float32", byteorder=sys.byteorder
        )
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(f"snapshot {directory} has {key}={meta.get(key)!r}, this store has {key}={value!r}")
        index_path = directory / "index.npy"
        index = np.load(index_path, allow_pickle=False)
        ids = index[:, 0] if index.ndim == 2 else index
        valid = index.ndim == 2 and index.shape[1] == 2 and index.dtype == np.int64
        if not valid or len(index) != meta.get("materialized"):
            raise CorruptRecordError(
                f"{index_path}: expected an int64 (m, 2) index with m={meta.get('materialized')}, "
                f"got {index.dtype} {tuple(index.shape)}",
                path=index_path,
            )
        if len(ids) and (ids[0] < 0 or ids[-1] >= self.num_experts or np.any(np.diff(ids) <= 0)):
            raise CorruptRecordError(
                f"{index_path}: expert ids must be strictly ascending in [0, {self.num_experts})", path=index_path
            )
        records_path = directory / "records.bin"
        size = records_path.stat().st_size if records_path.is_file() else 0
        if size != len(ids) * self.record_bytes:
            complete = size // self.record_bytes
            first_bad = int(ids[complete]) if complete < len(ids) else None
            damage = f"; the record of expert {first_bad} is incomplete" if first_bad is not None else ""
            raise CorruptRecordError(
                f"{records_path} is truncated or damaged: expected {len(ids) * self.record_bytes} bytes "
                f"({len(ids)} records of {self.record_bytes} bytes), found {size}{damage}",
                expert_id=first_bad,
                path=records_path,
            )
        return records_path, index

    def _snapshot_records(self, records_path: Path, index: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields ``(expert_id, record)`` in id order through one bounded, reused buffer, verifying CRCs."""
        rows = self._chunk_rows(len(index))
        buffer = torch.empty(rows, self.record_numel)  # (rows, R)
        with open(records_path, "rb") as file:
            for start in range(0, len(index), rows):
                count = min(rows, len(index) - start)
                chunk = _byte_view(buffer[:count])
                got = file.readinto(chunk)
                if got != len(chunk):
                    expert_id = int(index[start + got // self.record_bytes, 0])
                    raise CorruptRecordError(
                        f"expert {expert_id}: {records_path} ended early (truncated)",
                        expert_id=expert_id,
                        path=records_path,
                    )
                for row in range(count):
                    expert_id, expected = (int(value) for value in index[start + row])
                    actual = zlib.crc32(_byte_view(buffer[row]))
                    if actual != expected:
                        raise CorruptRecordError(
                            f"expert {expert_id}: checksum mismatch in {records_path} at byte offset "
                            f"{(start + row) * self.record_bytes} "
                            f"(expected crc32 {expected:#010x}, got {actual:#010x})",
                            expert_id=expert_id,
                            path=records_path,
                        )
                    yield expert_id, buffer[row]

    def _chunk_rows(self, num_records: int) -> int:
        return max(1, min(num_records, SNAPSHOT_CHUNK_BYTES // self.record_bytes))

    # ---------------------------------------------------------------- for subclasses

    @abstractmethod
    def _read(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> None:
        """Synchronous read of ``part`` into a validated buffer; serves the initial record when unmaterialized."""

    @abstractmethod
    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        """Synchronous write from a validated buffer."""

    @abstractmethod
    def _clear(self) -> None:
        """Forgets every record: all experts become unmaterialized (``_written`` still lists the old ones)."""

    def _read_async(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> Pending:
        self._read(expert_id, into, part)
        return Pending()

    def _write_async(self, expert_id: int, src: torch.Tensor) -> Pending:
        self._write(expert_id, src)
        return Pending()

    def _initial_record(self, expert_id: int, out: torch.Tensor) -> None:
        """Fills the CPU vector ``out`` with the initial record (zeroed first, so it is deterministic)."""
        out.zero_()
        self.init_record(expert_id, out)

    def _check_id(self, expert_id: int) -> int:
        if isinstance(expert_id, bool) or not isinstance(expert_id, int | np.integer):
            raise TypeError(f"expert id must be an int, got {type(expert_id).__name__}")
        if not 0 <= expert_id < self.num_experts:
            raise IndexError(f"expert id {expert_id} out of range [0, {self.num_experts})")
        return int(expert_id)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _prepare(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        self._check_open()
        if (
            not isinstance(buffer, torch.Tensor)
            or buffer.dtype != torch.float32
            or buffer.dim() != 1
            or buffer.numel() != self.record_numel
            or not buffer.is_contiguous()
        ):
            got = (
                f"{tuple(buffer.shape)} {buffer.dtype}{'' if buffer.is_contiguous() else ' non-contiguous'}"
                if isinstance(buffer, torch.Tensor)
                else type(buffer).__name__
            )
            raise ValueError(
                f"{name} must be a contiguous 1-D float32 tensor of {self.record_numel} elements, got {got}"
            )
        if buffer.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} must be on the CPU or a CUDA device, got {buffer.device}")
        return buffer.detach()

    def _check_part(self, part: str) -> str:
        if part not in self.part_bounds:
            raise ValueError(f"part ({part!r}) must be one of: {', '.join(RECORD_PARTS)}")
        return part

    def part_bytes(self, part: RecordPart) -> int:
        """Bytes of ``part`` of one record."""
        first, end = self.part_bounds[part]
        return (end - first) * 4

    def _count_read(self, expert_id: int, part: str = "record") -> None:
        self._counters["reads"] += 1
        self._counters["bytes_read"] += self.part_bytes(part)
        if expert_id not in self._written:
            self._counters["lazy_reads"] += 1

    def _count_write(self, expert_id: int) -> None:
        self._counters["writes"] += 1
        self._counters["bytes_written"] += self.record_bytes
        self._written.add(expert_id)
