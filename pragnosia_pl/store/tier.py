"""The host tier: a byte budget of records in host memory in front of a disk store (``model.host_tier_bytes``)."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import torch

from pragnosia_pl.store.base import ExpertStore, Pending, RecordPart
from pragnosia_pl.store.disk import DiskStore, _ready_event


class HostTier(ExpertStore):
    """Records in host memory, at most ``budget_bytes`` of them, between a disk store and the device slots: the
    experts written most often.

    A write of a record in the tier is a copy into memory; the record stays there, dirty, until it is evicted, then it
    is written to ``backing``. A read of a record in the tier is a copy from memory; any other read goes to
    ``backing``. Records enter the tier when they are written (training writes back every record it read whole), not
    when read, so evaluation does not push them out. While the tier has room every written record enters; once it is
    full, a record enters only if it was written more often than the least often written one in the tier (the least
    recently used among those), which leaves; otherwise it is written to ``backing`` directly. So the tier keeps the
    hot experts of skewed routing, and a step that touches more experts than the tier holds, visiting them in id
    order pass after pass, does not cycle every record through it and out again before its next use, as an LRU
    would. The tier counts each written expert's writes (one integer per expert ever written).

    Every copy into or out of the tier runs on ``backing``'s worker thread, in one queue with its reads and writes:
    operations take effect in the order they were issued, as every store promises (a slot can be reused right after
    a write-back is queued from it, and a row right after the write of its evicted record is queued), and the copies
    overlap with compute as the disk's reads do.

    Nothing about an update changes: a record read from the tier is the last one written. Every dirty record is
    written to ``backing`` before a :meth:`snapshot` (which then reads through the tier); :meth:`restore` restores
    ``backing`` and empties the tier. A failed write of an evicted record is raised by a later operation (the next
    ``write_async`` hands it back in its handle), by :meth:`synchronize` or by :meth:`snapshot`.

    Args:
        backing: the disk store behind the tier (``disk`` or ``direct``).
        budget_bytes: host memory for records: ``budget_bytes // record_bytes`` of them, allocated as they enter.

    Raises:
        ValueError: the budget holds no record.

    Example::

        store = HostTier(DiskStore("run/experts.bin", 2816, record_numel, init, direct=True), budget_bytes=4 << 30)
    """

    kind = "tier"

    def __init__(self, backing: DiskStore, budget_bytes: int) -> None:
        super().__init__(backing.num_experts, backing.record_numel, backing.init_record, backing.params_numel)
        rows = budget_bytes // backing.record_bytes
        if rows < 1:
            raise ValueError(
                f"model.host_tier_bytes ({budget_bytes}) must hold at least one record ({backing.record_bytes} "
                "bytes), or be 0 (no tier)"
            )
        self.backing = backing
        self.budget_bytes = budget_bytes
        self.capacity = rows  # records held
        self.path: Path = backing.path
        self.rows = torch.empty(rows, self.record_numel)  # (rows, R): its pages are touched as records enter
        self._row_of: OrderedDict[int, int] = OrderedDict()  # expert in the tier -> row, least recent first
        self._dirty: set[int] = set()
        self._free_rows = list(range(rows - 1, -1, -1))
        self._evictions: list[Pending] = []  # writes of evicted records to backing, not yet seen done
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._writes: dict[int, int] = {}  # expert -> times written to this store
        self._tier = dict(hits=0, misses=0, evictions=0, writebacks=0, write_arounds=0)

    def stats(self) -> dict[str, float]:
        """:meth:`ExpertStore.stats` (traffic through the tier) plus ``tier_hits``, ``tier_misses``,
        ``tier_evictions``, ``tier_writebacks``, ``tier_write_arounds`` (writes that went to ``backing`` directly),
        the current ``tier_records`` and ``tier_dirty``,
        ``tier_bytes_allocated``, and the backing store's stats prefixed ``backing_`` (``backing_bytes_read``: what
        came from the disk)."""
        stats = super().stats()
        stats.update({f"tier_{key}": float(value) for key, value in self._tier.items()})
        used = self.capacity - len(self._free_rows)
        stats.update(
            tier_records=float(len(self._row_of)),
            tier_dirty=float(len(self._dirty)),
            tier_bytes_allocated=float(used * self.record_bytes),
        )
        stats.update({f"backing_{key}": value for key, value in self.backing.stats().items()})
        return stats

    def synchronize(self) -> None:
        """Waits for every operation issued so far; raises the first failed write of an evicted record."""
        if self._closed:
            return
        evictions, self._evictions = self._evictions, []
        self.backing.synchronize()
        Pending.wait_all(evictions)

    def write_back(self) -> None:
        """Writes every dirty record of the tier to ``backing`` and waits; they stay in the tier, clean."""
        self._check_open()
        writes = [
            self.backing.write_async(expert_id, self.rows[self._row_of[expert_id]]) for expert_id in sorted(self._dirty)
        ]
        self._tier["writebacks"] += len(writes)
        self._dirty.clear()
        self.synchronize()
        Pending.wait_all(writes)

    def snapshot(self, directory: str | Path) -> None:
        """Writes the dirty records to ``backing`` (:meth:`write_back`), then :meth:`ExpertStore.snapshot`."""
        self.write_back()
        super().snapshot(directory)

    def restore(self, directory: str | Path) -> None:
        """Restores ``backing`` from the snapshot and empties the tier (only once the snapshot was verified)."""
        self._check_open()
        self.synchronize()
        self.backing.restore(directory)
        self._forget_rows()
        self._written = set(self.backing.materialized_ids())

    def close(self) -> None:
        if self._closed:
            return
        try:
            super().close()
        finally:
            self.backing.close()

    def __repr__(self) -> str:
        return f"HostTier(backing={self.backing!r}, budget_bytes={self.budget_bytes}, records={len(self._row_of)})"

    def _read(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> None:
        self._read_async(expert_id, into, part).wait()

    def _read_async(self, expert_id: int, into: torch.Tensor, part: RecordPart) -> Pending:
        row = self._row_of.get(expert_id)
        if row is None:
            self._tier["misses"] += 1
            return self.backing.read_async(expert_id, into, part)
        self._tier["hits"] += 1
        self._row_of.move_to_end(expert_id)
        first, end = self.part_bounds[part]
        return self._copy_in_order(into[first:end], self.rows[row, first:end], into)

    def _write(self, expert_id: int, src: torch.Tensor) -> None:
        self._write_async(expert_id, src).wait()

    def _write_async(self, expert_id: int, src: torch.Tensor) -> Pending:
        try:
            Pending.wait_all(self._reap_evictions())
        except Exception as error:  # an earlier eviction's write failed: handed back as this write-back's failure
            failed: Future = Future()
            failed.set_exception(error)
            return Pending(future=failed)
        writes = self._writes[expert_id] = self._writes.get(expert_id, 0) + 1
        row = self._row_of.get(expert_id)
        if row is None:
            row = self._admit(writes)
            if row is None:
                self._tier["write_arounds"] += 1
                return self.backing.write_async(expert_id, src)
            self._row_of[expert_id] = row
        self._row_of.move_to_end(expert_id)
        self._dirty.add(expert_id)
        return self._copy_in_order(self.rows[row], src, src)

    def _admit(self, writes: int) -> int | None:
        """A row for a record written ``writes`` times: a free one, else that of the least often written record in
        the tier if it was written fewer times (least recently used first among equals), else ``None``. An evicted
        dirty record's write to ``backing`` is queued first, so it reads the row before the next copy into it."""
        if self._free_rows:
            return self._free_rows.pop()
        victim = min(self._row_of, key=self._writes.__getitem__)  # the first minimum: least recently used
        if self._writes[victim] >= writes:
            return None
        row = self._row_of.pop(victim)
        self._tier["evictions"] += 1
        if victim in self._dirty:
            self._dirty.discard(victim)
            self._evictions.append(self.backing.write_async(victim, self.rows[row]))
            self._tier["writebacks"] += 1
        return row

    def _reap_evictions(self) -> list[Pending]:
        finished = [pending for pending in self._evictions if pending.done()]
        self._evictions = [pending for pending in self._evictions if not pending.done()]
        return finished

    def _copy_in_order(self, dst: torch.Tensor, src: torch.Tensor, buffer: torch.Tensor) -> Pending:
        """``dst.copy_(src)`` on ``backing``'s worker, after every operation issued before it (``buffer``: the
        caller's tensor, CPU or CUDA)."""
        ready = _ready_event(buffer)
        stream = None
        if buffer.is_cuda:
            stream = self._streams.get(buffer.device)
            if stream is None:
                stream = self._streams[buffer.device] = torch.cuda.Stream(device=buffer.device)
            buffer.record_stream(stream)
        return self.backing.submit(_copy, dst, src, ready, stream)

    def _forget_rows(self) -> None:
        self._row_of.clear()
        self._dirty.clear()
        self._writes.clear()
        self._free_rows = list(range(self.capacity - 1, -1, -1))

    def _clear(self) -> None:
        self.synchronize()
        self._forget_rows()
        self.backing._clear()
        self.backing._written.clear()


def _copy(dst: torch.Tensor, src: torch.Tensor, ready: torch.cuda.Event | None, stream: torch.cuda.Stream | None):
    if stream is None:
        dst.copy_(src)
        return
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        dst.copy_(src, non_blocking=True)
    stream.synchronize()
