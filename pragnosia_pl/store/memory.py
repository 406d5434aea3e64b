"""Stores in memory: :class:`DeviceStore` (every expert on the compute device) and :class:`HostStore`."""

from __future__ import annotations

import torch

from pragnosia_pl.store.base import HOST_CHUNK_BYTES, ExpertStore, Pending, RecordInit, RecordPart


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
        self,
        num_experts: int,
        record_numel: int,
        init_record: RecordInit,
        device: torch.device | str = "cpu",
        params_numel: int | None = None,
    ) -> None:
        super().__init__(num_experts, record_numel, init_record, params_numel)
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

    def _read(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> None:
        first, end = self.part_bounds[part]
        into[first:end].copy_(self.records[expert_id, first:end])

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
        self,
        num_experts: int,
        record_numel: int,
        init_record: RecordInit,
        pin_memory: bool | None = None,
        params_numel: int | None = None,
    ) -> None:
        super().__init__(num_experts, record_numel, init_record, params_numel)
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

    def _read(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> None:
        if into.is_cuda:
            self._read_async(expert_id, into, part).wait()
            return
        self._drain()
        record = self._records.get(expert_id)
        if record is None:
            self._initial_record(expert_id, into)
        else:
            first, end = self.part_bounds[part]
            into[first:end].copy_(record[first:end])

    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        if src.is_cuda:
            self._write_async(expert_id, src).wait()
            return
        self._drain()
        self._record_for_write(expert_id).copy_(src)

    def _read_async(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> Pending:
        if not into.is_cuda:
            self._read(expert_id, into, part)
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
            part = "record"  # an unmaterialized expert: all of `into` gets its initial record
        first, end = self.part_bounds[part]
        event = self._copy_on_side_stream(into[first:end], record[first:end], into)
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


def _arena_rows(record_bytes: int, arena_index: int) -> int:
    """Records in the ``arena_index``-th arena: blocks of a power of two bytes that double from the
    smallest one holding a record up to about :data:`HOST_CHUNK_BYTES` (at least 4 records). torch's
    pinned host allocator rounds every block up to a power of two, so an arena wastes less than one
    record of it."""
    smallest = 1 << (record_bytes - 1).bit_length()
    largest = max(HOST_CHUNK_BYTES, 4 * smallest)
    return min(largest, smallest << min(arena_index, 62)) // record_bytes
