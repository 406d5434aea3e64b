"""``PragnosiaLM``: the Mixture-of-Experts LM whose experts live in an expert store, as a LightningModule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from pragnosia_pl.consolidation import Consolidation
from pragnosia_pl.distributed import expert_group, sum_across_ranks, world_size
from pragnosia_pl.expert_cache import ExpertCache
from pragnosia_pl.expert_rule import ExpertRule, Objective, ThroughExperts
from pragnosia_pl.experts import ExpertLayout, feed_forward_expert, make_expert_optimizer
from pragnosia_pl.lm_base import LanguageModel, check_positive, compute_dtype, router_stream, seeded
from pragnosia_pl.model import Placement
from pragnosia_pl.residency import ExpertResidency, StoreKind
from pragnosia_pl.router import ExpertGroups, Router
from pragnosia_pl.schedules import schedule_factor
from pragnosia_pl.store import STORE_KINDS, ExpertStore

MAX_NONFINITE = 20  # consecutive steps with a skipped (NaN/inf) update before training stops


class NonFiniteLossError(RuntimeError):
    """Training stopped: :data:`MAX_NONFINITE` consecutive steps had a non-finite loss or gradient."""


class PragnosiaLM(LanguageModel):
    """Mixture-of-Experts LM whose experts live in an expert store and pass through a few device slots.

    Each training step routes every token to its top-k experts and visits each touched expert once per pass,
    in id order, with all of its tokens (DESIGN §3): the expert is loaded into one of ``expert_cache`` device
    slots, updated with its own optimizer state, and written back to the store when it leaves the cache. The
    shared parts (embedding, trunk, router, head) take one AdamW step on the LM loss. Device memory is therefore
    O(``expert_cache``) experts, whatever ``num_experts`` is. Two objectives share the step:

    - ``local`` (the seed's rule): each expert learns from its own loss through the detached head on its own
      tokens; the LM loss sees its output detached. One store read per touched expert per step.
    - ``exact``: each expert steps on the LM loss's gradient for it and the trunk also gets the gradient through
      the experts' inputs: global backpropagation through the MoE, one expert at a time, equal to ``GlobalMoE``
      with the same ``seed`` (``expert_optimizer: adam``, ``local_lr = lr``; other settings warn that the update
      is not GlobalMoE's). Two store reads per touched expert: its parameters for the first pass, the rest of its
      record (all of it, if it left the cache) for the second.

    A step whose loss or gradient is NaN/inf skips that update (an expert's record is not written, the shared
    parameters keep their values); after :data:`MAX_NONFINITE` consecutive such steps training stops.

    Args:
        d_model: width d.
        n_shared_layers: causal trunk blocks.
        n_heads: attention heads.
        num_experts: n, experts in the store.
        num_active_experts: k, experts per token.
        objective: ``local`` (each expert learns from its own loss on its own tokens; one store read per touched
            expert per step) or ``exact`` (every update equals GlobalMoE's global backpropagation; two reads).
        expert_slots: optional cap S on the distinct experts of a training step (k ≤ S ≤ n): the S with the most
            router mass over the batch, each token its top-k inside them. ``None``: each token its top-k of all n.
            Evaluation and generation never cap (each token its own top-k: causal).
        expert_cache: C, device slots; the touched experts stream through them.
        micro_batch: sequences per trunk pass: the trunk's activations are kept (and recomputed in the backward
            pass) for this many sequences at a time, so a large batch trains in the trunk memory of a small one.
            ``None``: the whole batch in one pass.
        expert_hidden: hidden width of the default FFN expert; default 4·d.
        store: where experts live off the device: ``device`` (all resident, for comparison), ``host``, ``disk``
            (a file read through the page cache) or ``direct`` (the same file read and written with ``O_DIRECT``,
            bypassing the page cache: for stores larger than RAM).
        store_dir: disk-store and snapshot location; default ``<log_dir>/expert_store``. Each checkpoint names a
            snapshot of the store; a snapshot is removed with the last checkpoint that names it
            (:class:`~pragnosia_pl.checkpoint_io.AtomicCheckpointIO`, which ``pragnosia fit`` installs).
        expert_optimizer: ``sgd`` or ``adam`` (betas (0.9, 0.95), the shared AdamW's); its state lives in the
            expert's record. Untouched experts are not stepped and their state does not decay (lazy).
        local_lr: learning rate of the expert optimizer; a learning-rate schedule scales it each step by the shared
            optimizer's factor.
        lr: learning rate of the shared AdamW (no weight decay).
        balance_coef: α of the load-balancing term.
        router: ``product`` (product keys, memory flat in n) or ``flat`` (one logit per expert).
        grad_clip: max norm of the shared gradient, clipped by its own norm, and (``exact``) of each expert's
            (0 disables).
        seed: the backbone and router come from ``seed`` and expert e from ``(seed, e)``, as in the baselines.
        experts_per_domain: m, for continual learning (:mod:`~pragnosia_pl.consolidation`): each training domain
            trains m experts of its own, which no later domain touches, and keeps a copy of the shared parts as they
            were at its end; evaluation averages the domains' models by their posterior given the prefix. Domain
            switches come from ``on_domain_switch`` (``callbacks.DomainSwitcher`` calls it). ``None``: one set of
            experts and shared parts for all data.
        host_tier_bytes: ``disk``/``direct``: host memory (bytes) for the most recently written records between the
            file and the device slots, written to the file when evicted and before every snapshot (a store larger
            than RAM then reads its hot experts from memory); 0: none.
        expert_layers: where the expert layers sit: ``top`` (one after the last block), ``every_other`` (in place of
            the feed-forward of blocks 1, 3, 5, …) or ``every`` (of every block). Each has its own router and n
            experts; one store holds them all (expert e of layer l is record l·n + e).
        vocab_size: V, token ids; ``pragnosia fit`` links it to ``data.vocab_size`` (256: bytes).
        expert_batch: ``exact``: experts computed together on each pass, g ≤ ``expert_cache``: their tokens padded
            to the group's largest count and run through one batched matrix product per layer, their updates in one
            optimizer call; for fine-grained experts (many small experts of a few tokens each), whose time goes to
            the per-expert calls. 1: one expert at a time (the update is the same up to float rounding).

    Raises:
        ValueError: on an inconsistent configuration; the message names the YAML key.
        NonFiniteLossError: (in training) :data:`MAX_NONFINITE` consecutive steps skipped an update.

    Example::

        model = PragnosiaLM(d_model=64, num_experts=1024, num_active_experts=2, objective="exact",
                            expert_optimizer="adam", local_lr=1e-3, store="disk")
        trainer = Trainer(max_steps=100)
        trainer.fit(model, datamodule=TextDomains())
    """

    def __init__(
        self,
        d_model: int = 128,
        n_shared_layers: int = 2,
        n_heads: int = 4,
        num_experts: int = 32,
        num_active_experts: int = 2,
        objective: Objective = "local",
        expert_slots: int | None = None,
        expert_cache: int = 8,
        micro_batch: int | None = None,
        expert_hidden: int | None = None,
        store: StoreKind = "host",
        store_dir: str | None = None,
        expert_optimizer: Literal["sgd", "adam"] = "sgd",
        local_lr: float = 0.01,
        lr: float = 1e-3,
        balance_coef: float = 0.01,
        router: Literal["product", "flat"] = "product",
        grad_clip: float = 1.0,
        seed: int = 0,
        experts_per_domain: int | None = None,
        host_tier_bytes: int = 0,
        expert_layers: Placement = "top",
        vocab_size: int = 256,
        expert_batch: int = 1,
    ) -> None:
        super().__init__(d_model, n_shared_layers, n_heads, lr, seed, grad_clip, expert_layers, vocab_size)
        self.save_hyperparameters()
        self.expert_slots = expert_slots
        self.expert_hidden = 4 * d_model if expert_hidden is None else expert_hidden
        check_positive(
            num_experts=num_experts,
            num_active_experts=num_active_experts,
            expert_cache=expert_cache,
            expert_hidden=self.expert_hidden,
            local_lr=local_lr,
        )
        if num_active_experts > num_experts:
            raise ValueError(
                f"model.num_active_experts ({num_active_experts}) must be ≤ model.num_experts ({num_experts})"
            )
        if expert_slots is not None and not num_active_experts <= expert_slots <= num_experts:
            raise ValueError(
                f"model.expert_slots ({expert_slots}) must be between model.num_active_experts ({num_active_experts})"
                f" and model.num_experts ({num_experts}), or null (no cap)"
            )
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"model.micro_batch ({micro_batch}) must be ≥ 1 or null (the whole batch)")
        if store not in STORE_KINDS:
            raise ValueError(f"model.store ({store!r}) must be one of: {', '.join(STORE_KINDS)}")
        if experts_per_domain is not None and len(self.placement.after) > 1:
            raise ValueError(
                f"model.experts_per_domain works with model.expert_layers: top only (got {expert_layers!r})"
            )
        if objective == "exact" and (expert_optimizer != "adam" or local_lr != lr):
            rank_zero_warn(
                f"model.objective exact with model.expert_optimizer {expert_optimizer} and model.local_lr {local_lr} "
                f"(model.lr {lr}): the experts step by their own rule, so the update is not GlobalMoE's; it is with "
                "expert_optimizer: adam and local_lr equal to lr"
            )
        if host_tier_bytes < 0 or (host_tier_bytes and store not in ("disk", "direct")):
            raise ValueError(
                f"model.host_tier_bytes ({host_tier_bytes}) must be 0 (none), or > 0 with model.store disk or direct"
            )
        self.automatic_optimization = False
        self.routers = nn.ModuleList()
        for layer in range(len(self.placement.after)):
            with seeded(seed, router_stream(layer)):
                self.routers.append(Router(d_model, num_experts, num_active_experts, router=router))
        self.consolidation = (
            None if experts_per_domain is None else Consolidation(experts_per_domain, num_experts, num_active_experts)
        )
        self.layout = ExpertLayout(self.build_expert, make_expert_optimizer(expert_optimizer, local_lr), seed)
        self.rule = ExpertRule(objective, self.layout, self.layout.optimizer, grad_clip, self.local_loss)
        _check_expert_batch(expert_batch, expert_cache, objective, self.layout.grouped)
        self.residency = ExpertResidency(
            store,
            num_experts * len(self.routers),  # one store: expert e of layer l is record l·n + e
            self.layout.record_numel,
            self.layout.init_record,
            capacity=expert_cache,
            store_dir=store_dir,
            default_root=self._log_root,
            checkpoint_path=lambda: self.checkpoint_file,
            params_numel=self.layout.num_params,
            host_tier_bytes=host_tier_bytes,
        )
        self.checkpoint_file: str | None = None  # set by `pragnosia generate`, else the trainer's ckpt_path
        self.usage: Counter[int] = Counter()  # steps each expert was touched in, since the run began
        self._epoch_usage: Counter[int] = Counter()
        self.skipped_expert_updates = 0  # non-finite local losses or gradients, since the run began
        self.skipped_shared_updates = 0
        self._nonfinite_streak = 0  # consecutive steps with a skipped update

    def build_expert(self) -> nn.Module:
        """A freshly initialised expert ``(N, d) -> (N, d)``; override for another expert architecture."""
        return feed_forward_expert(self.hparams.d_model, self.expert_hidden)

    def local_loss(self, h_e: torch.Tensor, expert_out: torch.Tensor, targets_e: torch.Tensor) -> torch.Tensor:
        """The ``local`` objective: ``CE(head(norm(h_e + o_e)), y_e)`` through the detached head, on the expert's
        tokens ``h_e`` (N_e, d): a gradient for the expert alone. Override for another local objective."""
        return F.cross_entropy(self.backbone.detached_logits(h_e + expert_out), targets_e)

    def experts(self) -> ExpertCache:
        """The expert cache on this module's device (built, and restored from a checkpoint, on first use)."""
        return self.residency.cache(self.device)

    @property
    def store(self) -> ExpertStore:
        """The expert store (built on first use)."""
        self.experts()
        return self.residency.store

    def memory_stats(self) -> dict[str, float]:
        """Flat counters for ``MemoryMonitor``: resident and materialized experts, ``store_reads``,
        ``expert_updates``, bytes moved, cache hits."""
        stats = self.residency.memory_stats()
        return {**stats, "expert_updates": float(self.rule.updates)} if stats else stats

    def learning_rates(self) -> dict[str, float]:
        """Learning rates of the optimizers Lightning does not step, for ``callbacks.LearningRates``: ``experts``,
        the rate the per-expert optimizer applies at the next update."""
        return {"experts": float(self.layout.optimizer.lr)}

    def parameters_in_store(self) -> dict[str, int]:
        """Expert parameters in the store, which ``self.parameters()`` does not hold, for
        ``callbacks.StoreModelSummary``: ``total`` (all n experts) and ``active`` (the k experts of one token)."""
        num_params = self.layout.num_params
        return {"total": self.hparams.num_experts * num_params, "active": self.hparams.num_active_experts * num_params}

    # ----------------------------------------------------------------------------------------------- training

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch  # (B, T), (B, T)
        cache, optimizer = self.experts(), self.optimizers()
        self._follow_schedule(optimizer)  # the experts' learning rate takes the shared one's schedule factor
        step = _Step.new(cache, targets.flatten(), compute_dtype(tokens.device), self._grad_scale())

        # 1-2. block by block; at each expert layer: route its tokens, then expert pass 1 (local: the updates)
        x = self.backbone.embed_tokens(tokens)  # (B, T, d)
        for layer, (start, stop) in enumerate(self.segments[:-1]):
            x = self._expert_layer(layer, self._blocks(x, start, stop), step)
        x = self._blocks(x, *self.segments[-1])

        # 3. shared loss: the mixtures' gradients reach the routers through the gates, no expert through o_e
        lm_loss = F.cross_entropy(self.backbone.logits(x.flatten(0, 1)), step.targets)
        balance_loss = torch.stack(step.balance_losses).mean()
        loss = lm_loss + self.hparams.balance_coef * balance_loss

        # 4-5. backward: head, routers, each exact expert layer's pass 2 (last layer first), blocks; shared update
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        shared_updated = self._shared_update_is_finite(loss)
        if not shared_updated:
            # Still step: Lightning counts optimizer steps as global steps (one per batch), and AdamW leaves every
            # parameter without a gradient, and its state, untouched.
            optimizer.zero_grad(set_to_none=True)
        else:
            self.clip_shared_gradients()
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # manual optimization: Lightning steps no scheduler; once per training step
        self._count_skipped_updates(shared_updated)

        self.usage.update(step.touched)
        self._epoch_usage.update(step.touched)
        self.log("train/loss", lm_loss, prog_bar=True, sync_dist=True)
        if step.local_losses:
            self.log("train/local_loss", torch.stack(step.local_losses).mean())
        self.log("train/balance_loss", balance_loss.detach())
        self.log("train/touched_experts", float(len(step.touched)))
        return loss.detach()

    def _follow_schedule(self, optimizer: Any) -> None:
        factor = schedule_factor(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
        self.layout.optimizer.lr = self.hparams.local_lr * factor

    def _grad_scale(self) -> float:
        """The loss scale of a ``GradScaler`` (``16-mixed``), by which ``exact``'s expert gradients come scaled."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``[start, stop)`` over ``micro_batch`` sequences at a time, each recomputed in the backward pass,
        so only one micro-batch's activations are ever held."""
        micro_batch = self.hparams.micro_batch
        if start == stop:
            return x
        if micro_batch is None or micro_batch >= x.size(0) or not torch.is_grad_enabled():
            return self.backbone.run_blocks(x, start, stop)  # (B, T, d)
        run = partial(self.backbone.run_blocks, start=start, stop=stop)
        return torch.cat([checkpoint(run, part, use_reentrant=False) for part in x.split(micro_batch)])

    def _expert_layer(self, layer: int, x: torch.Tensor, step: _Step) -> torch.Tensor:
        """``x + Σ_e g_e · o_e`` (B, T, d) for expert layer ``layer``: its tokens routed, its touched experts visited
        once in id order (pass 1); ``exact`` hands its pass 2 to the backward pass."""
        B, T, d = x.shape
        h = x.flatten(0, 1)  # (N, d)
        groups, balance_loss = self._route(layer, h)
        h_in = h.detach()  # the experts never see the blocks' graph
        # exact: the first pass keeps what each expert's forward saved for the second, unless micro_batch asks to
        # bound the activations, which then run the expert's forward again (the whole batch's trunk graph, kept
        # without micro_batch, is about twice the experts' saved activations)
        kept = [] if self.rule.objective == "exact" and self.hparams.micro_batch is None else None
        expert_out = self._first_pass(layer, step, groups, h_in, kept)  # (N·k, d)
        mixture = torch.zeros_like(h_in).index_add(0, groups.token_idx, groups.gates[:, None] * expert_out)  # (N, d)
        z = h + mixture  # (N, d)
        if self.rule.objective == "exact":  # pass 2, inside the backward: each expert's update, its input gradient
            # the node holds pass 2 until the backward; nothing it holds may lead back into the graph (the step's
            # balance losses do, from the second expert layer on): a cycle through autograd's C++ edges, which
            # Python's collector cannot see, would keep every step's graph alive
            slim = step._replace(balance_losses=[], local_losses=[], touched=[])
            z = z + ThroughExperts.apply(h, partial(self._second_pass, layer, slim, groups, h_in, kept))
        step.balance_losses.append(balance_loss)
        step.touched.extend(self._global_ids(layer, groups.expert_ids))
        return z.view(B, T, d)

    def _global_ids(self, layer: int, expert_ids: list[int]) -> list[int]:
        """Expert layer ``layer``'s experts as ids in the one store: ``layer · n + e``."""
        offset = layer * self.hparams.num_experts
        return [offset + e for e in expert_ids] if offset else expert_ids

    def _route(self, layer: int, h: torch.Tensor) -> tuple[ExpertGroups, torch.Tensor]:
        router = self.routers[layer]
        candidates = None  # (m,) with consolidation: the open domain's experts
        if self.consolidation is not None:
            candidates = self.consolidation.training_candidates(h, router, reduce=sum_across_ranks)
        routing = router(  # every rank: the same experts (the union of theirs), the same order
            h, self.expert_slots, mass_hook=sum_across_ranks if world_size() > 1 else None, candidates=candidates
        )
        return routing.groups(), routing.balance_loss

    def _first_pass(
        self, layer: int, step: _Step, groups: ExpertGroups, h_in: torch.Tensor, kept: list | None
    ) -> torch.Tensor:
        """Every touched expert's output at its tokens, in ``groups``' row order (N·k, d), detached; ``exact``:
        what each forward saved, into ``kept`` (when given); ``local``: each expert's update on its local loss."""
        if self.hparams.expert_batch > 1:
            return self._first_pass_grouped(layer, step, groups, h_in, kept)
        expert_out = h_in.new_empty(groups.token_idx.numel(), h_in.size(1))  # (N·k, d)
        inputs = _PairRows(h_in, groups, gather_once=self.hparams.micro_batch is None)  # each expert's (N_e, d)
        target_pairs = step.targets[groups.token_idx] if self.rule.objective == "local" else None  # (N·k,)
        # exact runs the experts here and updates them in the second pass: their parameters are all it reads now
        params_only = self.rule.objective == "exact"
        stream = step.cache.stream(self._global_ids(layer, groups.expert_ids), params_only=params_only)
        for position, (expert_id, record) in enumerate(stream):
            rows = groups.rows(position)
            params = self.layout.split(record)[0]
            if kept is not None:
                expert_out[rows], saved = self.layout.forward_saving(params, inputs[rows], step.dtype)
                kept.append(saved)
            elif self.rule.objective == "exact":
                with torch.no_grad():
                    expert_out[rows] = self.layout.forward(params, inputs[rows], step.dtype)
            else:
                out, local_loss, updated = self.rule.local_step(record, inputs[rows], target_pairs[rows], step.dtype)
                expert_out[rows] = out
                step.local_losses.append(local_loss)
                self._after_update(step.cache, expert_id, updated)
        return expert_out

    def _second_pass(
        self,
        layer: int,
        step: _Step,
        groups: ExpertGroups,
        h_in: torch.Tensor,
        kept: list | None,
        grad_z: torch.Tensor,
    ) -> torch.Tensor:
        """``exact``: each touched expert of ``layer`` steps on the LM loss's gradient for it; returns the blocks'
        gradient through the experts, ``Σ_e J_e(h)ᵀ (g_e · dL/dz)`` (N, d). Visits the experts in descending id
        order, so the ones the first pass left in the cache are hits."""
        if self.hparams.expert_batch > 1:
            return self._second_pass_grouped(layer, step, groups, h_in, kept, grad_z)
        grad_h = torch.zeros_like(h_in)  # (N, d)
        grad_outs = _PairRows(grad_z, groups, self.hparams.micro_batch is None, gates=groups.gates.detach())
        order = list(reversed(range(len(groups.expert_ids))))
        expert_ids = self._global_ids(layer, groups.expert_ids)[::-1]
        for position, (expert_id, record) in zip(order, step.cache.stream(expert_ids)):
            rows = groups.rows(position)
            if kept is not None:
                saved = kept[position]
                kept[position] = None  # spent: freed as this layer's backward goes
            else:  # micro_batch: the expert's forward again, now
                params = self.layout.split(record)[0]
                saved = self.layout.forward_saving(params, h_in[groups.token_idx[rows]], step.dtype)[1]
            grad_in, updated = self.rule.exact_step(record, grad_outs[rows], saved, step.grad_scale)
            grad_h.index_add_(0, groups.token_idx[rows], grad_in.to(grad_h.dtype))
            self._after_update(step.cache, expert_id, updated)
        return grad_h

    def _expert_groups(self, layer: int, groups: ExpertGroups) -> tuple[list[list[int]], list[list[int]]]:
        """The touched experts ``expert_batch`` at a time, by their token counts (fewest first, ties by id), so a
        group's experts pad to about the same M: their positions in ``groups`` and their store ids."""
        offsets, g = groups.offsets, self.hparams.expert_batch
        order = sorted(range(len(groups.expert_ids)), key=lambda p: (offsets[p + 1] - offsets[p], p))
        chunks = [order[a : a + g] for a in range(0, len(order), g)]
        ids = self._global_ids(layer, groups.expert_ids)
        return chunks, [[ids[p] for p in chunk] for chunk in chunks]

    def _first_pass_grouped(
        self, layer: int, step: _Step, groups: ExpertGroups, h_in: torch.Tensor, kept: list | None
    ) -> torch.Tensor:
        """``exact``'s first pass, ``expert_batch`` experts at a time: each group's parameters gathered (g, P), its
        tokens padded (g, M, d), one batched forward; what it saved into ``kept``, group by group."""
        expert_out = h_in.new_empty(groups.token_idx.numel(), h_in.size(1))  # (N·k, d)
        chunks, id_groups = self._expert_groups(layer, groups)
        P, slots = self.layout.num_params, step.cache.slots
        for chunk, (_, group_slots) in zip(chunks, step.cache.stream_groups(id_groups, params_only=True)):
            padding = _Padding(groups, chunk, h_in.device)
            params = slots[torch.tensor(group_slots, device=slots.device), :P]  # (g, P): a copy
            x = padding.pack(h_in[groups.token_idx[padding.src]])  # (g, M, d)
            out, saved = self.layout.grouped_forward_saving(params, x, step.dtype)  # (g, M, d)
            expert_out.index_copy_(0, padding.src, padding.unpack(out).to(expert_out.dtype))
            if kept is not None:
                kept.append(saved)
        return expert_out

    def _second_pass_grouped(
        self,
        layer: int,
        step: _Step,
        groups: ExpertGroups,
        h_in: torch.Tensor,
        kept: list | None,
        grad_z: torch.Tensor,
    ) -> torch.Tensor:
        """``exact``'s second pass, the first pass's groups in reverse order (its last ones are still in the cache):
        each group's backward in one batched call, each expert clipped and stepped on its own gradient."""
        grad_h = torch.zeros_like(h_in)  # (N, d)
        gates = groups.gates.detach()
        chunks, id_groups = self._expert_groups(layer, groups)
        P, slots = self.layout.num_params, step.cache.slots
        stream = step.cache.stream_groups(id_groups[::-1])
        for index, (ids, group_slots) in zip(reversed(range(len(chunks))), stream):
            padding = _Padding(groups, chunks[index], h_in.device)
            token_idx = groups.token_idx[padding.src]  # (pairs,)
            params = slots[torch.tensor(group_slots, device=slots.device), :P]  # (g, P): a copy, pre-step
            if kept is not None:
                saved, kept[index] = kept[index], None  # spent: freed as this layer's backward goes
            else:  # micro_batch: the group's forward again, now
                saved = self.layout.grouped_forward_saving(params, padding.pack(h_in[token_idx]), step.dtype)[1]
            grad_out = padding.pack(gates[padding.src, None] * grad_z[token_idx])  # (g, M, d)
            records = [slots[slot] for slot in group_slots]
            grad_in, updated = self.rule.exact_group_step(records, params, grad_out, saved, step.grad_scale)
            grad_h.index_add_(0, token_idx, padding.unpack(grad_in).to(grad_h.dtype))
            for expert_id, expert_updated in zip(ids, updated, strict=True):
                self._after_update(step.cache, expert_id, expert_updated)
        return grad_h

    def _after_update(self, cache: ExpertCache, expert_id: int, updated: bool) -> None:
        if updated:
            cache.mark_dirty(expert_id)
        else:
            self.rule.skipped.append(expert_id)  # its slot still equals its record: no write-back

    def on_domain_switch(self, previous: str, new: str) -> None:
        """The training domain changed (``callbacks.DomainSwitcher`` calls this): with ``experts_per_domain`` the
        closing domain's experts become protected and it keeps its copy of the shared parameters."""
        if self.consolidation is not None and self.consolidation.switch(
            self.global_step, self.parameters(), previous, new
        ):
            rank_zero_info(
                f"consolidation: domain {new!r} from step {self.global_step}, "
                f"{self.consolidation.protected.numel()} experts protected"
            )

    def _shared_update_is_finite(self, loss: torch.Tensor) -> bool:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return True  # a GradScaler skips non-finite steps itself (and needs their gradients to adjust its scale)
        finite = torch.isfinite(loss.detach())
        grads = [p.grad for p in self.shared_parameters() if p.grad is not None]
        if grads:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        # ranks differ in their loss: skip on all of them if any sees a non-finite one (replicas stay identical)
        return not bool(sum_across_ranks((~finite).float().reshape(1)))

    def _count_skipped_updates(self, shared_updated: bool) -> None:
        skipped_experts, self.rule.skipped = self.rule.skipped, []
        self.skipped_expert_updates += len(skipped_experts)
        self.skipped_shared_updates += not shared_updated
        self.log("train/skipped_expert_updates", float(self.skipped_expert_updates))
        self.log("train/skipped_shared_updates", float(self.skipped_shared_updates))
        if not skipped_experts and shared_updated:
            self._nonfinite_streak = 0
            return
        self._nonfinite_streak += 1
        if self._nonfinite_streak >= MAX_NONFINITE:
            what = [f"the updates of experts {skipped_experts}"] if skipped_experts else []
            what += [] if shared_updated else ["the shared update"]
            raise NonFiniteLossError(
                f"training stopped at step {self.global_step}: {self._nonfinite_streak} consecutive steps had a "
                f"NaN/inf loss or gradient; the last one skipped {' and '.join(what)}. Lower model.lr or "
                "model.local_lr, or check the data"
            )

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.residency.begin_step()

    @override
    def on_train_epoch_end(self) -> None:
        counts = torch.tensor(list(self.usage.values()), dtype=torch.float64)
        if counts.numel():
            p = counts / counts.sum()
            # the same on every rank (one set of experts for all); sync_dist only tells Lightning so
            self.log("train/expert_entropy", -(p * p.log()).sum().float(), sync_dist=True)
            self.log("train/experts_used", float(counts.numel()), sync_dist=True)
        experiment = getattr(self.logger, "experiment", None)
        if self._epoch_usage and hasattr(experiment, "add_histogram"):
            ids, uses = zip(*sorted(self._epoch_usage.items()))
            selections = torch.repeat_interleave(torch.tensor(ids), torch.tensor(uses))  # each expert id per use
            experiment.add_histogram("experts/usage", selections, self.global_step)
        self._epoch_usage.clear()

    # --------------------------------------------------------------------------------------------- evaluation

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for ``tokens`` (B, T), streaming the routed experts through the device slots.

        With ``experts_per_domain`` every known domain's model (its experts, its shared parameters) predicts, and
        the result is the average of their predictions weighted by each domain's posterior given the prefix
        (log-probabilities).
        """
        domains = [] if self.consolidation is None else self.consolidation.eval_domains()
        if not domains:
            return self._logits(tokens)  # (B, T, V)
        log_probs = []
        for domain in domains:
            with self._shared_weights(domain.shared):
                log_probs.append(F.log_softmax(self._logits(tokens, domain.experts).float(), dim=-1))
        return self.consolidation.mix(log_probs, tokens)  # (B, T, V)

    @override
    def next_token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits (V,) of the token after ``tokens`` (1, T), for generation. With one expert layer on top of the
        blocks: the blocks over every position, the experts at the last one only (a token's experts see only its own
        ``h``), so a generated token reads k experts, not those of every position. Expert layers inside the blocks
        feed later blocks' attention at every position, and ``experts_per_domain``'s posterior needs every position:
        the full forward."""
        top_only = len(self.routers) == 1 and self.segments[-1][0] == self.segments[-1][1]
        if not top_only or (self.consolidation is not None and self.consolidation.eval_domains()):
            return self(tokens)[0, -1]  # (V,)
        h = self.backbone.trunk(tokens)[:, -1]  # (1, d)
        return self.backbone.logits(h + self._expert_mixture(0, h))[0]  # (V,)

    def _logits(self, tokens: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V): block by block, each expert layer a mixture of each token's own top-k experts (among
        ``candidates``), so no token's experts depend on later tokens."""
        x = self.backbone.embed_tokens(tokens)  # (B, T, d)
        for layer, (start, stop) in enumerate(self.segments[:-1]):
            x = self.backbone.run_blocks(x, start, stop)
            h = x.flatten(0, 1)  # (N, d)
            x = (h + self._expert_mixture(layer, h, candidates)).view_as(x)
        return self.backbone.logits(self.backbone.run_blocks(x, *self.segments[-1]))  # (B, T, V)

    def _expert_mixture(self, layer: int, h: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_e g_e · expert_e(h)`` (N, d) of expert layer ``layer``; its touched experts stream through the device
        slots in id order."""
        groups = self.routers[layer](h, candidates=candidates).groups()
        dtype = compute_dtype(h.device)
        expert_out = h.new_empty(groups.token_idx.numel(), h.size(1))  # (N·k, d)
        stream = self.experts().stream(self._global_ids(layer, groups.expert_ids), params_only=True)  # no update
        for position, (_, record) in enumerate(stream):
            rows = groups.rows(position)
            expert_out[rows] = self.layout.forward(self.layout.split(record)[0], h[groups.token_idx[rows]], dtype)
        return torch.zeros_like(h).index_add(0, groups.token_idx, groups.gates[:, None] * expert_out)  # (N, d)

    @contextmanager
    def _shared_weights(self, snapshot: list[torch.Tensor] | None) -> Iterator[None]:
        """Run with a domain's copy of the shared parameters in place of the live ones (``None``: the live ones)."""
        if snapshot is None:
            yield
            return
        params = list(self.parameters())
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, saved in zip(params, snapshot):
                param.copy_(saved)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(params, live):
                    param.copy_(saved)

    # ------------------------------------------------------------------------------------- checkpoints, setup

    @override
    def setup(self, stage: str) -> None:
        # One run id on every rank: rank r's live replica and rank 0's snapshots are named after it.
        self.residency.run_id = self.trainer.strategy.broadcast(self.residency.run_id)
        if self.rule.group is None:
            self.rule.group = expert_group()

    def _log_root(self) -> Path | None:
        """``<log_dir>/expert_store`` of the run, the default home of the store and its snapshots."""
        if self._trainer is None:
            return None
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "expert_store"

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.experts()
        checkpoint["expert_store"] = self.residency.save(self.global_step)
        if self.consolidation is not None:
            checkpoint["consolidation"] = self.consolidation.state_dict()
        checkpoint["skipped_updates"] = {
            "experts": self.skipped_expert_updates,
            "shared": self.skipped_shared_updates,
            "streak": self._nonfinite_streak,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        skipped = checkpoint.get("skipped_updates", {})
        self.skipped_expert_updates = skipped.get("experts", 0)
        self.skipped_shared_updates = skipped.get("shared", 0)
        self._nonfinite_streak = skipped.get("streak", 0)
        if self.consolidation is not None:
            self.consolidation.load_state_dict(checkpoint["consolidation"])
        if self.checkpoint_file is None and self._trainer is not None:
            self.checkpoint_file = self.trainer.ckpt_path
        self.residency.load(checkpoint.get("expert_store"))  # the store snapshot, restored now or on first use

    @override
    def teardown(self, stage: str) -> None:
        self.residency.flush()


def _check_expert_batch(expert_batch: int, expert_cache: int, objective: str, grouped: bool) -> None:
    if isinstance(expert_batch, bool) or not isinstance(expert_batch, int) or not 1 <= expert_batch <= expert_cache:
        raise ValueError(
            f"model.expert_batch ({expert_batch!r}) must be an integer from 1 to model.expert_cache ({expert_cache}): "
            "a group of experts is on the device at once"
        )
    if expert_batch > 1 and objective != "exact":
        raise ValueError(
            f"model.expert_batch ({expert_batch}) > 1 works with model.objective exact only: local steps each expert "
            "on a loss of its own; set expert_batch: 1"
        )
    if expert_batch > 1 and not grouped:
        raise ValueError(
            f"model.expert_batch ({expert_batch}) > 1 needs an expert class with grouped_forward_saving and "
            "grouped_backward (the default FeedForward has them); set expert_batch: 1"
        )


class _Padding:
    """The (token, expert) pairs of the experts at ``positions`` of ``groups``, laid out (g, M, ·): each expert's rows
    padded with zero rows to M, the group's largest count (at least 1). ``src``: the group's pairs as rows of
    ``groups`` (pairs,), expert by expert; ``dest``: where each lands in the (g·M) padded rows."""

    def __init__(self, groups: ExpertGroups, positions: list[int], device: torch.device) -> None:
        offsets = groups.offsets
        counts = torch.tensor([offsets[p + 1] - offsets[p] for p in positions])  # (g,)
        self.g, self.M, pairs = len(positions), max(int(counts.max()), 1), int(counts.sum())
        expert = torch.repeat_interleave(torch.arange(self.g), counts, output_size=pairs)  # (pairs,) 0..g-1
        within = torch.arange(pairs) - (counts.cumsum(0) - counts)[expert]  # a pair's place among its expert's
        starts = torch.tensor([offsets[p] for p in positions])
        self.src = (starts[expert] + within).to(device)  # (pairs,)
        self.dest = (expert * self.M + within).to(device)  # (pairs,)

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (pairs, d) -> (g, M, d), zero on the padding."""
        padded = rows.new_zeros(self.g * self.M, rows.size(-1))
        return padded.index_copy_(0, self.dest, rows).view(self.g, self.M, -1)

    def unpack(self, padded: torch.Tensor) -> torch.Tensor:
        """(g, M, d) -> the group's rows (pairs, d), the padding dropped."""
        return padded.reshape(self.g * self.M, -1).index_select(0, self.dest)


class _Step(NamedTuple):
    """What a training step's expert layers share and gather, layer after layer."""

    cache: ExpertCache
    targets: torch.Tensor  # (N,)
    dtype: torch.dtype | None  # the experts' compute dtype under mixed precision (None: their own, float32)
    grad_scale: float  # 16-mixed: the GradScaler's loss scale, which exact's expert gradients carry
    balance_losses: list[torch.Tensor]
    local_losses: list[torch.Tensor]
    touched: list[int]  # store ids of the experts the step touched, layer by layer

    @classmethod
    def new(cls, cache: ExpertCache, targets: torch.Tensor, dtype: torch.dtype | None, grad_scale: float) -> _Step:
        return cls(cache, targets, dtype, grad_scale, [], [], [])


class _PairRows:
    """``source``'s rows for each (token, expert) pair of ``groups`` (times the pair's gate, when given), by an
    expert's ``rows``: gathered once for the whole step when ``gather_once`` (one (N·k, d) tensor, an expert's rows a
    view of it: 41 index calls fewer per pass at n = 64), else per expert, when ``micro_batch`` bounds activations
    (at 256 × 128 bytes and k = 2 the whole gather holds 32 MiB)."""

    def __init__(
        self, source: torch.Tensor, groups: ExpertGroups, gather_once: bool, gates: torch.Tensor | None = None
    ) -> None:
        self.source, self.groups, self.gates = source, groups, gates
        self.gathered = self._gather(slice(None)) if gather_once else None  # (N·k, d)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.gathered[rows] if self.gathered is not None else self._gather(rows)  # (N_e, d)

    def _gather(self, rows: slice) -> torch.Tensor:
        pairs = self.source[self.groups.token_idx[rows]]
        return pairs if self.gates is None else self.gates[rows, None] * pairs
