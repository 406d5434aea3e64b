"""Expert stores: where experts live while they are not on the compute device (DESIGN §5).

A store holds ``num_experts`` fixed-size *records*. A record is a flat float32 vector of
``record_numel`` elements; the model packs an expert's parameters, its optimizer state and a step
counter into it, the store knows nothing about models. An expert that was never written is
*unmaterialized*: reading it yields ``init_record(expert_id, out)`` and costs no memory, so
``num_experts = 10**6`` is free until the experts are used.

Every operation on a store takes effect in the order it was issued (the single disk worker thread and
the single CUDA side stream are FIFO): a ``read_async`` issued after a ``write_async`` of the same
expert sees the write, and a ``write_async`` from a buffer has read that buffer before any later
``read_async`` into the same buffer overwrites it. :class:`~pragnosia_pl.expert_cache.ExpertCache`
relies on this to reuse a slot right after queueing its write-back.

Snapshot format, shared by every store kind (a snapshot of one kind restores into any other)::

    <directory>/meta.json    format name and version, num_experts, record_numel, dtype, byte order
    <directory>/index.npy    int64 (m, 2): the materialized expert ids (ascending) and their CRC32
    <directory>/records.bin  their m records in id order, raw float32
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
import weakref
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import numpy as np
import torch

from pragnosia_pl.faults import crash_point

RecordInit = Callable[[int, torch.Tensor], None]
"""``init_record(expert_id, out)`` fills the zeroed CPU float32 vector ``out`` (``record_numel``
elements) with the expert's initial record, deterministically from ``(seed, expert_id)``."""

STORE_KINDS = ("device", "host", "disk")
SNAPSHOT_FORMAT = "pragnosia-expert-store"
SNAPSHOT_VERSION = 1
SNAPSHOT_CHUNK_BYTES = 64 << 20  # snapshot and restore stream records through a buffer of at most this size
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


