"""How a working-set expert learns: its local step and loss, and the trunk's gradient through streamed experts.

Everything here runs on one expert's record in a device slot (``ExpertLayout`` views), never on a module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pragnosia_pl.distributed import mean_across_ranks, world_size


class LocalStep(NamedTuple):
    """What :meth:`PragnosiaLM.local_step` did to one expert."""

    expert_out: torch.Tensor  # (N_e, d): the expert's output before its update, detached
    local_loss: torch.Tensor  # (): detached
    updated: bool  # False: the loss or gradient was not finite and the record was left as it was


class Readout(NamedTuple):
    """What an expert's local loss reads besides its own output (``model.local_readout: mixture``)."""

    mixture: torch.Tensor  # (N_e, d): Σ_j g_j·o_j at the expert's tokens, every expert's pre-step output, detached
    gate: torch.Tensor  # (N_e,): the expert's own gate, detached


class RoutedExpert(NamedTuple):
    """One working-set expert of a step: its tokens, gates and (``mixture`` readout) what its loss reads."""

    expert_id: int
    token_idx: torch.Tensor  # (N_e,)
    gate: torch.Tensor  # (N_e,), detached
    readout: Readout | None


class LocalOutcome:
    """What the step's local updates did: their losses, and the experts whose update was skipped."""

    def __init__(self) -> None:
        self.local_losses: list[torch.Tensor] = []
        self.skipped_experts: list[int] = []


