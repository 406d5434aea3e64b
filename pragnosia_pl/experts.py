"""An expert as a fixed-size flat record: parameters, then its optimizer state, then its step counter.

Every expert of a model has the same shape, so one ``ExpertLayout`` maps any record to named parameter
views, and one stateless template module (on the meta device, never holding memory) runs any record with
``torch.func.functional_call``. Loading an expert is therefore one copy into a slot, never a module rebuild.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from pragnosia_pl.model import FeedForward, init_weights

EXPERT_OPTIMIZERS = ("sgd", "adam")
_REMEMBERED_VIEWS = 32  # ExpertLayout.param_views: places remembered (one slot buffer and one gradient buffer in use)
_FUSED_ADAM = getattr(torch, "_fused_adam_", None)  # torch's fused Adam kernel (CPU and CUDA since torch 2.4)


class FlatSGD:
    """Plain SGD on a flat parameter vector (no state besides the step counter)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def state_numel(self, num_params: int) -> int:
        return 0

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, state: torch.Tensor, step: torch.Tensor) -> None:
        param.add_(grad, alpha=-self.lr)
        step.add_(1)

    @torch.no_grad()
    def step_group(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[torch.Tensor],
        steps: list[torch.Tensor],
    ) -> None:
        """:meth:`step` of several experts: one foreach call for all of them."""
        torch._foreach_add_(params, grads, alpha=-self.lr)
        torch._foreach_add_(steps, 1)


class FlatAdam:
    """Adam on a flat parameter vector; first and second moments live in the record.

    Its betas are the shared AdamW's (0.9, 0.95): with them the experts of the ``exact`` objective step as
    ``GlobalMoE``'s do (and matching them was worth 0.013 bpb to the local rule at n = 32).
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> None:
        self.lr = lr
        self.betas = betas
        self.eps = eps

    def state_numel(self, num_params: int) -> int:
        return 2 * num_params

    def step(self, param: torch.Tensor, grad: torch.Tensor, state: torch.Tensor, step: torch.Tensor) -> None:
        self.step_group([param], [grad], [state], [step])

    @torch.no_grad()
    def step_group(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[torch.Tensor],
        steps: list[torch.Tensor],
    ) -> None:
        """:meth:`step` of several experts (one flat parameter vector, state and step counter each): one fused
        kernel call for all of them (one pass over each record instead of eight: the kernel AdamW(fused=True)
        runs), the same arithmetic per element."""
        beta1, beta2 = self.betas
        moments = [state.chunk(2) for state in states]
        torch._foreach_add_(steps, 1)
        if _FUSED_ADAM is not None:
            _FUSED_ADAM(
                params,
                grads,
                [m[0] for m in moments],
                [m[1] for m in moments],
                [],
                steps,
                lr=self.lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )
            return
        for param, grad, (exp_avg, exp_avg_sq), step in zip(params, grads, moments, steps, strict=True):
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = 1 - torch.pow(beta1, step)  # (1,) stays on the device: no host sync
            bias2 = 1 - torch.pow(beta2, step)
            denom = (exp_avg_sq / bias2).sqrt_().add_(self.eps)
            param.addcdiv_(exp_avg, denom * bias1, value=-self.lr)


MAX_SEED = 2**23  # seeds 0 ≤ s < 2^23: with expert ids below 2^40, (s, e) -> s·2^40 + e is one-to-one in 2^63
MAX_EXPERT_ID = 2**40


def expert_seed(seed: int, expert_id: int) -> int:
    """The RNG seed of expert ``expert_id`` under model seed ``seed``: ``seed·2^40 + expert_id``, distinct for every
    (seed, expert) pair (an expert of one seed never starts as another seed's expert) and below 2^63, which the
    shared parts' streams (:func:`~pragnosia_pl.lm_base.seeded`) start above."""
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"model.seed ({seed}) must be in [0, {MAX_SEED})")
    if not 0 <= expert_id < MAX_EXPERT_ID:
        raise ValueError(f"expert id {expert_id} is out of [0, 2^40)")
    return seed * MAX_EXPERT_ID + expert_id


def make_expert_optimizer(name: str, lr: float) -> FlatSGD | FlatAdam:
    if name == "sgd":
        return FlatSGD(lr)
    if name == "adam":
        return FlatAdam(lr)
    raise ValueError(f"model.expert_optimizer ({name!r}) must be one of: {', '.join(EXPERT_OPTIMIZERS)}")


def feed_forward_expert(d_model: int, hidden: int) -> nn.Module:
    """The default expert: a freshly initialised pre-norm FFN ``(N, d) -> (N, d)`` (d → hidden → d)."""
    expert = FeedForward(d_model, hidden)
    expert.apply(init_weights)
    return expert