class ExpertStore(ABC):
    """Fixed-size float32 records of ``num_experts`` experts, lazily initialised.

    Subclasses implement ``_read``/``_write`` (synchronous, arguments already validated) and
    ``_clear``; they may override ``_read_async``/``_write_async`` to overlap transfers with compute.

    Args:
        num_experts: number of records (n ≥ 1).
        record_numel: float32 elements per record (R ≥ 1).
        init_record: fills the initial record of an expert that was never written (see :data:`RecordInit`).

    Raises:
        ValueError: ``num_experts`` or ``record_numel`` below 1.

    Example::

        store = HostStore(num_experts=1024, record_numel=4096, init_record=init)
        slot = torch.empty(4096)
        store.read(7, slot)  # initial record of expert 7; nothing is materialized
        slot.add_(1.0)
        store.write(7, slot)  # expert 7 is materialized now
        store.snapshot("ckpt/experts")
    """

    kind: ClassVar[str]

    def __init__(self, num_experts: int, record_numel: int, init_record: RecordInit) -> None:
        for name, value in (("num_experts", num_experts), ("record_numel", record_numel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an integer ≥ 1")
        if not callable(init_record):
            raise ValueError(f"init_record must be callable, got {type(init_record).__name__}")
        self.num_experts = num_experts
        self.record_numel = record_numel
        self.record_bytes = record_numel * 4
        self.init_record = init_record
        self._written: set[int] = set()  # materialized ids as issued (async writes count at issue time)
        self._counters = dict(reads=0, writes=0, bytes_read=0, bytes_written=0, lazy_reads=0)
        self._closed = False

    # ---------------------------------------------------------------- public API

    def read(self, expert_id: int, into: torch.Tensor) -> None:
        """Copies the record of ``expert_id`` into ``into`` (contiguous 1-D float32, CPU or CUDA).

        An unmaterialized expert yields its initial record and stays unmaterialized.
        """
        expert_id = self._check_id(expert_id)
        into = self._prepare(into, "into")
        self._count_read(expert_id)
        self._read(expert_id, into)

    def write(self, expert_id: int, src: torch.Tensor) -> None:
        """Stores ``src`` as the record of ``expert_id``, which becomes materialized."""
        expert_id = self._check_id(expert_id)
        src = self._prepare(src, "src")
        self._write(expert_id, src)
        self._count_write(expert_id)

    def read_async(self, expert_id: int, into: torch.Tensor) -> Pending:
        """Starts :meth:`read`; ``into`` holds the record once the returned handle's ``wait()`` returns."""
        expert_id = self._check_id(expert_id)
        into = self._prepare(into, "into")
        self._count_read(expert_id)
        return self._read_async(expert_id, into)

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
        """Cumulative traffic (``reads``, ``writes``, ``bytes_read``, ``bytes_written``, ``lazy_reads``)
        and the current number of ``materialized`` experts."""
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
                        self._read(expert_id, buffer[row])
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
    def _read(self, expert_id: int, into: torch.Tensor) -> None:
        """Synchronous read into a validated buffer; serves the initial record when unmaterialized."""

    @abstractmethod
    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        """Synchronous write from a validated buffer."""

    @abstractmethod
    def _clear(self) -> None:
        """Forgets every record: all experts become unmaterialized (``_written`` still lists the old ones)."""

    def _read_async(self, expert_id: int, into: torch.Tensor) -> Pending:
        self._read(expert_id, into)
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

    def _count_read(self, expert_id: int) -> None:
        self._counters["reads"] += 1
        self._counters["bytes_read"] += self.record_bytes
        if expert_id not in self._written:
            self._counters["lazy_reads"] += 1

    def _count_write(self, expert_id: int) -> None:
        self._counters["writes"] += 1
        self._counters["bytes_written"] += self.record_bytes
        self._written.add(expert_id)


class DeviceStore(ExpertStore):
    """Every expert resident on ``device``: the traditional memory behaviour, kept for comparison.

    One ``(num_experts, record_numel)`` tensor is allocated and filled with every initial record at
    construction, so its memory really is O(n) (also on the CPU, where untouched pages would not count).

    Args:
        num_experts: number of experts (n ≥ 1).
        record_numel: float32 elements per record (R ≥ 1).
        init_record: fills an expert's initial record (see :data:`RecordInit`).
        device: where the records live.

    Raises:
        ValueError: ``num_experts`` or ``record_numel`` below 1.

    Example::

        store = DeviceStore(num_experts=8, record_numel=4096, init_record=init, device="cuda")
        store.records.shape  # torch.Size([8, 4096]), all initialised
    """

    kind = "device"

    def __init__(
        self, num_experts: int, record_numel: int, init_record: RecordInit, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__(num_experts, record_numel, init_record)
        self.device = torch.device(device)
        self.records = torch.empty(num_experts, record_numel, device=self.device)  # (n, R)
        self._initialise(range(num_experts))

    def _initialise(self, ids: range | list[int]) -> None:
        if self.device.type == "cpu":
            for expert_id in ids:
                self._initial_record(expert_id, self.records[expert_id])
            return
        ids = list(ids)
        rows = self._chunk_rows(len(ids))
        staging = torch.empty(rows, self.record_numel, pin_memory=self.device.type == "cuda")  # (rows, R)
        for start in range(0, len(ids), rows):
            chunk = ids[start : start + rows]
            for row, expert_id in enumerate(chunk):
                self._initial_record(expert_id, staging[row])
            index = torch.tensor(chunk, device=self.device)
            self.records.index_copy_(0, index, staging[: len(chunk)].to(self.device))

    def _read(self, expert_id: int, into: torch.Tensor) -> None:
        into.copy_(self.records[expert_id])

    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        self.records[expert_id].copy_(src)

    def _clear(self) -> None:
        self._initialise(sorted(self._written))


class HostStore(ExpertStore):
    """Records in CPU memory, allocated on an expert's first write: memory is O(materialized experts).

    Records are rows of arenas that double in size up to about :data:`HOST_CHUNK_BYTES` (few large
    allocations, at most about one arena of slack), pinned when CUDA is used, so copies
    to and from a CUDA buffer run asynchronously on a side stream (``read_async``/``write_async``
    return at once; the handle's ``wait()`` orders the current stream after the copy).

    Args:
        num_experts: number of experts (n ≥ 1).
        record_numel: float32 elements per record (R ≥ 1).
        init_record: fills an expert's initial record (see :data:`RecordInit`).
        pin_memory: pin the records in page-locked memory; ``None`` pins when CUDA is available.

    Raises:
        ValueError: ``num_experts`` or ``record_numel`` below 1, or ``pin_memory=True`` without CUDA.

    Example::

        store = HostStore(num_experts=10**6, record_numel=4096, init_record=init)
        slot = torch.empty(4096, device="cuda")
        store.read_async(3, slot).wait()  # compute on `slot` is now ordered after the copy
    """

    kind = "host"

    def __init__(
        self, num_experts: int, record_numel: int, init_record: RecordInit, pin_memory: bool | None = None
    ) -> None:
        super().__init__(num_experts, record_numel, init_record)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("HostStore(pin_memory=True) needs CUDA, which is not available")
        self.pin_memory = pin_memory
        self._records: dict[int, torch.Tensor] = {}  # expert id -> (R,) row of an arena
        self._arenas: list[torch.Tensor] = []  # (rows, R) each
        self._arena_used = 0  # rows of the newest arena given out
        self._staging: torch.Tensor | None = None  # initial records on their way to a CUDA buffer
        self._staging_event: torch.cuda.Event | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._side_busy = False

    def _read(self, expert_id: int, into: torch.Tensor) -> None:
        if into.is_cuda:
            self._read_async(expert_id, into).wait()
            return
        self._drain()
        record = self._records.get(expert_id)
        if record is None:
            self._initial_record(expert_id, into)
        else:
            into.copy_(record)

    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        if src.is_cuda:
            self._write_async(expert_id, src).wait()
            return
        self._drain()
        self._record_for_write(expert_id).copy_(src)

    def _read_async(self, expert_id: int, into: torch.Tensor) -> Pending:
        if not into.is_cuda:
            self._read(expert_id, into)
            return Pending()
        record = self._records.get(expert_id)
        staged = record is None
        if staged:
            if self._staging_event is not None:
                self._staging_event.synchronize()  # the previous copy out of the staging buffer is done
            if self._staging is None:
                self._staging = torch.empty(self.record_numel, pin_memory=self.pin_memory)
            record = self._staging
            self._initial_record(expert_id, record)
        event = self._copy_on_side_stream(into, record, into)
        if staged:
            self._staging_event = event
        return Pending(event=event, device=into.device)

    def _write_async(self, expert_id: int, src: torch.Tensor) -> Pending:
        if not src.is_cuda:
            self._write(expert_id, src)
            return Pending()
        event = self._copy_on_side_stream(self._record_for_write(expert_id), src, src)
        return Pending(event=event, device=src.device)

    def _copy_on_side_stream(self, dst: torch.Tensor, src: torch.Tensor, cuda_buffer: torch.Tensor) -> torch.cuda.Event:
        device = cuda_buffer.device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the buffer's producers/consumers go first
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        cuda_buffer.record_stream(stream)
        self._side_busy = True
        return event

    def _record_for_write(self, expert_id: int) -> torch.Tensor:
        record = self._records.get(expert_id)
        if record is None:
            if not self._arenas or self._arena_used == len(self._arenas[-1]):
                rows = _arena_rows(self.record_bytes, len(self._arenas))
                self._arenas.append(torch.empty(rows, self.record_numel, pin_memory=self.pin_memory))  # (rows, R)
                self._arena_used = 0
            record = self._records[expert_id] = self._arenas[-1][self._arena_used]
            self._arena_used += 1
        return record

    def _drain(self) -> None:
        """Waits for side-stream copies before the host touches records."""
        if self._side_busy:
            for stream in self._streams.values():
                stream.synchronize()
            self._side_busy = False

    def _clear(self) -> None:
        self._drain()
        self._records.clear()
        self._arena_used = 0
        self._arenas.clear()

    def stats(self) -> dict[str, float]:
        """:meth:`ExpertStore.stats` plus ``host_bytes_allocated`` (the record arenas, pinned or not)."""
        stats = super().stats()
        stats["host_bytes_allocated"] = float(sum(arena.numel() * 4 for arena in self._arenas))
        return stats

    def synchronize(self) -> None:
        self._drain()

    def close(self) -> None:
        super().close()
        self._clear()


class DiskStore(ExpertStore):
    """Records in one preallocated file, ``record_bytes`` at offset ``expert_id · record_bytes``.

    The file is created sparse with ``ftruncate`` (n = 10⁶ costs no time, memory or disk until experts
    are written) and its previous contents are discarded: it is scratch space, persistence is
    :meth:`snapshot`. Reads and writes are ``os.preadv``/``os.pwritev`` straight into and out of the
    tensor's memory (CUDA tensors go through one reused pinned staging buffer). Every record carries a
    CRC32, kept in memory for materialized experts only and verified on every read. All I/O runs on
    one worker thread, in issue order; it releases the GIL, so ``read_async``/``write_async`` overlap
    with compute.

    Args:
        path: the record file (created, or truncated if it exists; parent folders are created). It is
            locked while the store is open.
        num_experts: number of experts (n ≥ 1).
        record_numel: float32 elements per record (R ≥ 1).
        init_record: fills an expert's initial record (see :data:`RecordInit`).
        fsync: ``fdatasync`` after every write (durable, slower); snapshots are always fsynced.

    Raises:
        ValueError: ``num_experts`` or ``record_numel`` below 1.
        RuntimeError: another open DiskStore uses ``path``.
        CorruptRecordError: (from reads) a record fails its checksum or the file was truncated.

    Example::

        store = DiskStore("run/experts.bin", num_experts=10**6, record_numel=4096, init_record=init)
        pending = store.read_async(42, slot)  # the worker reads while the caller computes
        ...
        pending.wait()
    """

    kind = "disk"

    def __init__(
        self,
        path: str | Path,
        num_experts: int,
        record_numel: int,
        init_record: RecordInit,
        fsync: bool = False,
    ) -> None:
        super().__init__(num_experts, record_numel, init_record)
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_exclusively(self._fd, self.path)
            os.ftruncate(self._fd, 0)  # drop whatever an earlier run left, then grow sparse
            os.ftruncate(self._fd, num_experts * self.record_bytes)
        except BaseException:
            os.close(self._fd)
            raise
        self._crc: dict[int, int] = {}  # materialized expert id -> CRC32 of its record; worker thread only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pragnosia-disk-store")
        self._release = weakref.finalize(self, _release_disk_store, self._worker, self._fd)
        self._staging: torch.Tensor | None = None  # pinned; CUDA buffers pass through it
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stats(self) -> dict[str, float]:
        """:meth:`ExpertStore.stats` plus ``file_bytes_allocated`` (disk blocks the sparse file uses)."""
        stats = super().stats()
        if not self._closed:
            stats["file_bytes_allocated"] = float(os.fstat(self._fd).st_blocks * 512)
        return stats

    def synchronize(self) -> None:
        if not self._closed:
            self._worker.submit(_noop).result()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._release()

    def __repr__(self) -> str:
        return (
            f"DiskStore(path='{self.path}', num_experts={self.num_experts}, record_numel={self.record_numel}, "
            f"materialized={len(self._written)})"
        )

    def _read(self, expert_id: int, into: torch.Tensor) -> None:
        self._read_async(expert_id, into).wait()

    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        self._write_async(expert_id, src).wait()

    def _read_async(self, expert_id: int, into: torch.Tensor) -> Pending:
        return Pending(future=self._worker.submit(self._read_now, expert_id, into, _ready_event(into)))

    def _write_async(self, expert_id: int, src: torch.Tensor) -> Pending:
        return Pending(future=self._worker.submit(self._write_now, expert_id, src, _ready_event(src)))

    def _clear(self) -> None:
        self._worker.submit(self._clear_now).result()

    # The methods below run on the worker thread only.

    def _read_now(self, expert_id: int, into: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        if not into.is_cuda:
            self._read_cpu(expert_id, into)
            return
        staging = self._staging_buffer()
        self._read_cpu(expert_id, staging)
        stream = self._stream(into.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            into.copy_(staging, non_blocking=True)
        into.record_stream(stream)
        stream.synchronize()

    def _write_now(self, expert_id: int, src: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        if not src.is_cuda:
            self._write_cpu(expert_id, src)
            return
        staging = self._staging_buffer()
        stream = self._stream(src.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            staging.copy_(src, non_blocking=True)
        src.record_stream(stream)
        stream.synchronize()
        self._write_cpu(expert_id, staging)

    def _read_cpu(self, expert_id: int, out: torch.Tensor) -> None:
        expected = self._crc.get(expert_id)
        if expected is None:
            self._initial_record(expert_id, out)
            return
        view = _byte_view(out)
        offset = expert_id * self.record_bytes
        got = _pread_full(self._fd, view, offset)
        if got != len(view):
            raise CorruptRecordError(
                f"expert {expert_id}: {self.path} is truncated: read {got} of {len(view)} bytes of its record "
                f"at byte offset {offset}",
                expert_id=expert_id,
                path=self.path,
            )
        actual = zlib.crc32(view)
        if actual != expected:
            raise CorruptRecordError(
                f"expert {expert_id}: checksum mismatch in {self.path} at byte offset {offset} "
                f"(expected crc32 {expected:#010x}, got {actual:#010x})",
                expert_id=expert_id,
                path=self.path,
            )

    def _write_cpu(self, expert_id: int, src: torch.Tensor) -> None:
        view = _byte_view(src)
        crc = zlib.crc32(view)
        offset = expert_id * self.record_bytes
        try:
            _pwrite_full(self._fd, view, offset)
            if self.fsync:
                _fdatasync(self._fd)
        except OSError as error:  # the record on disk may be half written: its old checksum will say so on read
            raise OSError(
                error.errno,
                f"expert {expert_id}: cannot write its record to {self.path} at byte offset {offset}: "
                f"{error.strerror or error}; this file is the run's scratch copy, checkpoints and their store "
                "snapshots are not affected",
            ) from error
        crash_point("store-write")
        self._crc[expert_id] = crc

    def _clear_now(self) -> None:
        os.ftruncate(self._fd, 0)  # gives the blocks back; the file stays sparse at its full size
        os.ftruncate(self._fd, self.num_experts * self.record_bytes)
        self._crc.clear()

    def _staging_buffer(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(self.record_numel, pin_memory=True)
        return self._staging

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream


def make_store(
    kind: str,
    *,
    num_experts: int,
    record_numel: int,
    init_record: RecordInit,
    device: torch.device | str = "cpu",
    directory: str | Path | None = None,
) -> ExpertStore:
    """Builds the store named by ``model.store``.

    Args:
        kind: ``"device"``, ``"host"`` or ``"disk"``.
        num_experts: number of experts.
        record_numel: float32 elements per record.
        init_record: fills an expert's initial record.
        device: the compute device; the device store lives there, the host store is pinned when it is CUDA.
        directory: where the disk store puts its record file (``experts.bin``).

    Raises:
        ValueError: unknown ``kind``, or ``kind="disk"`` without a ``directory``.
    """
    device = torch.device(device)
    if kind == "device":
        return DeviceStore(num_experts, record_numel, init_record, device=device)
    if kind == "host":
        return HostStore(num_experts, record_numel, init_record, pin_memory=device.type == "cuda")
    if kind == "disk":
        if directory is None:
            raise ValueError("model.store_dir must be set when model.store is 'disk'")
        return DiskStore(Path(directory) / "experts.bin", num_experts, record_numel, init_record)
    raise ValueError(f"model.store ({kind!r}) must be one of: {', '.join(STORE_KINDS)}")


def _noop() -> None:
    pass


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


def _release_disk_store(worker: ThreadPoolExecutor, fd: int) -> None:
    worker.shutdown(wait=True)
    os.close(fd)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    return memoryview(tensor.detach().numpy()).cast("B")


def _ready_event(buffer: torch.Tensor) -> torch.cuda.Event | None:
    """An event on the current stream: the worker's copy of ``buffer`` waits for work queued before it."""
    if not buffer.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(buffer.device))
    return event


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Reads ``len(view)`` bytes at ``offset`` (looping over short reads); returns the count read (short at EOF)."""
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
        done += got
    return done


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        if hasattr(os, "pwritev"):
            done += os.pwritev(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without pwritev
            done += os.pwrite(fd, view[done:], offset + done)


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


def _arena_rows(record_bytes: int, arena_index: int) -> int:
    """Records in the ``arena_index``-th arena: blocks of a power of two bytes that double from the
    smallest one holding a record up to about :data:`HOST_CHUNK_BYTES` (at least 4 records). torch's
    pinned host allocator rounds every block up to a power of two, so an arena wastes less than one
    record of it."""
    smallest = 1 << (record_bytes - 1).bit_length()
    largest = max(HOST_CHUNK_BYTES, 4 * smallest)
    return min(largest, smallest << min(arena_index, 62)) // record_bytes
