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

from pathlib import Path

import torch

from pragnosia_pl.store.base import (
    RECORD_PARTS,
    STORE_KINDS,
    CorruptRecordError,
    ExpertStore,
    Pending,
    RecordInit,
    RecordPart,
)
from pragnosia_pl.store.disk import DiskStore
from pragnosia_pl.store.files import fsync_dir, remove_stale_live_directories
from pragnosia_pl.store.memory import DeviceStore, HostStore
from pragnosia_pl.store.tier import HostTier

__all__ = [
    "STORE_KINDS",
    "CorruptRecordError",
    "DeviceStore",
    "DiskStore",
    "ExpertStore",
    "HostStore",
    "HostTier",
    "Pending",
    "RECORD_PARTS",
    "RecordInit",
    "RecordPart",
    "fsync_dir",
    "make_store",
    "remove_stale_live_directories",
]


def make_store(
    kind: str,
    *,
    num_experts: int,
    record_numel: int,
    init_record: RecordInit,
    device: torch.device | str = "cpu",
    directory: str | Path | None = None,
    params_numel: int | None = None,
    host_tier_bytes: int = 0,
) -> ExpertStore:
    """Builds the store named by ``model.store``.

    Args:
        kind: ``"device"``, ``"host"``, ``"disk"`` or ``"direct"`` (the disk store with ``O_DIRECT``).
        num_experts: number of experts.
        record_numel: float32 elements per record.
        init_record: fills an expert's initial record.
        device: the compute device; the device store lives there, the host store is pinned when it is CUDA.
        directory: where the disk store puts its record file (``experts.bin``).
        params_numel: elements of a record's leading part, its parameters (read alone by a pass that only runs the
            experts); ``None``: the whole record.
        host_tier_bytes: ``disk`` and ``direct``: a :class:`HostTier` of this many bytes in front of the file
            (``model.host_tier_bytes``); 0: none.

    Raises:
        ValueError: unknown ``kind``, a disk store without a ``directory``, or a host tier for another kind.
    """
    device = torch.device(device)
    if host_tier_bytes and kind not in ("disk", "direct"):
        raise ValueError(
            f"model.host_tier_bytes ({host_tier_bytes}) needs model.store disk or direct, not {kind!r}: "
            "the host and device stores hold every record in memory already"
        )
    if kind == "device":
        return DeviceStore(num_experts, record_numel, init_record, device=device, params_numel=params_numel)
    if kind == "host":
        return HostStore(
            num_experts, record_numel, init_record, pin_memory=device.type == "cuda", params_numel=params_numel
        )
    if kind in ("disk", "direct"):
        if directory is None:
            raise ValueError(f"model.store_dir must be set when model.store is {kind!r}")
        store = DiskStore(
            Path(directory) / "experts.bin",
            num_experts,
            record_numel,
            init_record,
            direct=kind == "direct",
            params_numel=params_numel,
        )
        if not host_tier_bytes:
            return store
        try:
            return HostTier(store, host_tier_bytes)
        except BaseException:
            store.close()
            raise
    raise ValueError(f"model.store ({kind!r}) must be one of: {', '.join(STORE_KINDS)}")
