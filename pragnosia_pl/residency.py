"""Where the experts live: the expert store, the device cache in front of it, and the store snapshots that
checkpoints point at (DESIGN §5)."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from pragnosia_pl.distributed import rank, world_size
from pragnosia_pl.expert_cache import ExpertCache
from pragnosia_pl.store import CorruptRecordError, ExpertStore, make_store, remove_stale_live_directories

StoreKind = Literal["device", "host", "disk", "direct"]


class ExpertResidency:
    """The experts of one model: their store, the ``capacity`` device slots that cache it, and its snapshots.

    The store and cache are built on first use (:meth:`cache`), on the device asked for. Each process works on a
    live copy of the store of its own (scratch space, removed when the object is collected); every checkpoint
    gets a snapshot of it (:meth:`save`), and loading a checkpoint restores that snapshot on first use. A snapshot
    is removed with the last checkpoint that names it, by the checkpoint IO
    (:class:`~pragnosia_pl.checkpoint_io.AtomicCheckpointIO`, which ``pragnosia fit`` installs).

    Args:
        kind: ``device`` (all resident, for comparison), ``host`` or ``disk`` (``model.store``).
        num_experts: n.
        record_numel: float32 elements of one expert's record.
        init_record: fills an expert's initial record from its id (lazy materialisation).
        capacity: device slots (``model.expert_cache``).
        store_dir: where the live store and the snapshots go (``model.store_dir``); ``None``: ``default_root()``.
        default_root: the folder to use without ``store_dir`` (the module passes its run's log directory).
        checkpoint_path: the checkpoint being resumed or loaded, if any (a moved run folder's snapshot is looked
            for near it).
        params_numel: elements of a record's parameter part (the store reads it alone for a pass that only runs
            experts); ``None``: the whole record.
        host_tier_bytes: ``disk``/``direct``: host memory for a tier of records in front of the file
            (``model.host_tier_bytes``, :class:`~pragnosia_pl.store.HostTier`); 0: none.

    Raises:
        ValueError: ``store_dir`` cannot be created.

    Example::

        residency = ExpertResidency("disk", 1024, layout.record_numel, layout.init_record, capacity=8,
                                    store_dir="/tmp/experts", default_root=Path.cwd)
        cache = residency.cache(torch.device("cpu"))
        for expert_id, record in cache.stream([3, 5, 9]):
            ...
    """

    def __init__(
        self,
        kind: StoreKind,
        num_experts: int,
        record_numel: int,
        init_record: Callable[[int, torch.Tensor], None],
        capacity: int,
        store_dir: str | None,
        default_root: Callable[[], Path],
        checkpoint_path: Callable[[], str | None] = lambda: None,
        params_numel: int | None = None,
        host_tier_bytes: int = 0,
    ) -> None:
        if store_dir is not None:
            _check_creatable(Path(store_dir))
        self.kind = kind
        self.num_experts = num_experts
        self.record_numel = record_numel
        self.init_record = init_record
        self.capacity = capacity
        self.store_dir = store_dir
        self.default_root = default_root
        self.checkpoint_path = checkpoint_path
        self.params_numel = params_numel
        self.host_tier_bytes = host_tier_bytes
        self._step_start: dict[str, float] = {}  # the store's traffic counters when the current step began
        self.run_id = secrets.token_hex(4)  # the module broadcasts rank 0's at setup
        self._store: ExpertStore | None = None
        self._cache: ExpertCache | None = None
        self._pending_snapshot: str | None = None
        self._tmp_root: tempfile.TemporaryDirectory | None = None

    def cache(self, device: torch.device) -> ExpertCache:
        """The expert cache on ``device`` (built, and restored from a pending checkpoint, on first use)."""
        if self._cache is not None and self._cache.device == device:
            return self._cache
        if self._cache is not None:
            self._cache.flush()
        with torch.inference_mode(False):  # slots built during validation must stay writable in training
            if self._store is None:
                self._store = make_store(
                    self.kind,
                    num_experts=self.num_experts,
                    record_numel=self.record_numel,
                    init_record=self.init_record,
                    device=device,
                    directory=self._live_directory(),
                    params_numel=self.params_numel,
                    host_tier_bytes=self.host_tier_bytes,
                )
            self._cache = ExpertCache(self._store, self.capacity, device)
        if self._pending_snapshot is not None:
            self._restore(self._pending_snapshot)
        return self._cache

    @property
    def store(self) -> ExpertStore | None:
        """The store, once :meth:`cache` built it."""
        return self._store

    def memory_stats(self) -> dict[str, float]:
        """Resident and materialized experts, records (or parts) read from the store and the bytes read and written,
        in all and since the current step began (:meth:`begin_step`), bytes moved by the cache, cache hits; with a
        host tier, its hits and the bytes that came from the disk."""
        if self._cache is None:
            return {}
        cache, store = self._cache.stats(), self._store.stats()
        stats = {
            "resident_experts": float(len(self._cache.resident_ids())),
            "materialized_experts": store["materialized"],
            "store_reads": store["reads"],
            "store_bytes_read": store["bytes_read"],
            "store_bytes_written": store["bytes_written"],
            "bytes_in": cache["bytes_in"],
            "bytes_out": cache["bytes_out"],
            "cache_hits": cache["hits"],
            "cache_misses": cache["misses"],
        }
        if "tier_hits" in store:
            stats.update(tier_hits=store["tier_hits"], disk_bytes_read=store["backing_bytes_read"])
        for key in ("store_reads", "store_bytes_read", "store_bytes_written"):
            stats[f"step_{key}"] = stats[key] - self._step_start.get(key, 0.0)
        return stats

    def begin_step(self) -> None:
        """Marks the start of a training step: the ``step_*`` entries of :meth:`memory_stats` count from here."""
        if self._store is not None:
            store = self._store.stats()
            self._step_start = {
                "store_reads": store["reads"],
                "store_bytes_read": store["bytes_read"],
                "store_bytes_written": store["bytes_written"],
            }

    def flush(self) -> None:
        if self._cache is not None:
            self._cache.flush()

    # ----------------------------------------------------------------------------------------- checkpoints

    def save(self, global_step: int) -> dict[str, Any]:
        """Snapshot the store for a checkpoint (rank 0 writes, every rank calls); returns the checkpoint's entry."""
        self.flush()
        snapshots = self.root() / "snapshots"
        writes = int(self._store.stats()["writes"])  # two saves at one step share a snapshot only if nothing changed
        directory = snapshots / f"{self.run_id}-step-{global_step:09d}-w{writes}"
        if rank() == 0 and not directory.exists():  # replicas are identical: rank 0's stands for all
            self._store.snapshot(directory)
        return {
            "snapshot": str(directory.resolve()),
            "num_experts": self.num_experts,
            "record_numel": self.record_numel,
        }

    def load(self, entry: dict[str, Any] | None) -> None:
        """Restore the snapshot a checkpoint's entry names, now or on first use of the cache."""
        if entry is None:
            raise KeyError("checkpoint has no 'expert_store' entry: it was not written by PragnosiaLM")
        if entry["record_numel"] != self.record_numel or entry["num_experts"] != self.num_experts:
            raise ValueError(
                f"checkpoint experts ({entry['num_experts']} × {entry['record_numel']} floats) do not match the "
                f"model ({self.num_experts} × {self.record_numel}): same model.num_experts, d_model, "
                "expert_hidden and expert_optimizer are needed to resume"
            )
        self._pending_snapshot = entry["snapshot"]
        if self._cache is not None:
            self._restore(self._pending_snapshot)
        rank_zero_info(f"expert store: restoring from {entry['snapshot']}")

    def root(self) -> Path:
        if self.store_dir is not None:
            return Path(self.store_dir)
        root = self.default_root()
        if root is not None:
            return root
        if self._tmp_root is None:
            self._tmp_root = tempfile.TemporaryDirectory(prefix="pragnosia-store-")
        return Path(self._tmp_root.name)

    def _live_directory(self) -> Path:
        """This instance's working copy of the store: scratch space (checkpoints keep snapshots), own per process
        so that a run, a resumed run and `pragnosia generate` on one store_dir never share it; removed when this
        object is garbage-collected or the interpreter exits. Under DDP each rank keeps its own replica."""
        suffix = f"-rank{rank()}" if world_size() > 1 else ""
        for stale in remove_stale_live_directories(self.root()):
            rank_zero_info(f"removed {stale}: scratch space of a run that did not exit (checkpoints keep snapshots)")
        live = self.root() / f"live-{self.run_id}{suffix}"
        weakref.finalize(self, shutil.rmtree, live, ignore_errors=True)
        return live

    def _find_snapshot(self, snapshot: str) -> Path:
        """The checkpoint's store snapshot: where it was written, else a folder of the same name in this model's
        store directory or near the checkpoint file (a run folder that was moved or copied elsewhere)."""
        recorded = Path(snapshot)
        candidates = [recorded, self.root() / "snapshots" / recorded.name]
        checkpoint_file = self.checkpoint_path()
        if checkpoint_file is not None and Path(checkpoint_file).exists():
            for folder in list(Path(checkpoint_file).resolve().parents)[:3]:
                nested = sorted(folder.glob(f"*/snapshots/{recorded.name}"))
                candidates += [folder / "snapshots" / recorded.name, *nested]
        for candidate in candidates:
            if candidate.is_dir():
                if candidate != recorded:
                    rank_zero_info(f"expert store: snapshot {recorded} not found; using {candidate}")
                return candidate
        raise FileNotFoundError(
            f"the checkpoint's expert-store snapshot {snapshot} is missing (also looked for {recorded.name} in "
            "model.store_dir and next to the checkpoint file): the checkpoint holds only the shared parameters; "
            "keep its store_dir"
        )

    def _restore(self, snapshot: str) -> None:
        snapshot = str(self._find_snapshot(snapshot))
        self._cache.invalidate()
        try:
            self._store.restore(snapshot)
        except CorruptRecordError as error:
            raise CorruptRecordError(
                f"{error}; this checkpoint's expert store is damaged: resume from an earlier checkpoint",
                expert_id=error.expert_id,
                path=error.path,
            ) from error
        self._pending_snapshot = None


def _check_creatable(directory: Path) -> None:
    """Raise ``ValueError`` naming ``model.store_dir`` unless ``directory`` exists or can be made (what this makes
    to find out, it removes: a run that fails later leaves nothing behind)."""
    blocking = next((folder for folder in [directory, *directory.parents] if folder.is_file()), None)
    if blocking is not None:
        what = "is a file" if blocking == directory else f"lies under a file ({blocking})"
        raise ValueError(f"model.store_dir ({directory}) {what}, not a folder: give a folder for the expert store")
    missing = [folder for folder in [directory, *directory.parents] if not folder.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"model.store_dir ({directory}) cannot be created: {error.strerror}") from None
    finally:
        for folder in missing:  # deepest first
            if folder.is_dir():
                folder.rmdir()


def snapshot_named_by(checkpoint: dict[str, Any]) -> str | None:
    """The store snapshot a checkpoint's ``expert_store`` entry names (:meth:`ExpertResidency.save`), if any."""
    entry = checkpoint.get("expert_store")
    return entry.get("snapshot") if isinstance(entry, dict) else None
