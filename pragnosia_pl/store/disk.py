"""The disk store: fixed-size records in one preallocated file, read and written at their offsets."""

from __future__ import annotations

import atexit
import errno
import mmap
import os
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from pragnosia_pl.faults import crash_point
from pragnosia_pl.store.base import CorruptRecordError, ExpertStore, Pending, RecordInit, RecordPart
from pragnosia_pl.store.files import _byte_view, _fdatasync, _lock_exclusively, _pread_full, _pwrite_full

# O_DIRECT transfers must start at, and span, multiples of the logical block size (512 B or 4 KiB): records are
# placed at multiples of DIRECT_ALIGN and moved through one page-aligned buffer.
DIRECT_ALIGN = 4096


class DiskStore(ExpertStore):
    """Records in one preallocated file, ``record_bytes`` at offset ``expert_id · record_bytes``.

    The file is created sparse with ``ftruncate`` (n = 10⁶ costs no time, memory or disk until experts
    are written) and its previous contents are discarded: it is scratch space, persistence is
    :meth:`snapshot`. Reads and writes are ``os.preadv``/``os.pwritev`` straight into and out of the
    tensor's memory (CUDA tensors go through one reused pinned staging buffer). Each part of a record (its
    parameters, its optimizer state: see :class:`ExpertStore`) carries an xxh3-64 checksum of its own (13× faster
    than CRC32 on the hot path; snapshots keep CRC32), kept in memory for materialized experts only and verified on
    every read of that part, so a part can be read alone. All I/O runs on
    one worker thread, in issue order; it releases the GIL, so ``read_async``/``write_async`` overlap
    with compute.

    With ``direct=True`` (``model.store: direct``) the file is opened with ``O_DIRECT``: every read comes from the
    disk and no record enters the page cache, so a store larger than RAM neither thrashes the cache nor pushes
    other processes' pages out. Both parts of a record then start at multiples of 4 KiB (a part is read alone in
    whole blocks) and pass through one page-aligned buffer (one extra copy); a short read is retried from a block
    boundary. The time the worker spends in the read and write system calls is counted
    (``read_seconds``, ``write_seconds`` in :meth:`stats`), and so are the bytes it read from the file
    (``file_bytes_read``: reads of materialized experts).

    Args:
        path: the record file (created, or truncated if it exists; parent folders are created). It is
            locked while the store is open.
        num_experts: number of experts (n ≥ 1).
        record_numel: float32 elements per record (R ≥ 1).
        init_record: fills an expert's initial record (see :data:`RecordInit`).
        fsync: ``fdatasync`` after every write (durable, slower); snapshots are always fsynced.
        direct: read and write with ``O_DIRECT`` (bypass the page cache).
        params_numel: elements of a record's leading part (its parameters); ``None``: the whole record.

    Raises:
        ValueError: ``num_experts`` or ``record_numel`` below 1; ``direct`` on a file system without ``O_DIRECT``
            (tmpfs, for example) or a platform without it.
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
        direct: bool = False,
        params_numel: int | None = None,
    ) -> None:
        super().__init__(num_experts, record_numel, init_record, params_numel)
        self.path = Path(path)
        self.fsync = fsync
        self.direct = direct
        self.align = DIRECT_ALIGN if direct else 1
        # a record in the file: [params | padding | state | padding], each part starting at a multiple of `align`
        self.state_offset = _round_up(self.part_bytes("params"), self.align)
        self.stride = self.state_offset + _round_up(self.part_bytes("state"), self.align)  # one record to the next
        self.path.parent.mkdir(parents=True, exist_ok=True)
        release_unreleased()  # a dropped store of this file may still hold its lock
        self._fd = _open_records(self.path, direct)
        try:
            _lock_exclusively(self._fd, self.path)
            os.ftruncate(self._fd, 0)  # drop whatever an earlier run left, then grow sparse
            os.ftruncate(self._fd, num_experts * self.stride)
        except BaseException:
            os.close(self._fd)
            raise
        # direct I/O moves records through this page-aligned buffer (anonymous mmaps are page-aligned)
        self._aligned = mmap.mmap(-1, self.stride) if direct else None
        self._io = dict(read_seconds=0.0, write_seconds=0.0, file_bytes_read=0)  # worker thread only
        self._crc: dict[int, tuple[int, int]] = {}  # materialized id -> xxh3-64 of (params, state); worker only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pragnosia-disk-store")
        self._release = weakref.finalize(self, _defer_release, self._worker, self._fd)
        self._staging: torch.Tensor | None = None  # pinned; CUDA buffers pass through it
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stats(self) -> dict[str, float]:
        """:meth:`ExpertStore.stats` plus ``file_bytes_allocated`` (disk blocks the sparse file uses), the worker's
        seconds in reads and writes (``read_seconds``, ``write_seconds``) and ``file_bytes_read``."""
        stats = super().stats()
        stats.update({key: float(value) for key, value in self._io.items()})
        if not self._closed:
            stats["file_bytes_allocated"] = float(os.fstat(self._fd).st_blocks * 512)
        return stats

    def synchronize(self) -> None:
        if not self._closed:
            self._worker.submit(_noop).result()

    def submit(self, operation: Callable[..., None], *args: object) -> Pending:
        """Runs ``operation(*args)`` on the store's worker, after every operation issued before it: a store layered
        on this one (:class:`~pragnosia_pl.store.HostTier`) keeps the order in which its operations were issued."""
        self._check_open()
        return Pending(future=self._worker.submit(operation, *args))

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._release.detach()  # closed here, waiting for the worker, not by the collector
        _release_disk_store(self._worker, self._fd)
        release_unreleased()

    def __repr__(self) -> str:
        return (
            f"DiskStore(path='{self.path}', num_experts={self.num_experts}, record_numel={self.record_numel}, "
            f"direct={self.direct}, materialized={len(self._written)})"
        )

    def _read(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> None:
        self._read_async(expert_id, into, part).wait()

    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        self._write_async(expert_id, src).wait()

    def _read_async(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> Pending:
        return Pending(future=self._worker.submit(self._read_now, expert_id, into, part, _ready_event(into)))

    def _write_async(self, expert_id: int, src: torch.Tensor) -> Pending:
        return Pending(future=self._worker.submit(self._write_now, expert_id, src, _ready_event(src)))

    def _clear(self) -> None:
        self._worker.submit(self._clear_now).result()

    # The methods below run on the worker thread only.

    def _read_now(self, expert_id: int, into: torch.Tensor, part: RecordPart, ready: torch.cuda.Event | None) -> None:
        if not into.is_cuda:
            self._read_cpu(expert_id, into, part)
            return
        staging = self._staging_buffer()
        if expert_id not in self._crc:
            part = "record"  # an unmaterialized expert: all of `into` gets its initial record
        self._read_cpu(expert_id, staging, part)
        first, end = self.part_bounds[part]
        stream = self._stream(into.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            into[first:end].copy_(staging[first:end], non_blocking=True)
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

    def _read_cpu(self, expert_id: int, out: torch.Tensor, part: RecordPart) -> None:
        expected = self._crc.get(expert_id)
        if expected is None:
            self._initial_record(expert_id, out)
            return
        view = _byte_view(out)
        params_bytes = self.part_bytes("params")
        # (index of the checksum, first byte in the record, end byte, where the part starts in the file record)
        pieces = [(0, 0, params_bytes, 0), (1, params_bytes, len(view), self.state_offset)]
        pieces = [piece for piece in pieces if part == "record" or RECORD_PIECE[part] == piece[0]]
        base = expert_id * self.stride
        span_start = pieces[0][3]
        span_end = pieces[-1][3] + pieces[-1][2] - pieces[-1][1]
        if self._aligned is None:  # the file record is the record: read straight into it
            target = view[pieces[0][1] : pieces[-1][2]]
        else:
            span_end = _round_up(span_end, self.align)
            target = memoryview(self._aligned)[: span_end - span_start]
        offset = base + span_start
        start = time.perf_counter()
        got = _pread_full(self._fd, target, offset, self.align)
        self._io["read_seconds"] += time.perf_counter() - start  # the system call only, not the copy below
        self._io["file_bytes_read"] += got
        needed = pieces[-1][3] + pieces[-1][2] - pieces[-1][1] - span_start
        if got < needed:
            raise CorruptRecordError(
                f"expert {expert_id}: {self.path} is truncated: read {got} of {needed} bytes of its record "
                f"at byte offset {offset}",
                expert_id=expert_id,
                path=self.path,
            )
        for checksum, first, end, in_file in pieces:
            if self._aligned is not None:
                view[first:end] = target[in_file - span_start : in_file - span_start + end - first]
            actual = xxhash.xxh3_64_intdigest(view[first:end])
            if actual != expected[checksum]:
                raise CorruptRecordError(
                    f"expert {expert_id}: checksum mismatch in {self.path} at byte offset {base + in_file} "
                    f"(its {('parameters', 'optimizer state')[checksum]}: expected xxh3 {expected[checksum]:#018x}, "
                    f"got {actual:#018x})",
                    expert_id=expert_id,
                    path=self.path,
                )

    def _write_cpu(self, expert_id: int, src: torch.Tensor) -> None:
        view = _byte_view(src)
        params_bytes = self.part_bytes("params")
        # xxh3: 13x faster than zlib's CRC32 on a 1.6 MB record (0.04 vs 0.46 ms)
        crc = (xxhash.xxh3_64_intdigest(view[:params_bytes]), xxhash.xxh3_64_intdigest(view[params_bytes:]))
        offset = expert_id * self.stride
        if self._aligned is not None:
            aligned = memoryview(self._aligned)
            aligned[:params_bytes] = view[:params_bytes]  # the padding after each part stays zero
            aligned[self.state_offset : self.state_offset + len(view) - params_bytes] = view[params_bytes:]
            view = aligned
        try:
            start = time.perf_counter()  # the system calls only, not the copy above
            _pwrite_full(self._fd, view, offset, self.align)
            if self.fsync:
                _fdatasync(self._fd)
            self._io["write_seconds"] += time.perf_counter() - start
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
        os.ftruncate(self._fd, self.num_experts * self.stride)
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


RECORD_PIECE = {"params": 0, "state": 1}  # which checksum covers a part read alone


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _open_records(path: Path, direct: bool) -> int:
    """Opens (creating) the record file, with ``O_DIRECT`` when ``direct``; one line when the file system refuses."""
    flags = os.O_RDWR | os.O_CREAT
    if direct:
        if not hasattr(os, "O_DIRECT"):  # pragma: no cover - macOS, Windows
            raise ValueError("model.store 'direct' needs O_DIRECT (Linux); use store: disk on this platform")
        flags |= os.O_DIRECT
    try:
        return os.open(path, flags, 0o644)
    except OSError as error:
        if direct and error.errno == errno.EINVAL:
            raise ValueError(
                f"model.store 'direct': the file system of {path.parent} does not support O_DIRECT (tmpfs?); "
                "give model.store_dir on a disk, or use store: disk"
            ) from None
        raise


def _release_disk_store(worker: ThreadPoolExecutor, fd: int) -> None:
    """Stop the worker after every operation queued before, then close the file."""
    worker.shutdown(wait=True)
    os.close(fd)


# Stores the garbage collector dropped, released outside it. A finalizer may run inside threading's or
# concurrent.futures' own locked sections (a new thread's start, another executor's submit), where joining the worker
# or submitting to it deadlocks (both were seen hanging the suite); so it only records the store, and the next store
# built, a store closed, or the interpreter's exit releases it.
_UNRELEASED: list[tuple[ThreadPoolExecutor, int]] = []


def _defer_release(worker: ThreadPoolExecutor, fd: int) -> None:
    _UNRELEASED.append((worker, fd))  # one atomic list operation: no lock


def release_unreleased() -> None:
    """Release the disk stores the collector dropped (see :data:`_UNRELEASED`)."""
    while _UNRELEASED:
        _release_disk_store(*_UNRELEASED.pop())


atexit.register(release_unreleased)


def _ready_event(buffer: torch.Tensor) -> torch.cuda.Event | None:
    """An event on the current stream: the worker's copy of ``buffer`` waits for work queued before it."""
    if not buffer.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(buffer.device))
    return event


def _noop() -> None:
    pass
