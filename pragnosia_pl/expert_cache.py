"""LRU cache of expert records in a fixed number of device slots (DESIGN §5)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from pragnosia_pl.store import ExpertStore, Pending
from pragnosia_pl.store.base import RecordPart


class ExpertCache:
    """``capacity`` device slots holding the records of the most recently used experts.

    The slots are one ``(capacity, record_numel)`` tensor allocated at construction, so at most
    ``capacity`` experts are ever on the device and device memory does not depend on the number of
    experts. A hit costs no transfer; a miss evicts the least recently used expert (writing it back to
    the store if it is dirty) and reads the new one into its slot. :meth:`prefetch` starts that read
    early (on the store's worker thread or CUDA side stream) so it overlaps with compute.

    The slot returned by the most recent :meth:`load` is never evicted by :meth:`prefetch`, nor by
    :meth:`load` while another slot can be evicted, so a caller working on expert ``a`` can prefetch
    ``b``.

    A pass that only runs experts asks for their parameters alone (``params_only=True``): the store reads the
    record's parameter part, and a later whole load of a resident expert reads only the rest (its optimizer state).
    Only an expert loaded whole can be marked dirty.

    Args:
        store: where the records live off the device.
        capacity: number of device slots (``model.expert_cache``); clamped to ``store.num_experts``.
        device: the compute device the slots live on.

    Raises:
        ValueError: ``capacity`` below 1.

    Example::

        cache = ExpertCache(store, capacity=4, device="cuda")
        record = cache.load(3)  # (R,) view of a slot
        cache.prefetch(5)  # read 5 while expert 3 trains
        record.add_(update)
        cache.mark_dirty(3)  # written back when evicted or flushed
        cache.flush()
        store.snapshot("ckpt/experts")
    """

    def __init__(self, store: ExpertStore, capacity: int, device: torch.device | str) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"model.expert_cache ({capacity!r}) must be an integer ≥ 1")
        self.store = store
        self.capacity = min(capacity, store.num_experts)
        self.device = torch.device(device)
        self.slots = torch.zeros(self.capacity, store.record_numel, device=self.device)  # (C, R)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # resident expert -> slot, least recent first
        self._params_only: set[int] = set()  # residents whose slot holds their parameters, not their state
        self._free_slots = list(range(self.capacity - 1, -1, -1))
        self._dirty: set[int] = set()
        self._loading: dict[int, Pending] = {}  # prefetched experts whose read may still be in flight
        self._writebacks: list[Pending] = []
        self._current: int | None = None  # expert returned by the most recent load()
        self._ahead: set[int] = set()  # experts the running stream() has yet to yield
        self._pinned: set[int] = set()  # the group stream_groups() is working on: never evicted
        self._counters = dict(
            hits=0, misses=0, state_loads=0, loads=0, prefetches=0, evictions=0, writebacks=0, bytes_in=0, bytes_out=0
        )

    def load(self, expert_id: int, params_only: bool = False) -> torch.Tensor:
        """Makes ``expert_id`` resident and returns its slot, a ``(record_numel,)`` view of :attr:`slots`; with
        ``params_only`` only the slot's parameter part is sure to hold the expert's.

        The record is ready for work queued on the current CUDA stream (or at once on the CPU).

        Raises:
            IndexError: ``expert_id`` out of range.
            CorruptRecordError: the store found the record damaged (the expert is then not resident).
        """
        return self.slots[self._load_slot(expert_id, params_only)]

    def _load_slot(self, expert_id: int, params_only: bool) -> int:
        """:meth:`load`, returning the slot's index."""
        self._check_id(expert_id)
        self._reap_writebacks()
        self._counters["loads"] += 1
        slot = self._slot_of.get(expert_id)
        if slot is not None:
            self._counters["hits"] += 1
            self._slot_of.move_to_end(expert_id)
            pending = [self._loading.pop(expert_id, None)]
            if not params_only and expert_id in self._params_only:
                pending.append(self._start_read(expert_id, slot, "state"))
                self._loading.pop(expert_id)
        else:
            self._counters["misses"] += 1
            slot = self._take_slot(may_evict_current=True, may_evict_loading=True)
            assert slot is not None  # every resident may be evicted by load()
            pending = [self._start_read(expert_id, slot, "params" if params_only else "record")]
            self._loading.pop(expert_id)
        try:
            Pending.wait_all([handle for handle in pending if handle is not None])
        except BaseException:
            self._forget(expert_id)
            raise
        self._current = expert_id
        return slot

    def stream(self, expert_ids: Sequence[int], params_only: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields ``(expert_id, record)`` for each id in order, reading up to ``capacity - 1`` of the next ones
        while the caller works on this one: the one loop through the slots that training, evaluation and
        generation share. Each record is a slot view, valid until the next iteration; with ``params_only`` only
        its parameters are read (a pass that runs the experts and updates none)."""
        self._ahead = set(expert_ids)  # not evicted for a prefetch while an expert the stream is done with can be
        ahead = 0  # experts after this one already asked for
        try:
            for position, expert_id in enumerate(expert_ids):
                record = self.load(expert_id, params_only)
                self._ahead.discard(expert_id)
                ahead = max(ahead - 1, 0)
                while ahead < self.capacity - 1 and position + ahead + 1 < len(expert_ids):
                    # the store's worker reads while we compute
                    self.prefetch(expert_ids[position + ahead + 1], params_only)
                    ahead += 1
                yield expert_id, record
        finally:
            self._ahead = set()

    def stream_groups(
        self, groups: Sequence[Sequence[int]], params_only: bool = False
    ) -> Iterator[tuple[Sequence[int], list[int]]]:
        """Yields ``(expert_ids, slots)`` for each group in order, every expert of the group resident at once (their
        slots' indices into :attr:`slots`, valid until the next iteration), reading the next groups' experts into the
        slots the group leaves free while the caller works on it: :meth:`stream` for work done on several experts
        at once (``model.expert_batch``).

        Raises:
            ValueError: a group larger than the cache's capacity.
        """
        if any(len(group) > self.capacity for group in groups):
            raise ValueError(f"an expert group is larger than the cache ({self.capacity} slots)")
        flat = [expert_id for group in groups for expert_id in group]
        self._ahead = set(flat)
        start = 0  # position in flat of the group's first expert
        try:
            for group in groups:
                self._pinned = set(group)  # never evicted while the group is loaded and worked on
                slots = [self._load_slot(expert_id, params_only) for expert_id in group]
                self._ahead.difference_update(group)
                start += len(group)
                for expert_id in flat[start : start + self.capacity - len(group)]:
                    if expert_id not in self._slot_of or (not params_only and expert_id in self._params_only):
                        self.prefetch(expert_id, params_only)
                    if expert_id not in self._slot_of:
                        break  # no slot to spare: the rest are read when their group comes
                yield group, slots
        finally:
            self._ahead, self._pinned = set(), set()

    def prefetch(self, expert_id: int, params_only: bool = False) -> None:
        """Starts reading ``expert_id`` (its parameters alone with ``params_only``) into a slot; a later
        :meth:`load` waits for it.

        A no-op when it is resident already (as much of it as asked for), or when the only evictable slot is the
        most recently loaded one (or one still being prefetched).
        """
        self._check_id(expert_id)
        self._reap_writebacks()
        slot = self._slot_of.get(expert_id)
        if slot is not None:
            if not params_only and expert_id in self._params_only and expert_id not in self._loading:
                self._counters["prefetches"] += 1
                self._start_read(expert_id, slot, "state")
            return
        slot = self._take_slot(may_evict_current=False, may_evict_loading=False)
        if slot is None:
            return
        self._counters["prefetches"] += 1
        self._start_read(expert_id, slot, "params" if params_only else "record")

    def mark_dirty(self, expert_id: int) -> None:
        """Records that the slot of ``expert_id`` was modified: it is written back before it leaves.

        Raises:
            ValueError: ``expert_id`` is not resident.
        """
        if expert_id not in self._slot_of:
            raise ValueError(f"expert {expert_id} is not resident in the cache; load() it before mark_dirty()")
        if expert_id in self._params_only:
            raise ValueError(f"expert {expert_id} was loaded with params_only; load() it whole before mark_dirty()")
        self._dirty.add(expert_id)

    def flush(self) -> None:
        """Writes every dirty resident back and waits; they stay resident, now clean."""
        for expert_id in sorted(self._dirty):
            self._write_back(expert_id, self._slot_of[expert_id])
        self._dirty.clear()
        writebacks, self._writebacks = self._writebacks, []
        Pending.wait_all(writebacks)
        self.store.synchronize()

    def invalidate(self) -> None:
        """Forgets every resident without writing anything back (before or after ``store.restore``).

        The write-backs already queued are awaited first: one that failed is raised here, not dropped with its
        handle (the cache is forgotten either way).

        Raises:
            OSError: (or whatever the store raised) a queued write-back failed.
        """
        writebacks, self._writebacks = self._writebacks, []
        self._slot_of.clear()
        self._params_only.clear()
        self._loading.clear()
        self._dirty.clear()
        self._free_slots = list(range(self.capacity - 1, -1, -1))
        self._current = None
        Pending.wait_all(writebacks)

    def resident_ids(self) -> list[int]:
        """Experts that occupy a slot (prefetches in flight included), ascending."""
        return sorted(self._slot_of)

    def dirty_ids(self) -> list[int]:
        """Resident experts modified since they were loaded or last flushed, ascending."""
        return sorted(self._dirty)

    def stats(self) -> dict[str, float]:
        """Cumulative ``hits``, ``misses``, ``state_loads`` (a resident's optimizer state read after its
        parameters), ``loads``, ``prefetches``, ``evictions``, ``writebacks``, ``bytes_in``, ``bytes_out``, and the
        current ``resident`` and ``dirty`` counts and ``capacity``."""
        stats = {key: float(value) for key, value in self._counters.items()}
        stats.update(resident=float(len(self._slot_of)), dirty=float(len(self._dirty)), capacity=float(self.capacity))
        return stats

    def __repr__(self) -> str:
        return f"ExpertCache(capacity={self.capacity}, device={self.device}, resident={self.resident_ids()})"

    def _take_slot(self, may_evict_current: bool, may_evict_loading: bool) -> int | None:
        """A free slot, else the slot of the least recently used expert that may be evicted, else ``None``.

        Preference: one the running stream is done with; then (``may_evict_loading``) one it still needs, one still
        being read; then (``may_evict_current``) the most recently loaded one. One pass, least recent first."""
        if self._free_slots:
            return self._free_slots.pop()
        first_ahead = first_loading = None
        for expert_id in self._slot_of:
            if expert_id == self._current or expert_id in self._pinned:
                continue
            if expert_id in self._loading:
                first_loading = expert_id if first_loading is None else first_loading
            elif expert_id not in self._ahead:
                return self._evict(expert_id)
            elif first_ahead is None:
                first_ahead = expert_id
        choice = None
        if may_evict_loading:
            choice = first_ahead if first_ahead is not None else first_loading
        if choice is None and may_evict_current and self._current not in self._pinned:
            choice = self._current
        return None if choice is None else self._evict(choice)

    def _evict(self, expert_id: int) -> int:
        slot = self._slot_of.pop(expert_id)
        self._params_only.discard(expert_id)
        # A prefetch still in flight into this slot needs no wait: the store runs operations in issue
        # order, so it lands before the read we are about to queue into the same slot.
        self._loading.pop(expert_id, None)
        if expert_id in self._dirty:
            self._dirty.discard(expert_id)
            self._write_back(expert_id, slot)
        if expert_id == self._current:
            self._current = None
        self._counters["evictions"] += 1
        return slot

    def _write_back(self, expert_id: int, slot: int) -> None:
        # No wait and no staging copy: the caller reuses this slot only through the same store, whose
        # operations run in issue order (one worker thread, one CUDA side stream, or synchronously), so
        # this write has read the slot before any later read overwrites it. A failed write-back raises
        # from the next load(), prefetch() or flush().
        self._writebacks.append(self.store.write_async(expert_id, self.slots[slot]))
        self._counters["writebacks"] += 1
        self._counters["bytes_out"] += self.store.record_bytes

    def _reap_writebacks(self) -> None:
        finished, in_flight = [], []
        for pending in self._writebacks:
            (finished if pending.done() else in_flight).append(pending)
        self._writebacks = in_flight
        Pending.wait_all(finished)  # re-raises a failed write-back

    def _start_read(self, expert_id: int, slot: int, part: RecordPart) -> Pending:
        pending = self.store.read_async(expert_id, self.slots[slot], part)
        self._slot_of[expert_id] = slot
        if part == "params":
            self._params_only.add(expert_id)
        else:
            self._params_only.discard(expert_id)
            self._counters["state_loads"] += part == "state"
        self._loading[expert_id] = pending
        self._counters["bytes_in"] += self.store.part_bytes(part)
        return pending

    def _forget(self, expert_id: int) -> None:
        slot = self._slot_of.pop(expert_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        self._params_only.discard(expert_id)
        self._loading.pop(expert_id, None)
        self._dirty.discard(expert_id)
        if expert_id == self._current:
            self._current = None

    def _check_id(self, expert_id: int) -> None:
        if not 0 <= expert_id < self.store.num_experts:
            raise IndexError(f"expert id {expert_id} out of range [0, {self.store.num_experts})")
