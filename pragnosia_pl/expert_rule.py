"""How a touched expert learns (``model.objective``): its own local loss, or its part of global backpropagation.

Everything here runs on one expert's record in a device slot (``ExpertLayout`` views), never on a module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from pragnosia_pl.distributed import average_across_ranks, mean_across_ranks, world_size
from pragnosia_pl.experts import ExpertLayout, FlatAdam, FlatSGD

Objective = Literal["local", "exact"]
OBJECTIVES = ("local", "exact")
LocalLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LocalStep(NamedTuple):
    """What :meth:`ExpertRule.local_step` did to one expert."""

    expert_out: torch.Tensor  # (N_e, d): the expert's output before its update, detached
    local_loss: torch.Tensor  # (): detached
    updated: bool  # False: the loss or gradient was not finite and the record was left as it was


class ExpertRule:
    """The update of one touched expert, in place on its record.

    - ``local`` (the seed's rule): the expert learns from ``local_loss(h_e, o_e, y_e)`` on its own tokens, its
      gradient the mean over them (:meth:`local_step`, during the first expert pass).
    - ``exact``: the expert steps on the shared loss's gradient for it, ``J_e(θ)ᵀ (g_e · dL/dz)`` at its tokens,
      and hands back its input gradient ``J_e(h)ᵀ (g_e · dL/dz)`` for the trunk (:meth:`exact_step`, during
      the second pass): what global backpropagation gives, one expert at a time.

    Under DDP the gradient is first averaged over the ranks (``local``: over every token the expert saw;
    ``exact``: over the ranks, as DDP averages the shared gradient), so every replica takes the same step.
    A non-finite loss or gradient leaves the record untouched and is counted in :attr:`skipped`.

    Args:
        objective: ``local`` or ``exact``.
        layout: where parameters, optimizer state and step live in a record.
        optimizer: the experts' optimizer (its state is in the record).
        grad_clip: ``exact`` clips each expert's gradient to this norm, by its own norm (0: never), as
            ``GlobalMoE`` does; ``local`` never clips.
        local_loss: ``(h_e, o_e, y_e) -> loss`` for ``local``.
    """

    def __init__(
        self,
        objective: Objective,
        layout: ExpertLayout,
        optimizer: FlatSGD | FlatAdam,
        grad_clip: float,
        local_loss: LocalLoss,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective ({objective!r}) must be one of: {', '.join(OBJECTIVES)}")
        self.objective = objective
        self.layout = layout
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.local_loss = local_loss
        self.group = None  # the process group of the experts' all-reduces under DDP (set by the module)
        self.updates = 0  # expert optimizer steps since this object was built
        self.skipped: list[int] = []  # experts whose update was skipped, since the last take_skipped()

    def local_step(
        self, record: torch.Tensor, h_e: torch.Tensor, targets_e: torch.Tensor, dtype: torch.dtype | None = None
    ) -> LocalStep:
        """Train the expert held in ``record`` (R,) on its tokens ``h_e`` (N_e, d) with its local loss (computed in
        ``dtype`` under mixed precision; the record stays float32)."""
        params = self.layout.split(record)[0]
        expert_out, saved = self.layout.forward_saving(params, h_e, dtype)  # (N_e, d)
        with torch.enable_grad():  # autograd over the local loss alone: the expert's backward is the layout's
            out = expert_out.requires_grad_(True)
            local_loss = self.local_loss(h_e, out, targets_e)
            (grad_out,) = torch.autograd.grad(local_loss, out)  # (N_e, d)
        grad, _ = self.layout.backward(params, saved, grad_out, input_grad=False)  # (P,)
        grad, local_loss = mean_across_ranks(grad, local_loss, num_tokens=h_e.size(0), group=self.group)
        finite = math.isfinite(grad.sum().item())  # iff every element is (or the sum overflows: skipped too)
        if h_e.size(0) > 0 or world_size() > 1:  # one process, no tokens: the mean is NaN, the gradient zero
            finite = finite and math.isfinite(local_loss.item())
        updated = self._step(record, grad, finite)
        return LocalStep(expert_out.detach(), local_loss.detach(), updated)

    def exact_step(
        self, record: torch.Tensor, grad_out: torch.Tensor, saved: Any, grad_scale: float = 1.0
    ) -> tuple[torch.Tensor, bool]:
        """Step the expert in ``record`` on ``grad_out`` (N_e, d), the shared loss's gradient w.r.t. its output at
        its tokens (gate included), through what its forward at them saved (``ExpertLayout.forward_saving``, in the
        first pass or run again). ``grad_scale``: the loss scale ``grad_out`` carries (a ``GradScaler``'s), divided
        out of the expert's gradient before its step. Returns the gradient w.r.t. its input (N_e, d), taken at the
        pre-step parameters and still scaled, and whether the record was updated."""
        params = self.layout.split(record)[0]
        grad, grad_in = self.layout.backward(params, saved, grad_out, input_grad=True)  # (P,), (N_e, d)
        if grad_scale != 1.0:
            grad.div_(grad_scale)
        grad = average_across_ranks(grad, group=self.group)
        # the one host sync per expert (the step is in place, so finiteness is checked first); the clip then costs
        # Python arithmetic and, only when it clips, one pass: clip_grad_norm_'s formula
        norm = grad.norm().item()  # non-finite iff some element is (or the sum of squares overflows: skipped too)
        if self.grad_clip > 0 and self.grad_clip < norm + 1e-6:
            grad.mul_(self.grad_clip / (norm + 1e-6))
        updated = self._step(record, grad, math.isfinite(norm))
        return grad_in, updated

    def exact_group_step(
        self,
        records: list[torch.Tensor],
        params: torch.Tensor,
        grad_out: torch.Tensor,
        saved: Any,
        grad_scale: float = 1.0,
    ) -> tuple[torch.Tensor, list[bool]]:
        """:meth:`exact_step` of g experts at once (``model.expert_batch``): ``records`` their slots (R,) each,
        ``params`` (g, P) their parameters (a copy: the backward reads them after no step), ``grad_out`` (g, M, d)
        their tokens' output gradients padded with zero rows, ``saved`` what
        :meth:`~pragnosia_pl.experts.ExpertLayout.grouped_forward_saving` kept. Each expert is clipped by its own norm
        and stepped by its own optimizer state, as alone; one host sync and one optimizer call for the group.
        Returns the inputs' gradients (g, M, d) and, per expert, whether its record was updated."""
        grads, grad_in = self.layout.grouped_backward(params, saved, grad_out, input_grad=True)  # (g, P), (g, M, d)
        if grad_scale != 1.0:
            grads.div_(grad_scale)
        grads = average_across_ranks(grads, group=self.group)
        norms = grads.norm(dim=1)  # (g,)
        if self.grad_clip > 0:
            # clip_grad_norm_'s formula, expert by expert: a factor of 1 where the norm is within the clip
            grads.mul_((self.grad_clip / (norms + 1e-6)).clamp_(max=1.0)[:, None])
        finite = [math.isfinite(norm) for norm in norms.tolist()]  # the one host sync of the group
        stepped = [i for i, ok in enumerate(finite) if ok]
        if stepped:
            parts = [self.layout.split(records[i]) for i in stepped]
            self.optimizer.step_group(
                [p[0] for p in parts], [grads[i] for i in stepped], [p[1] for p in parts], [p[2] for p in parts]
            )
            self.updates += len(stepped)
        return grad_in, finite

    def _step(self, record: torch.Tensor, grad: torch.Tensor, finite: bool) -> bool:
        if not finite:  # checked before stepping (one host sync per expert): the step is in place
            return False
        params, state, step = self.layout.split(record)
        self.optimizer.step(params, grad, state, step)
        self.updates += 1
        return True


class ThroughExperts(torch.autograd.Function):
    """Zeros like ``h`` in the forward pass; in the backward pass ``second_pass(dL/dz)`` as ``h``'s gradient.

    Added to the residual stream ``z``, it hands the exact objective's second expert pass the gradient it needs
    inside the one backward pass of the step, before the trunk's backward (which needs its result).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, second_pass: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.second_pass = second_pass
        return torch.zeros_like(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        second_pass, ctx.second_pass = ctx.second_pass, None  # a node that keeps it after its backward leaks it
        return second_pass(grad), None
