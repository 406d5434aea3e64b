"""``PragnosiaLM``: the local-learning Mixture-of-Experts language model as a LightningModule."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from pragnosia_pl.expert_cache import ExpertCache
from pragnosia_pl.experts import ExpertLayout, make_expert_optimizer
from pragnosia_pl.lm_base import LanguageModel, check_positive
from pragnosia_pl.model import FeedForward, init_weights
from pragnosia_pl.router import Router
from pragnosia_pl.store import ExpertStore, make_store

STORES = ("device", "host", "disk")


class PragnosiaLM(LanguageModel):
    """Mixture-of-Experts LM whose experts learn from local losses and live in an expert store.

    Each training step routes the batch to a working set of ``expert_slots`` experts; each is loaded into a
    device slot, trained on its own local loss (on the detached trunk output, through the detached head)
    with its own optimizer state, and written back to the store when it leaves the cache. The shared parts
    (embedding, trunk, router, head) take one AdamW step on the model's real LM loss. Device memory is
    therefore O(``expert_cache``), not O(``num_experts``).

    Args:
        vocab_size: token ids (256: bytes).
        d_model: width d.
        n_shared_layers: causal trunk blocks.
        n_heads: attention heads.
        num_experts: n, experts in the store.
        num_active_experts: k, experts per token.
        expert_slots: S, distinct experts per training step (k ≤ S ≤ n); default k.
        expert_cache: device slots (≥ S); default S.
        eval_expert_slots: working set for evaluation and generation (k ≤ · ≤ n); default S, as in training.
        expert_hidden: hidden width of the default FFN expert; default 4·d.
        store: where experts live off the device: ``device`` (all resident, for comparison), ``host`` or ``disk``.
        store_dir: disk-store and snapshot location; default ``<log_dir>/expert_store``.
        keep_snapshots: store snapshots (one per checkpoint) to keep; ``None`` keeps all.
        expert_optimizer: ``sgd`` or ``adam``; its state lives in the expert's record.
        local_lr: learning rate of the expert optimizers.
        local_momentum: SGD momentum of the expert optimizers.
        lr: learning rate of the shared AdamW.
        weight_decay: shared AdamW weight decay (matrices only).
        balance_coef: α of the load-balancing term.
        gate: ``router`` (softmax over the chosen experts' logits) or ``uniform`` (1/k).
        router: ``product`` (product keys, memory flat in n) or ``flat`` (one logit per expert).
        grad_clip: max norm of the shared gradient (0 disables).
        max_len: longest sequence the rotary table covers.
        seed: expert e is initialised from ``(seed, e)``.

    Raises:
        ValueError: on an inconsistent configuration; the message names the YAML key.

    Example::

        model = PragnosiaLM(d_model=64, num_experts=1024, num_active_experts=2, store="disk")
        trainer = Trainer(max_steps=100)
        trainer.fit(model, datamodule=TextDomains())
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_shared_layers: int = 2,
        n_heads: int = 4,
        num_experts: int = 32,
        num_active_experts: int = 2,
        expert_slots: int | None = None,
        expert_cache: int | None = None,
        eval_expert_slots: int | None = None,
        expert_hidden: int | None = None,
        store: str = "host",
        store_dir: str | None = None,
        keep_snapshots: int | None = None,
        expert_optimizer: str = "sgd",
        local_lr: float = 0.01,
        local_momentum: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        balance_coef: float = 0.01,
        gate: str = "router",
        router: str = "product",
        grad_clip: float = 1.0,
        max_len: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(vocab_size, d_model, n_shared_layers, n_heads, lr, weight_decay, max_len)
        self.save_hyperparameters()
        self.expert_slots = num_active_experts if expert_slots is None else expert_slots
        self.expert_cache_size = self.expert_slots if expert_cache is None else expert_cache
        self.eval_expert_slots = self.expert_slots if eval_expert_slots is None else eval_expert_slots
        self.expert_hidden = 4 * d_model if expert_hidden is None else expert_hidden
        check_positive(
            num_experts=num_experts,
            num_active_experts=num_active_experts,
            expert_slots=self.expert_slots,
            expert_cache=self.expert_cache_size,
            eval_expert_slots=self.eval_expert_slots,
            expert_hidden=self.expert_hidden,
            local_lr=local_lr,
        )
        if num_active_experts > self.expert_slots:
            raise ValueError(
                f"model.num_active_experts ({num_active_experts}) must be ≤ model.expert_slots ({self.expert_slots})"
            )
        if self.expert_slots > num_experts:
            raise ValueError(f"model.expert_slots ({self.expert_slots}) must be ≤ model.num_experts ({num_experts})")
        if self.expert_cache_size < self.expert_slots:
            raise ValueError(
                f"model.expert_cache ({self.expert_cache_size}) must be ≥ model.expert_slots ({self.expert_slots})"
            )
        if not num_active_experts <= self.eval_expert_slots <= num_experts:
            raise ValueError(
                f"model.eval_expert_slots ({self.eval_expert_slots}) must be between model.num_active_experts "
                f"({num_active_experts}) and model.num_experts ({num_experts})"
            )
        if store not in STORES:
            raise ValueError(f"model.store ({store!r}) must be one of: {', '.join(STORES)}")
        if keep_snapshots is not None and keep_snapshots < 1:
            raise ValueError(f"model.keep_snapshots ({keep_snapshots}) must be ≥ 1 or null (keep all)")
        self.automatic_optimization = False
        self.router = Router(d_model, num_experts, num_active_experts, gate=gate, router=router)
        self.expert_optimizer = make_expert_optimizer(expert_optimizer, local_lr, local_momentum)
        self.layout = ExpertLayout(self.build_expert, self.expert_optimizer, seed)
        self.usage: Counter[int] = Counter()
        self._store: ExpertStore | None = None
        self._cache: ExpertCache | None = None
        self._pending_snapshot: str | None = None
        self._run_id = secrets.token_hex(4)
        self._tmp_store_dir: tempfile.TemporaryDirectory | None = None
        self._epoch_selections: list[int] = []

    def build_expert(self) -> nn.Module:
        """A freshly initialised expert ``(N, d) -> (N, d)``; override for another expert architecture."""
        expert = FeedForward(self.hparams.d_model, self.expert_hidden)
        expert.apply(init_weights)
        return expert

    # ----------------------------------------------------------------------------------------------- training

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch  # (B, T), (B, T)
        cache = self.experts()
        optimizer = self.optimizers()

        h = self.backbone.trunk(tokens).flatten(0, 1)  # (N, d)
        targets = targets.flatten()  # (N,)
        routing = self.router(h, self.expert_slots)
        working_set = routing.working_set.tolist()

        h_in = h.detach()  # experts never see the trunk's graph
        mixture = torch.zeros_like(h_in)  # (N, d) Σ_e g_e · o_e
        local_losses = []
        for position, expert_id in enumerate(working_set):
            token_idx, gate = routing.tokens_of(position)  # (N_e,), (N_e,)
            record = cache.load(expert_id)
            if position + 1 < len(working_set):
                cache.prefetch(working_set[position + 1])
            expert_out, local_loss = self.local_step(record, h_in[token_idx], targets[token_idx])
            cache.mark_dirty(expert_id)
            mixture = mixture.index_add(0, token_idx, gate[:, None] * expert_out)  # gates carry the router's grad
            local_losses.append(local_loss)

        lm_loss = F.cross_entropy(self.backbone.logits(h + mixture), targets)
        loss = lm_loss + self.hparams.balance_coef * routing.balance_loss
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()

        self.usage.update(working_set)
        self._epoch_selections.extend(working_set)
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/local_loss", torch.stack(local_losses).mean())
        self.log("train/balance_loss", routing.balance_loss.detach())
        return loss.detach()

    def local_step(
        self, record: torch.Tensor, h_e: torch.Tensor, targets_e: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train the expert held in ``record`` (R,) on its tokens ``h_e`` (N_e, d) with its local loss.

        Returns the expert's output before the update (N_e, d) and the local loss, both detached.
        """
        params, state, step = self.layout.split(record)
        leaf = _alias(params).requires_grad_(True)  # the slot's memory, the graph's own version counter
        with torch.enable_grad():
            expert_out = self.layout.forward(leaf, h_e)  # (N_e, d)
            local_loss = self.local_loss(h_e, expert_out, targets_e)
            (grad,) = torch.autograd.grad(local_loss, leaf)
        self.expert_optimizer.step(params, grad, state, step)
        return expert_out.detach(), local_loss.detach()

    def local_loss(self, h_e: torch.Tensor, expert_out: torch.Tensor, targets_e: torch.Tensor) -> torch.Tensor:
        """``CE(head(norm(h_e + o_e)), y_e)`` through the detached head: a gradient for the expert alone."""
        return F.cross_entropy(self.backbone.detached_logits(h_e + expert_out), targets_e)

    @override
    def on_train_epoch_end(self) -> None:
        counts = torch.tensor(list(self.usage.values()), dtype=torch.float64)
        if counts.numel():
            p = counts / counts.sum()
            self.log("train/expert_entropy", -(p * p.log()).sum().float())
            self.log("train/experts_used", float(counts.numel()))
        experiment = getattr(self.logger, "experiment", None)
        if self._epoch_selections and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("experts/usage", torch.tensor(self._epoch_selections), self.global_step)
        self._epoch_selections.clear()

    # --------------------------------------------------------------------------------------------- evaluation

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for ``tokens`` (B, T), streaming the routed experts through the device slots."""
        cache = self.experts()
        B, T = tokens.shape
        h = self.backbone.trunk(tokens).flatten(0, 1)  # (N, d)
        routing = self.router(h, self.eval_expert_slots)
        working_set = routing.working_set.tolist()
        mixture = torch.zeros_like(h)  # (N, d)
        for position, expert_id in enumerate(working_set):
            token_idx, gate = routing.tokens_of(position)
            if token_idx.numel() == 0:
                continue
            params = self.layout.split(cache.load(expert_id))[0]
            if position + 1 < len(working_set):
                cache.prefetch(working_set[position + 1])
            mixture = mixture.index_add(0, token_idx, gate[:, None] * self.layout.forward(params, h[token_idx]))
        return self.backbone.logits(h + mixture).view(B, T, -1)  # (B, T, V)

    # ------------------------------------------------------------------------------------------ store & cache

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
        module is garbage-collected or the interpreter exits."""
        live = self._store_root() / f"live-{self._run_id}"
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

    def _restore(self, snapshot: str) -> None:
        if not Path(snapshot).is_dir():
            raise FileNotFoundError(
                f"the checkpoint's expert-store snapshot {snapshot} is missing: the checkpoint holds only the shared "
                "parameters; keep its store_dir (or raise model.keep_snapshots)"
            )
        self._cache.invalidate()
        self._store.restore(snapshot)
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
        snapshots = self._store_root() / "snapshots"
        writes = int(self._store.stats()["writes"])  # two saves at one step share a snapshot only if nothing changed
        directory = snapshots / f"{self._run_id}-step-{self.global_step:09d}-w{writes}"
        if not directory.exists():
            self._store.snapshot(directory)
        checkpoint["expert_store"] = {
            "snapshot": str(directory.resolve()),
            "num_experts": self.hparams.num_experts,
            "record_numel": self.layout.record_numel,
        }
        keep = self.hparams.keep_snapshots
        if keep is not None:
            ours = sorted(snapshots.glob(f"{self._run_id}-step-*"))
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


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor on ``tensor``'s memory with a version counter of its own.

    Views of one slot buffer share a version counter, so an asynchronous load into another slot during this
    expert's backward would look like an in-place edit of its saved tensors; an alias keeps them apart.
    """
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
