"""The expert store and cache of a LightningModule: built on first use, snapshotted with every checkpoint."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from pragnosia_pl.distributed import world_size
from pragnosia_pl.expert_cache import ExpertCache
from pragnosia_pl.store import CorruptRecordError, ExpertStore, make_store, remove_stale_live_directories


class ExpertStorage:
    """Mixin for a LightningModule whose experts live in an :class:`~pragnosia_pl.store.ExpertStore`.

    It owns the store (``model.store``, ``store_dir``, ``keep_snapshots``), the device cache in front of it
    (``expert_cache_size`` slots), the per-process live copy of the store, and the store snapshot that every
    checkpoint points at (written in ``on_save_checkpoint``, restored on first use after ``on_load_checkpoint``).
    The module sets ``layout`` (an :class:`~pragnosia_pl.experts.ExpertLayout`) and ``expert_cache_size``, and
    calls :meth:`_init_storage` in its ``__init__``.

    Example::

        class MyExperts(ExpertStorage, LanguageModel):
            def __init__(self, ...):
                ...
                self._init_storage()

        record = model.experts().load(3)  # (R,) slot of expert 3
    """

    def _init_storage(self) -> None:
        self._store: ExpertStore | None = None
        self._cache: ExpertCache | None = None
        self._pending_snapshot: str | None = None
        self._run_id = secrets.token_hex(4)
        self._tmp_store_dir: tempfile.TemporaryDirectory | None = None
        self.checkpoint_file: str | None = None  # set by `pragnosia generate`: where to look for a moved snapshot

    @override
    def setup(self, stage: str) -> None:
        # One run id on every rank: rank r's live replica and rank 0's snapshots are named after it.
        self._run_id = self.trainer.strategy.broadcast(self._run_id)

    def experts(self) -> ExpertCache:
        """The expert cache on this module's device (built, and restored from a checkpoint, on first use)."""
        if self._cache is not None and self._cache.device == self.device:
            return self._cache
        if self._cache is not None:
            self._cache.flush()
        with torch.inference_mode(False):  # slots built during validation must stay writable in training
            if self._store is None:
                self._store = make_store(
                    self.hparams.store,
                    num_experts=self.hparams.num_experts,
                    record_numel=self.layout.record_numel,
                    init_record=self.layout.init_record,
                    device=self.device,
                    directory=self._live_directory(),
                )
            self._cache = ExpertCache(self._store, self.expert_cache_size, self.device)
        if self._pending_snapshot is not None:
            self._restore(self._pending_snapshot)
        return self._cache

    @property
    def store(self) -> ExpertStore:
        self.experts()
        return self._store

    def _live_directory(self) -> Path:
        """This instance's working copy of the store: scratch space (checkpoints keep snapshots), own per process
        so that a run, a resumed run and `pragnosia generate` on one store_dir never share it; removed when the
        module is garbage-collected or the interpreter exits. Under DDP each rank keeps its own replica."""
        rank = f"-rank{self.global_rank}" if world_size() > 1 else ""
        for stale in remove_stale_live_directories(self._store_root()):
            rank_zero_info(f"removed {stale}: scratch space of a run that did not exit (checkpoints keep snapshots)")
        live = self._store_root() / f"live-{self._run_id}{rank}"
        weakref.finalize(self, shutil.rmtree, live, ignore_errors=True)
        return live

    def _store_root(self) -> Path:
        if self.hparams.store_dir is not None:
            return Path(self.hparams.store_dir)
        if self._trainer is not None:
            return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "expert_store"
        if self._tmp_store_dir is None:
            self._tmp_store_dir = tempfile.TemporaryDirectory(prefix="pragnosia-store-")
        return Path(self._tmp_store_dir.name)

    def _find_snapshot(self, snapshot: str) -> Path:
        """The checkpoint's store snapshot: where it was written, else a folder of the same name in this model's
        store directory or near the checkpoint file (a run folder that was moved or copied elsewhere)."""
        recorded = Path(snapshot)
        candidates = [recorded, self._store_root() / "snapshots" / recorded.name]
        checkpoint_file = self.checkpoint_file or (self._trainer.ckpt_path if self._trainer is not None else None)
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
            "keep its store_dir (or raise model.keep_snapshots)"
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

    def memory_stats(self) -> dict[str, float]:
        """Flat counters for ``MemoryMonitor``: resident and materialized experts, bytes moved, cache hits."""
        if self._cache is None:
            return {}
        cache = self._cache.stats()
        return {
            "resident_experts": float(len(self._cache.resident_ids())),
            "materialized_experts": float(len(self._store.materialized_ids())),
            "bytes_in": float(cache["bytes_in"]),
            "bytes_out": float(cache["bytes_out"]),
            "cache_hits": float(cache["hits"]),
            "cache_misses": float(cache["misses"]),
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        cache = self.experts()
        cache.flush()
        snapshots = self._store_root() / "snapshots"  # on every rank: trainer.log_dir is a collective
        writes = int(self._store.stats()["writes"])  # two saves at one step share a snapshot only if nothing changed
        directory = snapshots / f"{self._run_id}-step-{self.global_step:09d}-w{writes}"
        if self.global_rank == 0:
            # Prune before this snapshot, sparing the newest `keep` others: the checkpoint file that points at the
            # newest of them stays resumable until this checkpoint is safely on disk (a crash or full disk may stop
            # us before that). on_fit_end prunes down to `keep`.
            self._prune_snapshots(snapshots, spare=directory)
            if not directory.exists():  # replicas are identical: rank 0's stands for all
                self._store.snapshot(directory)
        checkpoint["expert_store"] = {
            "snapshot": str(directory.resolve()),
            "num_experts": self.hparams.num_experts,
            "record_numel": self.layout.record_numel,
        }

    @override
    def on_fit_end(self) -> None:
        if self.hparams.keep_snapshots is None:
            return
        snapshots = self._store_root() / "snapshots"  # on every rank: trainer.log_dir is a collective
        if self.global_rank == 0:
            self._prune_snapshots(snapshots)

    def _prune_snapshots(self, snapshots: Path, spare: Path | None = None) -> None:
        """Removes this run's snapshots but the newest ``keep_snapshots`` (and ``spare``); none with ``None``."""
        keep = self.hparams.keep_snapshots
        if keep is None:
            return
        ours = sorted(p for p in snapshots.glob(f"{self._run_id}-step-*") if p != spare)
        for old in ours[:-keep]:
            _remove_tree(old)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("expert_store")
        if info is None:
            raise KeyError("checkpoint has no 'expert_store' entry: it was not written by PragnosiaLM")
        if info["record_numel"] != self.layout.record_numel or info["num_experts"] != self.hparams.num_experts:
            raise ValueError(
                f"checkpoint experts ({info['num_experts']} × {info['record_numel']} floats) do not match the model "
                f"({self.hparams.num_experts} × {self.layout.record_numel}): same model.num_experts, d_model, "
                "expert_hidden and expert_optimizer are needed to resume"
            )
        self._pending_snapshot = info["snapshot"]
        if self._cache is not None:
            self._restore(self._pending_snapshot)
        rank_zero_info(f"expert store: restoring from {info['snapshot']}")

    @override
    def teardown(self, stage: str) -> None:
        if self._cache is not None:
            self._cache.flush()


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