class ExpertLayout:
    """Where each part of an expert lives inside its flat record.

    Record: ``[parameters (P) | optimizer state (0, P or 2P) | step (1)]``, float32.

    Args:
        build_expert: returns a freshly initialised expert module ``(N, d) -> (N, d)`` (no buffers).
        optimizer: the per-expert optimizer whose state the record carries.
        seed: base seed; expert e is initialised from ``(seed, e)``.
    """

    def __init__(self, build_expert: Callable[[], nn.Module], optimizer: FlatSGD | FlatAdam, seed: int) -> None:
        self.build_expert = build_expert
        self.optimizer = optimizer
        self.seed = seed
        with torch.device("meta"):
            self.template = build_expert()
        if any(True for _ in self.template.buffers()):
            raise ValueError("an expert module must not have buffers: its whole state must be parameters")
        self.shapes = {name: p.shape for name, p in self.template.named_parameters()}
        self._functional = getattr(type(self.template), "functional_forward", None)
        # a hand-written backward (the default FFN has one) spares each expert an autograd graph and engine call
        self._forward_saving = getattr(type(self.template), "functional_forward_saving", None)
        self._backward = getattr(type(self.template), "functional_backward", None)
        self.manual_backward = self._forward_saving is not None and self._backward is not None
        # g experts in one batched product each (``model.expert_batch``): the default FFN has the grouped pair
        self._grouped_forward = getattr(type(self.template), "grouped_forward_saving", None)
        self._grouped_backward = getattr(type(self.template), "grouped_backward", None)
        self.grouped = self._grouped_forward is not None and self._grouped_backward is not None
        self._views: OrderedDict[tuple, tuple[torch.Tensor, dict[str, torch.Tensor]]] = OrderedDict()
        self._grad_buffers: dict[torch.device, torch.Tensor] = {}
        self.num_params = sum(shape.numel() for shape in self.shapes.values())
        self.state_numel = optimizer.state_numel(self.num_params)
        self.record_numel = self.num_params + self.state_numel + 1

    def split(self, record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``record`` (R,) -> parameters (P,), optimizer state, step (1,): views, not copies."""
        P, St = self.num_params, self.state_numel
        return record[:P], record[P : P + St], record[P + St :]

    def param_views(self, flat_params: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat_params`` (P,) as named parameter views. Remembered for the last few places they were asked of
        (the cache's slots, the gradient buffer): building six views costs as much as a small expert's update."""
        key = (flat_params.device, flat_params.untyped_storage().data_ptr(), flat_params.storage_offset())
        remembered = self._views.get(key)
        if remembered is not None and remembered[0].numel() == flat_params.numel():
            return remembered[1]
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            views[name] = flat_params[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        self._views[key] = (flat_params, views)  # flat_params keeps the memory alive: its address stays its own
        if len(self._views) > _REMEMBERED_VIEWS:
            self._views.popitem(last=False)
        return views

    def forward(self, flat_params: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Run the expert held in ``flat_params`` (P,) on ``x`` (N, d) -> (N, d); ``dtype``: compute in it (mixed
        precision: the record stays float32)."""
        return self.forward_named(self.param_views(flat_params), x, dtype)

    def forward_named(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Run the expert with ``params`` by name on ``x`` (N, d) -> (N, d): through its class's
        ``functional_forward(params, x)`` when it has one (the default FFN does), else ``functional_call``; with
        ``dtype`` under autocast to it (the default FFN casts itself, as autocast would)."""
        if dtype is None:
            return self._functional(params, x) if self._functional is not None else self._call(params, x)
        if self.manual_backward:
            return self._functional(params, x, dtype)
        with torch.autocast(x.device.type, dtype=dtype):
            return self._functional(params, x) if self._functional is not None else self._call(params, x)

    def _call(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, params, (x,))

    def forward_saving(
        self, flat_params: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, Any]:
        """The expert held in ``flat_params`` (P,) run on ``x`` (N, d) (in ``dtype``, when given): its output (N, d),
        detached, and what :meth:`backward` needs. Nothing saved refers to ``flat_params``: the expert may leave its
        slot before its backward, which reads its (unchanged) parameters from wherever it is then."""
        if self.manual_backward:
            if dtype is None:
                return self._forward_saving(self.param_views(flat_params), x)
            return self._forward_saving(self.param_views(flat_params), x, dtype)
        return _AutogradForward(self, flat_params, x, dtype).output()

    def backward(
        self, flat_params: torch.Tensor, saved: Any, grad_out: torch.Tensor, input_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The vector-Jacobian product at ``grad_out`` (N, d) of the :meth:`forward_saving` that returned ``saved``,
        the expert now held in ``flat_params`` (P,): its parameters' gradient (P,) and, when ``input_grad``, its
        input's (N, d). The parameters' gradient lives in one buffer per device, valid until the next call. ``saved`` is
        spent (its activations freed as they are used, as autograd frees a graph's): one backward per forward."""
        grad = self._grad_buffers.get(flat_params.device)
        if grad is None:
            grad = self._grad_buffers[flat_params.device] = flat_params.new_empty(self.num_params)  # (P,)
        if self.manual_backward:
            views = self.param_views(flat_params)
            grad_in = self._backward(views, saved, grad_out, self.param_views(grad), input_grad)
            return grad, grad_in
        return saved.backward(flat_params, grad_out, grad, input_grad)

    def stacked_views(self, flat_params: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat_params`` (g, P), one expert per row, as named views with a leading expert dimension (g, *shape)."""
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            views[name] = flat_params[:, offset : offset + shape.numel()].view(-1, *shape)
            offset += shape.numel()
        return views

    def grouped_forward_saving(
        self, flat_params: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, Any]:
        """:meth:`forward_saving` of g experts at once (:attr:`grouped` experts only): ``flat_params`` (g, P), ``x``
        (g, M, d), each expert's tokens padded with zero rows to M; returns (g, M, d) and what
        :meth:`grouped_backward` needs (nothing that refers to ``flat_params``)."""
        if dtype is None:
            return self._grouped_forward(self.stacked_views(flat_params), x)
        return self._grouped_forward(self.stacked_views(flat_params), x, dtype)

    def grouped_backward(
        self, flat_params: torch.Tensor, saved: Any, grad_out: torch.Tensor, input_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`backward` of g experts at once: ``grad_out`` (g, M, d), zero on padding rows; returns the
        parameters' gradients (g, P), a new tensor, and (``input_grad``) the inputs' (g, M, d)."""
        grad = flat_params.new_empty(flat_params.shape)  # (g, P)
        grad_in = self._grouped_backward(
            self.stacked_views(flat_params), saved, grad_out, self.stacked_views(grad), input_grad
        )
        return grad, grad_in

    def init_params(self, expert_id: int) -> torch.Tensor:
        """Expert ``expert_id``'s initial parameters (P,) on the CPU, a pure function of (seed, id): every model
        that builds its experts here (``PragnosiaLM``'s store, ``GlobalMoE``) starts from the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(expert_seed(self.seed, expert_id))
            expert = self.build_expert()
        return torch.nn.utils.parameters_to_vector(expert.parameters()).detach()

    def init_record(self, expert_id: int, out: torch.Tensor) -> None:
        """Fill ``out`` (R,) on the CPU with expert ``expert_id``'s initial record: its initial parameters, zero
        optimizer state and step."""
        params, state, step = self.split(out)
        params.copy_(self.init_params(expert_id))
        state.zero_()
        step.zero_()


class _AutogradForward:
    """:meth:`ExpertLayout.forward_saving` for an expert without a hand-written backward: its forward run under
    autograd, the graph kept. The saved parameters are views of the slot, which may hold another expert by the
    backward: they are saved as positions in the record and read, at the backward, from the slot given then."""

    def __init__(
        self, layout: ExpertLayout, flat_params: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> None:
        self.flat_params = flat_params
        slot_storage = flat_params.untyped_storage().data_ptr()

        def pack(tensor: torch.Tensor):
            if tensor.untyped_storage().data_ptr() != slot_storage:
                return tensor  # activations: kept
            return tensor.storage_offset() - self.flat_params.storage_offset(), tensor.shape, tensor.stride()

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            offset, shape, stride = packed
            params = self.flat_params
            return _alias(params).as_strided(shape, stride, params.storage_offset() + offset)

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            # one leaf per parameter: a gradient w.r.t. one flat leaf would scatter each into a zeroed (P,) tensor
            self.leaves = {name: _alias(v).requires_grad_(True) for name, v in layout.param_views(flat_params).items()}
            self.x = x.detach().requires_grad_(True)
            self.out = layout.forward_named(self.leaves, self.x, dtype)  # (N, d)

    def output(self) -> tuple[torch.Tensor, _AutogradForward]:
        return self.out.detach(), self

    def backward(
        self, flat_params: torch.Tensor, grad_out: torch.Tensor, grad: torch.Tensor, input_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.flat_params = flat_params  # where the saved parameters are read from now
        inputs = [*self.leaves.values(), *([self.x] if input_grad else [])]
        grads = torch.autograd.grad(self.out, inputs, grad_out)
        torch.cat([g.reshape(-1) for g in grads[: len(self.leaves)]], out=grad)
        return grad, grads[-1] if input_grad else None


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor on ``tensor``'s memory with a version counter of its own.

    Views of one slot buffer share a version counter, so an asynchronous load into another slot during this
    expert's backward would look like an in-place edit of its saved tensors; an alias keeps them apart.
    """
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