class LocalLearning:
    """Mixin for :class:`~pragnosia_pl.module.PragnosiaLM`: each expert's local step, and its loss.

    The module provides ``layout`` (an :class:`~pragnosia_pl.experts.ExpertLayout`), ``expert_optimizer``,
    ``backbone`` (for the detached head) and ``experts()`` (the cache, from
    :class:`~pragnosia_pl.expert_storage.ExpertStorage`). Override :meth:`local_loss` for another local objective.
    """

    @torch.no_grad()
    def _detached_mixture(
        self, h: torch.Tensor, working_set: list[int], placed: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``Σ_e g_e·o_e`` (N, d) with every expert's current parameters, all detached, and each ``o_e`` (N_e, d):
        a first pass over the working set, so that each expert's local loss can read the mixture it is part of."""
        cache = self.experts()
        mixture, outputs = torch.zeros_like(h), []
        for position, (expert_id, (token_idx, gate)) in enumerate(zip(working_set, placed)):
            params = self.layout.split(cache.load(expert_id))[0]
            cache.prefetch(working_set[(position + 1) % len(working_set)])  # the last prefetches the next pass's first
            outputs.append(self.layout.forward(params, h[token_idx]))
            mixture.index_add_(0, token_idx, gate[:, None] * outputs[-1])
        return mixture, outputs

    def _train_expert(
        self, record: torch.Tensor, routed: RoutedExpert, h_in: torch.Tensor, targets: torch.Tensor,
        outcome: LocalOutcome,
    ) -> torch.Tensor:
        """One expert's local step on its tokens; marks its slot dirty (or counts it skipped). Returns its
        pre-step output (N_e, d), detached."""
        token_idx = routed.token_idx
        batch_tokens = h_in.size(0) if self.hparams.local_weighting == "batch" else None
        expert_out, local_loss, updated = self.local_step(
            record, h_in[token_idx], targets[token_idx], routed.readout, batch_tokens
        )
        if updated:
            self.experts().mark_dirty(routed.expert_id)
        else:
            outcome.skipped_experts.append(routed.expert_id)  # its slot still equals its record: no write-back
        outcome.local_losses.append(local_loss)
        return expert_out

    def _input_grad_through_experts(
        self, h: torch.Tensor, experts: list[RoutedExpert], train: Callable | None, grad: torch.Tensor
    ) -> torch.Tensor:
        """``Σ_e J_e(h)ᵀ (g_e · grad)`` (N, d): the gradient ``grad`` (N, d) of the LM loss w.r.t. the residual
        stream, carried back to the trunk output ``h`` through each expert, loaded into the cache again one after
        another. With ``train`` each expert's local step follows its Jacobian, which is therefore the pre-step one;
        without it the experts stepped already and the Jacobian is the post-step one. No gradient reaches an
        expert."""
        cache = self.experts()
        grad_h = torch.zeros_like(h)
        for position, routed in enumerate(experts):
            record = cache.load(routed.expert_id)
            if position + 1 < len(experts):
                cache.prefetch(experts[position + 1].expert_id)
            params = _alias(self.layout.split(record)[0])  # loads into other slots may land meanwhile
            with torch.enable_grad():
                h_e = h[routed.token_idx].requires_grad_(True)  # (N_e, d)
                (grad_e,) = torch.autograd.grad(
                    self.layout.forward(params, h_e), h_e, grad_outputs=routed.gate[:, None] * grad[routed.token_idx]
                )
            grad_h.index_add_(0, routed.token_idx, grad_e)
            if train is not None:
                train(record, routed)
        return grad_h

    def local_step(
        self, record: torch.Tensor, h_e: torch.Tensor, targets_e: torch.Tensor, readout: Readout | None = None,
        batch_tokens: int | None = None,
    ) -> LocalStep:
        """Train the expert held in ``record`` (R,) on its tokens ``h_e`` (N_e, d) with its local loss.

        Returns the expert's output before the update (N_e, d) and the local loss, both detached, and whether the
        update was applied: a non-finite loss or gradient leaves ``record`` untouched. Under DDP the gradient and
        the loss are first averaged over every rank's tokens, so every replica takes the same step (or skips it).
        With ``batch_tokens`` (the tokens of the batch ``h_e`` came from) the gradient of the loss, a mean over
        the expert's tokens, is scaled by their share of the batch (``model.local_weighting: batch``).
        """
        params, state, step = self.layout.split(record)
        leaf = _alias(params).requires_grad_(True)  # the slot's memory, the graph's own version counter
        with torch.enable_grad():
            expert_out = self.layout.forward(leaf, h_e)  # (N_e, d)
            if readout is None:  # a subclass's local_loss(h_e, expert_out, targets_e) keeps working
                local_loss = self.local_loss(h_e, expert_out, targets_e)
            else:
                local_loss = self.local_loss(h_e, expert_out, targets_e, readout)
            (grad,) = torch.autograd.grad(local_loss, leaf)
        grad, local_loss = mean_across_ranks(  # replicas stay identical
            grad, local_loss, num_tokens=h_e.size(0), batch_tokens=batch_tokens
        )
        finite = torch.isfinite(grad).all()
        if h_e.size(0) > 0 or world_size() > 1:  # one process, no tokens: the mean is NaN, the gradient zero
            finite = finite & torch.isfinite(local_loss)
        updated = bool(finite)  # one host sync per expert, as tokens_of's nonzero() already costs
        if updated:  # checked before stepping: the step is in place, on the slot
            self.expert_optimizer.step(params, grad, state, step)
        return LocalStep(expert_out.detach(), local_loss.detach(), updated)

    def local_loss(
        self, h_e: torch.Tensor, expert_out: torch.Tensor, targets_e: torch.Tensor, readout: Readout | None = None
    ) -> torch.Tensor:
        """``CE(head(norm(h_e + o_e)), y_e)`` through the detached head: a gradient for the expert alone.

        With ``readout`` (``model.local_readout: mixture``) the head reads the whole mixture instead,
        ``h_e + Σ_j g_j·o_j`` with every output detached but this expert's, which enters as ``g_e·o_e``.
        """
        if readout is None:
            return F.cross_entropy(self.backbone.detached_logits(h_e + expert_out), targets_e)
        z = h_e + readout.mixture + readout.gate[:, None] * (expert_out - expert_out.detach())  # value: h + Σ g·o
        return F.cross_entropy(self.backbone.detached_logits(z), targets_e)


class ThroughExperts(torch.autograd.Function):
    """Zeros like ``h`` in the forward pass; in the backward pass, ``input_grad(grad)`` as the gradient of ``h``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, input_grad) -> torch.Tensor:
        ctx.input_grad = input_grad
        return torch.zeros_like(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.input_grad(grad), None


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor on ``tensor``'s memory with a version counter of its own.

    Views of one slot buffer share a version counter, so an asynchronous load into another slot during this
    expert's backward would look like an in-place edit of its saved tensors; an alias keeps them apart.
    """
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
