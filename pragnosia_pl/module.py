"""``PragnosiaLM``: the local-learning Mixture-of-Experts language model as a LightningModule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from pragnosia_pl.consolidation import Consolidation, ConsolidationConfig
from pragnosia_pl.distributed import sum_across_ranks, world_size
from pragnosia_pl.expert_storage import ExpertStorage
from pragnosia_pl.experts import ExpertLayout, make_expert_optimizer
from pragnosia_pl.lm_base import LanguageModel, check_positive
from pragnosia_pl.local_learning import LocalLearning, LocalOutcome, Readout, RoutedExpert, ThroughExperts
from pragnosia_pl.model import FeedForward, init_weights
from pragnosia_pl.router import Router

STORES = ("device", "host", "disk")
READOUTS = ("own", "mixture")
WEIGHTINGS = ("expert", "batch")


class NonFiniteLossError(RuntimeError):
    """Training stopped: ``model.max_nonfinite`` consecutive steps had a non-finite loss or gradient."""


class PragnosiaLM(LocalLearning, ExpertStorage, LanguageModel):
    """Mixture-of-Experts LM whose experts learn from local losses and live in an expert store.

    Each training step routes the batch to a working set of ``expert_slots`` experts; each is loaded into a
    device slot, trained on its own local loss (on the detached trunk output, through the detached head)
    with its own optimizer state, and written back to the store when it leaves the cache. The shared parts
    (embedding, trunk, router, head) take one AdamW step on the model's real LM loss. Device memory is
    therefore O(``expert_cache``), not O(``num_experts``). A working set larger than the cache streams through
    it, one expert after another, so ``expert_slots = n`` (plain per-token top-k routing) also trains in the
    memory of ``expert_cache`` experts.

    Args:
        vocab_size: token ids (256: bytes).
        d_model: width d.
        n_shared_layers: causal trunk blocks.
        n_heads: attention heads.
        num_experts: n, experts in the store.
        num_active_experts: k, experts per token.
        expert_slots: S, distinct experts per training step (k ≤ S ≤ n); default k. ``S = n`` (or ``"all"``, which
            follows ``num_experts``): each token uses its own top-k of all experts (the working set is every expert
            some token chose).
        expert_cache: C, device slots (1 ≤ C); default S. With C < S the working set streams through the slots.
        eval_expert_slots: working set for evaluation and generation (k ≤ · ≤ n); default S, as in training.
        expert_hidden: hidden width of the default FFN expert; default 4·d.
        store: where experts live off the device: ``device`` (all resident, for comparison), ``host`` or ``disk``.
        store_dir: disk-store and snapshot location; default ``<log_dir>/expert_store``.
        keep_snapshots: store snapshots (one per checkpoint) to keep, plus the previous one while a checkpoint is
            being written (so a crash never leaves the last checkpoint without its experts); ``None`` keeps all.
        expert_optimizer: ``sgd`` or ``adam``; its state lives in the expert's record.
        local_lr: learning rate of the expert optimizers.
        local_momentum: SGD momentum of the expert optimizers.
        local_betas: Adam betas of the expert optimizers (the shared AdamW uses (0.9, 0.95)).
        lr: learning rate of the shared AdamW.
        weight_decay: shared AdamW weight decay (matrices only).
        balance_coef: α of the load-balancing term.
        gate: ``router`` (softmax over the chosen experts' logits) or ``uniform`` (1/k).
        router: ``product`` (product keys, memory flat in n) or ``flat`` (one logit per expert).
        grad_clip: max norm of the shared gradient (0 disables).
        max_len: longest sequence the rotary table covers.
        seed: expert e is initialised from ``(seed, e)``.
        consolidation: what the model keeps when the training domain changes
            (:class:`~pragnosia_pl.consolidation.ConsolidationConfig`: protected experts per domain, a per-domain
            copy or a slowed/frozen lr of the shared parts, novelty detection); default: nothing, DESIGN §3's step.
        max_nonfinite: a step whose local or shared loss or gradient is NaN/inf skips that update (the expert's
            record is not written, the shared parameters keep their values); after this many consecutive such
            steps training stops with :class:`NonFiniteLossError`. ``None``: never stop.
        backprop_through_experts: the shared loss also reaches the trunk through each working-set expert's input
            (the expert's parameters held at their pre-step values, so still no gradient reaches an expert), at
            the cost of one more forward per expert and a copy of its parameters. With a working set larger than the
            cache (C < S) the copies would make memory grow with S, so instead each expert is loaded again during
            the backward pass, its input gradient taken, and only then its local step (the same result in O(C)
            memory; under DDP the local steps come first and the Jacobian is the post-step one). Off: DESIGN §2's
            detached ``o_e``. With
            ``expert_optimizer=adam`` and a working set larger than k it closes most of the gap to
            ``GlobalMoE`` (``scripts/results/quality``).
        local_readout: what an expert's local loss reads: ``own`` (``h + o_e``, DESIGN §3) or ``mixture``
            (``h + Σ_j g_j·o_j`` with the other experts' outputs detached, its own as ``g_e·o_e``: the gradient the
            shared loss would give the expert, from its own loss; costs a first, forward-only pass over the working
            set).
        local_weighting: how an expert's step weighs its tokens: ``expert`` (its loss is the mean over its own
            tokens, DESIGN §3: a step on 3 tokens is as large as one on 300) or ``batch`` (that mean's gradient
            times the expert's share of the batch's tokens, N_e/N: each token weighs what it weighs in the shared
            loss; with ``local_readout: mixture`` the expert's gradient is then exactly the shared loss's). Only
            matters to SGD as a smaller step; to Adam it is the relative weight of steps.

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
        expert_slots: int | Literal["all"] | None = None,
        expert_cache: int | None = None,
        eval_expert_slots: int | None = None,
        expert_hidden: int | None = None,
        store: str = "host",
        store_dir: str | None = None,
        keep_snapshots: int | None = None,
        expert_optimizer: str = "sgd",
        local_lr: float = 0.01,
        local_momentum: float = 0.0,
        local_betas: tuple[float, float] = (0.9, 0.999),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        balance_coef: float = 0.01,
        gate: str = "router",
        router: str = "product",
        grad_clip: float = 1.0,
        max_len: int = 1024,
        seed: int = 0,
        consolidation: ConsolidationConfig | dict[str, Any] | None = None,
        max_nonfinite: int | None = 20,
        backprop_through_experts: bool = False,
        local_readout: str = "own",
        local_weighting: str = "expert",
    ) -> None:
        super().__init__(vocab_size, d_model, n_shared_layers, n_heads, lr, weight_decay, max_len)
        self.save_hyperparameters()
        if expert_slots == "all":
            expert_slots = num_experts
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
        if not num_active_experts <= self.eval_expert_slots <= num_experts:
            raise ValueError(
                f"model.eval_expert_slots ({self.eval_expert_slots}) must be between model.num_active_experts "
                f"({num_active_experts}) and model.num_experts ({num_experts})"
            )
        if local_readout not in READOUTS:
            raise ValueError(f"model.local_readout ({local_readout!r}) must be one of: {', '.join(READOUTS)}")
        if local_weighting not in WEIGHTINGS:
            raise ValueError(f"model.local_weighting ({local_weighting!r}) must be one of: {', '.join(WEIGHTINGS)}")
        if store not in STORES:
            raise ValueError(f"model.store ({store!r}) must be one of: {', '.join(STORES)}")
        if keep_snapshots is not None and keep_snapshots < 1:
            raise ValueError(f"model.keep_snapshots ({keep_snapshots}) must be ≥ 1 or null (keep all)")
        if max_nonfinite is not None and max_nonfinite < 1:
            raise ValueError(f"model.max_nonfinite ({max_nonfinite}) must be ≥ 1 or null (never stop)")
        self.automatic_optimization = False
        self.router = Router(d_model, num_experts, num_active_experts, gate=gate, router=router)
        self.consolidation = Consolidation(
            ConsolidationConfig.of(consolidation), num_experts, num_active_experts, self.expert_slots
        )
        self.hparams["consolidation"] = asdict(self.consolidation.config)  # plain types: weights-only checkpoints
        self.expert_optimizer = make_expert_optimizer(expert_optimizer, local_lr, local_momentum, tuple(local_betas))
        self.layout = ExpertLayout(self.build_expert, self.expert_optimizer, seed)
        self.usage: Counter[int] = Counter()
        self._init_storage()
        self._epoch_selections: list[int] = []
        self.skipped_expert_updates = 0  # non-finite local losses or gradients, since the run began
        self.skipped_shared_updates = 0
        self._nonfinite_streak = 0  # consecutive steps with a skipped update

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
        if self.consolidation.enabled:
            self._observe_domain(h, targets)
        candidates = self.consolidation.training_candidates(h, self.router, reduce=sum_across_ranks)  # (m,) | None
        routing = self.router(  # every rank: the same working set
            h, self.expert_slots, mass_hook=sum_across_ranks, candidates=candidates
        )
        working_set = routing.working_set.tolist()

        h_in = h.detach()  # experts never see the trunk's graph
        mixture = torch.zeros_like(h_in)  # (N, d) Σ_e g_e · o_e
        through_experts = self.hparams.backprop_through_experts
        # A working set larger than the cache has no room for each expert's pre-step copy in the graph: the trunk's
        # gradient through the experts is then taken in the backward pass, reloading them one at a time, and in one
        # process their local steps wait for it (exact); under DDP they do not (post-step Jacobian).
        streamed = through_experts and len(working_set) > cache.capacity
        deferred = streamed and world_size() == 1
        placed = [routing.tokens_of(position) for position in range(len(working_set))]  # (N_e,), (N_e,) each
        outputs = None  # every expert's pre-step output, when a first pass computed them
        if self.hparams.local_readout == "mixture":
            context, outputs = self._detached_mixture(h_in, working_set, placed)  # (N, d), [(N_e, d)]
        experts: list[RoutedExpert] = []
        outcome = LocalOutcome()
        for position, (expert_id, (token_idx, gate)) in enumerate(zip(working_set, placed)):
            record = cache.load(expert_id)
            if position + 1 < len(working_set):
                cache.prefetch(working_set[position + 1])
            readout = None if outputs is None else Readout(context[token_idx], gate.detach())
            routed = RoutedExpert(expert_id, token_idx, gate.detach(), readout)
            experts.append(routed)
            if deferred and outputs is not None:
                expert_out = outputs[position]
            elif deferred:
                with torch.no_grad():
                    expert_out = self.layout.forward(self.layout.split(record)[0], h_in[token_idx])  # (N_e, d)
            else:
                pre_step = self.layout.split(record)[0].clone() if through_experts and not streamed else None
                expert_out = self._train_expert(record, routed, h_in, targets, outcome)
                if pre_step is not None:  # same values; a graph into the trunk, none into the expert
                    expert_out = self.layout.forward(pre_step, h[token_idx])  # (N_e, d)
            mixture = mixture.index_add(0, token_idx, gate[:, None] * expert_out)  # gates carry the router's grad

        z = h + mixture  # (N, d)
        if streamed:  # adds nothing forward; backward: the trunk's gradient through every expert, one at a time
            train = partial(self._train_expert, h_in=h_in, targets=targets, outcome=outcome) if deferred else None
            z = z + ThroughExperts.apply(h, partial(self._input_grad_through_experts, h_in, experts, train))
        lm_loss = F.cross_entropy(self.backbone.logits(z), targets)
        loss = lm_loss + self.hparams.balance_coef * routing.balance_loss
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # not when consolidation froze every shared parameter
            self.manual_backward(loss)
        if deferred and not outcome.local_losses:  # no backward pass ran: the local steps still must
            for routed in experts:
                self._train_expert(cache.load(routed.expert_id), routed, h_in, targets, outcome)
        local_losses, skipped_experts = outcome.local_losses, outcome.skipped_experts
        shared_updated = self._shared_update_is_finite(loss)
        if not shared_updated:
            # Still step: Lightning counts optimizer steps as global steps (one per batch), and AdamW leaves every
            # parameter without a gradient, and its state, untouched.
            optimizer.zero_grad(set_to_none=True)
        elif self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        self._count_skipped_updates(skipped_experts, shared_updated)

        self.usage.update(working_set)
        self._epoch_selections.extend(working_set)
        self.log("train/loss", lm_loss, prog_bar=True, sync_dist=True)
        self.log("train/local_loss", torch.stack(local_losses).mean())
        self.log("train/balance_loss", routing.balance_loss.detach())
        return loss.detach()

    def on_domain_switch(self, previous: str, new: str) -> None:
        """The training domain changed (``callbacks.DomainSwitcher`` calls this): the consolidation policy acts."""
        if self.consolidation.on_domain_switch(self.global_step, previous, new, self.parameters()):
            self._consolidate()

    def _observe_domain(self, h: torch.Tensor, targets: torch.Tensor) -> None:
        """Show the policy this batch's loss under the trunk and head, before any update (novelty detection)."""
        with torch.no_grad():
            loss = F.cross_entropy(self.backbone.logits(h), targets, reduction="sum").float()
            total = sum_across_ranks(torch.stack([loss, loss.new_tensor(float(targets.numel()))]))  # (2,)
        if self.consolidation.observe(float(total[0] / total[1]), self.global_step, self.parameters()):
            self._consolidate()  # a new domain, detected
        if self.consolidation.last_z is not None:
            self.log("train/novelty_z", self.consolidation.last_z)

    def _consolidate(self) -> None:
        """Give the shared parameters the policy's learning-rate factor; at 0 they stop requiring gradients."""
        factor = self.consolidation.shared_lr_factor
        for param in self.parameters():
            param.requires_grad_(factor > 0)
        if self._trainer is not None and self.trainer.optimizers:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = self.hparams.lr * factor
        protected = self.consolidation.protected
        rank_zero_info(
            f"consolidation: domain {len(self.consolidation.groups)} from step {self.global_step}, shared lr × "
            f"{factor:g}" + ("" if protected is None else f", {protected.numel()} experts protected")
        )

    @override
    def on_train_start(self) -> None:
        if self.consolidation.switches:  # resumed after a switch: the optimizer's lr and requires_grad again
            self._consolidate()

    def _shared_update_is_finite(self, loss: torch.Tensor) -> bool:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return True  # a GradScaler skips non-finite steps itself (and needs their gradients to adjust its scale)
        finite = torch.isfinite(loss.detach())
        grads = [p.grad for p in self.shared_parameters() if p.grad is not None]
        if grads:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        # ranks differ in their loss: skip on all of them if any sees a non-finite one (replicas stay identical)
        return not bool(sum_across_ranks((~finite).float().reshape(1)))

    def _count_skipped_updates(self, skipped_experts: list[int], shared_updated: bool) -> None:
        self.skipped_expert_updates += len(skipped_experts)
        self.skipped_shared_updates += not shared_updated
        self.log("train/skipped_expert_updates", float(self.skipped_expert_updates))
        self.log("train/skipped_shared_updates", float(self.skipped_shared_updates))
        if not skipped_experts and shared_updated:
            self._nonfinite_streak = 0
            return
        self._nonfinite_streak += 1
        limit = self.hparams.max_nonfinite
        if limit is not None and self._nonfinite_streak >= limit:
            what = [f"the local updates of experts {skipped_experts}"] if skipped_experts else []
            what += [] if shared_updated else ["the shared update"]
            raise NonFiniteLossError(
                f"training stopped at step {self.global_step}: {self._nonfinite_streak} consecutive steps had a "
                f"NaN/inf loss or gradient (model.max_nonfinite = {limit}); the last one skipped {' and '.join(what)}. "
                "Lower model.lr or model.local_lr, check the data, or raise model.max_nonfinite"
            )

    @override
    def on_train_epoch_end(self) -> None:
        counts = torch.tensor(list(self.usage.values()), dtype=torch.float64)
        if counts.numel():
            p = counts / counts.sum()
            # the same on every rank (one working set for all); sync_dist only tells Lightning so
            self.log("train/expert_entropy", -(p * p.log()).sum().float(), sync_dist=True)
            self.log("train/experts_used", float(counts.numel()), sync_dist=True)
        experiment = getattr(self.logger, "experiment", None)
        if self._epoch_selections and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("experts/usage", torch.tensor(self._epoch_selections), self.global_step)
        self._epoch_selections.clear()

    # --------------------------------------------------------------------------------------------- evaluation

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for ``tokens`` (B, T), streaming the routed experts through the device slots.

        With protected experts (``model.consolidation``) every known domain's model predicts, and the result is
        the average of their predictions weighted by each domain's posterior given the prefix (log-probabilities).
        """
        B, T = tokens.shape
        domains = self.consolidation.eval_domains()
        if domains is None:
            h = self.backbone.trunk(tokens).flatten(0, 1)  # (N, d)
            return self.backbone.logits(h + self._expert_mixture(h)).view(B, T, -1)  # (B, T, V)
        log_probs, live_h = [], None
        for domain in domains:
            with self._shared_weights(domain.shared):
                if domain.shared is not None:
                    h = self.backbone.trunk(tokens).flatten(0, 1)  # (N, d) with the domain's own shared parts
                else:
                    live_h = self.backbone.trunk(tokens).flatten(0, 1) if live_h is None else live_h
                    h = live_h
                logits = self.backbone.logits(h + self._expert_mixture(h, domain.experts))  # (N, V)
            log_probs.append(F.log_softmax(logits.float(), dim=-1).view(B, T, -1))
        return self.consolidation.mix(log_probs, tokens, self.consolidation.config.domain_switch_rate)  # (B, T, V)

    def _expert_mixture(self, h: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_e g_e · expert_e(h)`` (N, d) over the routed experts (among ``candidates``), through the slots."""
        cache = self.experts()
        routing = self.router(h, self.eval_expert_slots, candidates=candidates)
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
        return mixture

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

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the store snapshot
        checkpoint["consolidation"] = self.consolidation.state_dict()
        checkpoint["skipped_updates"] = {
            "experts": self.skipped_expert_updates,
            "shared": self.skipped_shared_updates,
            "streak": self._nonfinite_streak,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        skipped = checkpoint.get("skipped_updates", {})
        self.skipped_expert_updates = skipped.get("experts", 0)
        self.skipped_shared_updates = skipped.get("shared", 0)
        self._nonfinite_streak = skipped.get("streak", 0)
        if "consolidation" in checkpoint:
            self.consolidation.load_state_dict(checkpoint["consolidation"])
            for param in self.parameters():
                param.requires_grad_(self.consolidation.shared_lr_factor > 0)
        super().on_load_checkpoint(checkpoint)  # the store snapshot, restored now or on first use
