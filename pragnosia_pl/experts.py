"""An expert as a fixed-size flat record: parameters, then its optimizer state, then its step counter.

Every expert of a model has the same shape, so one ``ExpertLayout`` maps any record to named parameter
views, and one stateless template module (on the meta device, never holding memory) runs any record with
``torch.func.functional_call``. Loading an expert is therefore one copy into a slot, never a module rebuild.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from pragnosia_pl.model import FeedForward, init_weights

EXPERT_OPTIMIZERS = ("sgd", "adam")
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

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, state: torch.Tensor, step: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = state.chunk(2)
        step.add_(1)
        if _FUSED_ADAM is not None:  # one pass over the record instead of eight: the kernel AdamW(fused=True) runs
            _FUSED_ADAM(
                [param],
                [grad],
                [exp_avg],
                [exp_avg_sq],
                [],
                [step],
                lr=self.lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )
            return
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - torch.pow(beta1, step)  # (1,) stays on the device: no host sync
        bias2 = 1 - torch.pow(beta2, step)
        denom = (exp_avg_sq / bias2).sqrt_().add_(self.eps)
        param.addcdiv_(exp_avg, denom * bias1, value=-self.lr)


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
        self.num_params = sum(shape.numel() for shape in self.shapes.values())
        self.state_numel = optimizer.state_numel(self.num_params)
        self.record_numel = self.num_params + self.state_numel + 1

    def split(self, record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``record`` (R,) -> parameters (P,), optimizer state, step (1,): views, not copies."""
        P, St = self.num_params, self.state_numel
        return record[:P], record[P : P + St], record[P + St :]

    def param_views(self, flat_params: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            views[name] = flat_params[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return views

    def forward(self, flat_params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Run the expert held in ``flat_params`` (P,) on ``x`` (N, d) -> (N, d)."""
        return self.forward_named(self.param_views(flat_params), x)

    def forward_named(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Run the expert with ``params`` by name on ``x`` (N, d) -> (N, d): through its class's
        ``functional_forward(params, x)`` when it has one (the default FFN does), else ``functional_call``."""
        if self._functional is not None:
            return self._functional(params, x)
        return functional_call(self.template, params, (x,))

    def flatten(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors, in :meth:`param_views` order, as one flat (P,) vector."""
        return torch.cat([g.reshape(-1) for g in grads])

    def init_params(self, expert_id: int) -> torch.Tensor:
        """Expert ``expert_id``'s initial parameters (P,) on the CPU, a pure function of (seed, id): every model
        that builds its experts here (``PragnosiaLM``'s store, ``GlobalMoE``) starts from the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + expert_id) % (2**63 - 1))
            expert = self.build_expert()
        return torch.nn.utils.parameters_to_vector(expert.parameters()).detach()

    def init_record(self, expert_id: int, out: torch.Tensor) -> None:
        """Fill ``out`` (R,) on the CPU with expert ``expert_id``'s initial record: its initial parameters, zero
        optimizer state and step."""
        params, state, step = self.split(out)
        params.copy_(self.init_params(expert_id))
        state.zero_()
        step.zero_()
