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

from pragnosia_pl.store.base import STORE_KINDS, CorruptRecordError, ExpertStore, Pending, RecordInit
from pragnosia_pl.store.disk import DiskStore
from pragnosia_pl.store.files import fsync_dir, remove_stale_live_directories
from pragnosia_pl.store.memory import DeviceStore, HostStore

__all__ = [
    "STORE_KINDS",
    "CorruptRecordError",
    "DeviceStore",
    "DiskStore",
    "ExpertStore",
    "HostStore",
    "Pending",
    "RecordInit",
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
) -> ExpertStore:
    """Builds the store named by ``model.store``.

    Args:
        kind: ``"device"``, ``"host"``, ``"disk"`` or ``"direct"`` (the disk store with ``O_DIRECT``).
        num_experts: number of experts.
        record_numel: float32 elements per record.
        init_record: fills an expert's initial record.
        device: the compute device; the device store lives there, the host store is pinned when it is CUDA.
        directory: where the disk store puts its record file (``experts.bin``).

    Raises:
        ValueError: unknown ``kind``, or a disk store without a ``directory``.
    """
    device = torch.device(device)
    if kind == "device":
        return DeviceStore(num_experts, record_numel, init_record, device=device)
    if kind == "host":
        return HostStore(num_experts, record_numel, init_record, pin_memory=device.type == "cuda")
    if kind in ("disk", "direct"):
        if directory is None:
            raise ValueError(f"model.store_dir must be set when model.store is {kind!r}")
        return DiskStore(
            Path(directory) / "experts.bin", num_experts, record_numel, init_record, direct=kind == "direct"
        )
    raise ValueError(f"model.store ({kind!r}) must be one of: {', '.join(STORE_KINDS)}")
