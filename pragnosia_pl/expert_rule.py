"""How a touched expert learns (``model.objective``): its own local loss, or its part of global backpropagation.

Everything here runs on one expert's record in a device slot (``ExpertLayout`` views), never on a module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

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


class ExpertGraph:
    """One expert's first-pass forward, kept for its backward (:meth:`ExpertRule.forward_kept`)."""

    def __init__(self, record: torch.Tensor) -> None:
        self.record = record  # the slot holding the expert: at the forward, then at the backward
        self.leaves: dict[str, torch.Tensor] = {}
        self.h_e: torch.Tensor | None = None
        self.out: torch.Tensor | None = None


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

    def local_step(self, record: torch.Tensor, h_e: torch.Tensor, targets_e: torch.Tensor) -> LocalStep:
        """Train the expert held in ``record`` (R,) on its tokens ``h_e`` (N_e, d) with its local loss."""
        leaves = self._leaves(record)
        with torch.enable_grad():
            expert_out = self.layout.forward_named(leaves, h_e)  # (N_e, d)
            local_loss = self.local_loss(h_e, expert_out, targets_e)
            grad = self.layout.flatten(torch.autograd.grad(local_loss, list(leaves.values())))
        grad, local_loss = mean_across_ranks(grad, local_loss, num_tokens=h_e.size(0), group=self.group)
        finite = torch.isfinite(grad).all()
        if h_e.size(0) > 0 or world_size() > 1:  # one process, no tokens: the mean is NaN, the gradient zero
            finite = finite & torch.isfinite(local_loss)
        updated = self._step(record, grad, finite)
        return LocalStep(expert_out.detach(), local_loss.detach(), updated)

    def forward_kept(self, record: torch.Tensor, h_e: torch.Tensor) -> ExpertGraph:
        """The expert's output at ``h_e`` (N_e, d) with its autograd graph kept for :meth:`exact_step`, so that the
        second pass need not run the forward again. The graph's saved parameters are views of the slot, which
        may hold another expert by then: they are saved as positions in the record and read, in the second pass,
        from wherever the expert is resident then (unchanged: it steps only after its gradient is taken)."""
        graph = ExpertGraph(record)
        slot_storage = record.untyped_storage().data_ptr()

        def pack(tensor: torch.Tensor):
            if tensor.untyped_storage().data_ptr() != slot_storage:
                return tensor  # activations: kept
            offset = tensor.storage_offset() - graph.record.storage_offset()
            return offset, tensor.shape, tensor.stride()

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            offset, shape, stride = packed
            record = graph.record
            return _alias(record).as_strided(shape, stride, record.storage_offset() + offset)

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            graph.leaves = self._leaves(record)
            graph.h_e = h_e.detach().requires_grad_(True)
            graph.out = self.layout.forward_named(graph.leaves, graph.h_e)  # (N_e, d)
        return graph

    def exact_step(
        self, record: torch.Tensor, h_e: torch.Tensor, grad_out: torch.Tensor, graph: ExpertGraph | None = None
    ) -> tuple[torch.Tensor, bool]:
        """Step the expert in ``record`` on ``grad_out`` (N_e, d), the shared loss's gradient w.r.t. its output at
        its tokens ``h_e`` (N_e, d) (gate included), through its first-pass ``graph`` when kept, else a forward
        run again. Returns the gradient w.r.t. ``h_e`` (N_e, d), taken at the pre-step parameters, and whether
        the record was updated."""
        if graph is None:
            graph = ExpertGraph(record)
            graph.leaves = self._leaves(record)
            graph.h_e = h_e.detach().requires_grad_(True)
            with torch.enable_grad():
                graph.out = self.layout.forward_named(graph.leaves, graph.h_e)
        graph.record = record  # where the saved parameters are read from now
        *grads, grad_in = torch.autograd.grad(graph.out, [*graph.leaves.values(), graph.h_e], grad_out)
        grad = self.layout.flatten(grads)
        grad = average_across_ranks(grad, group=self.group)
        norm = grad.norm()  # non-finite iff some element is (or the sum of squares overflows: skipped too)
        if self.grad_clip > 0:
            grad = grad * (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s formula
        updated = self._step(record, grad, torch.isfinite(norm))
        return grad_in, updated

    def _leaves(self, record: torch.Tensor) -> dict[str, torch.Tensor]:
        """The expert's parameters in ``record`` as leaves of their own: on the slot's memory, each with its own
        version counter (loads into other slots may land meanwhile), each its own gradient (a gradient w.r.t.
        one flat leaf would scatter every parameter's into a zeroed (P,) tensor)."""
        views = self.layout.param_views(self.layout.split(record)[0])
        return {name: _alias(view).requires_grad_(True) for name, view in views.items()}

    def _step(self, record: torch.Tensor, grad: torch.Tensor, finite: torch.Tensor) -> bool:
        if not bool(finite):  # one host sync per expert, checked before stepping: the step is in place
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
        return ctx.second_pass(grad), None


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor on ``tensor``'s memory with a version counter of its own.

    Views of one slot buffer share a version counter, so an asynchronous load into another slot during this
    expert's backward would look like an in-place edit of its saved tensors; an alias keeps them apart.
    """
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
