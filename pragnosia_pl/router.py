"""Routing: the router scores the n experts, a step keeps a working set of S, each token takes k inside it.

Shape legend: N = B·T tokens, d width, n experts, k experts per token, S working set (k ≤ S ≤ n),
n1·n2 ≥ n the two key sets of the product-key router.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("router", "uniform")
ROUTERS = ("product", "flat")


class Routing(NamedTuple):
    """One routing decision.

    ``working_set[s]`` is the expert at working-set position s; ``positions[t, j]`` is the position of
    token t's j-th expert and ``gates[t, j]`` its weight (differentiable w.r.t. the router).
    """

    working_set: torch.Tensor  # (S,) expert ids
    positions: torch.Tensor  # (N, k) into working_set
    gates: torch.Tensor  # (N, k)
    balance_loss: torch.Tensor  # () n·Σ f_i·P_i, without α

    def tokens_of(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens routed to working-set position ``position`` and their gates: ``(N_e,)``, ``(N_e,)``."""
        chosen = self.positions == position  # (N, k)
        token_idx = chosen.any(dim=-1).nonzero().squeeze(-1)  # (N_e,)
        gate = (self.gates * chosen).sum(dim=-1)[token_idx]  # (N_e,)
        return token_idx, gate


MassHook = Callable[[torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """Router over n experts with a per-step working set.

    ``router="flat"`` is the standard linear router (logits over all n: its parameters and its (N, n)
    activations grow with n). ``router="product"`` scores experts with product keys: expert
    ``e = i·n2 + j`` has logit ``a_i + b_j`` from two linear maps of size n1, n2 ≈ √n, so its softmax
    factorises ``p(e) = p1(i)·p2(j)`` and nothing of size N·n is ever built. That keeps the shared parts of
    the model — and device memory — flat in n.

    Args:
        d_model: width d of the hidden states it reads.
        num_experts: n.
        num_active_experts: k, experts per token.
        gate: ``"router"`` (softmax over the token's chosen logits) or ``"uniform"`` (1/k).
        router: ``"product"`` or ``"flat"``.

    Raises:
        ValueError: if ``gate`` or ``router`` is not one of its choices.

    Example::

        router = Router(d_model=64, num_experts=1024, num_active_experts=2)
        routing = router(h, expert_slots=2)  # every token uses the same 2 experts this step
    """

    def __init__(
        self, d_model: int, num_experts: int, num_active_experts: int, gate: str = "router", router: str = "product"
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"model.gate ({gate!r}) must be one of: {', '.join(GATES)}")
        if router not in ROUTERS:
            raise ValueError(f"model.router ({router!r}) must be one of: {', '.join(ROUTERS)}")
        self.num_experts = num_experts
        self.k = num_active_experts
        self.gate = gate
        self.kind = router
        if router == "flat":
            self.keys = (num_experts,)
        else:
            n1 = math.isqrt(num_experts - 1) + 1 if num_experts > 1 else 1
            self.keys = (n1, math.ceil(num_experts / n1))
        self.proj = nn.Linear(d_model, sum(self.keys), bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(
        self,
        h: torch.Tensor,
        expert_slots: int,
        mass_hook: MassHook | None = None,
        candidates: torch.Tensor | None = None,
    ) -> Routing:
        """Route ``h`` (N, d) through a working set of ``expert_slots`` experts.

        With ``expert_slots ≥ n`` this is plain per-token top-k over all experts. ``mass_hook`` receives the
        per-expert router mass (per-token top-k: the number of tokens that chose each expert) and returns the
        mass to choose from (distributed training all-reduces it so every rank picks the same working set).
        ``candidates`` (C,) restricts the working set to those expert ids (one domain's experts, DESIGN §3):
        the top-S of them by router mass, each token takes its top-k inside, and experts no token took are
        dropped (so no expert trains on zero tokens); the mass is then only computed for the C candidates.
        """
        scores = self.proj(h).float().split(self.keys, dim=-1)  # (N, n1), (N, n2)
        log_probs = [F.log_softmax(s, dim=-1) for s in scores]
        if candidates is not None:
            working_set, positions = self._within(log_probs, candidates, expert_slots, mass_hook)
        elif expert_slots >= self.num_experts:
            working_set, positions = self._per_token_topk(log_probs, mass_hook)
        else:
            mass = self._mass([lp.detach().exp() for lp in log_probs])  # (n,)
            if mass_hook is not None:
                mass = mass_hook(mass)
            working_set = mass.topk(expert_slots).indices  # (S,)
            in_set = self._log_prob_at(log_probs, working_set).detach()  # (N, S)
            positions = in_set.topk(self.k, dim=-1).indices  # (N, k)
        if self.gate == "router":
            chosen = self._value_at(scores, working_set[positions])  # (N, k) summed key logits
            gates = F.softmax(chosen, dim=-1)  # (N, k)
        else:
            gates = torch.full(positions.shape, 1.0 / self.k, device=h.device)  # (N, k)
        prob_in_set = self._mean_prob(log_probs, working_set)  # (S,) P_i
        fraction = torch.bincount(positions.flatten(), minlength=working_set.numel()).float() / positions.numel()
        balance_loss = self.num_experts * (fraction * prob_in_set).sum()  # fraction: (S,) f_i
        return Routing(working_set, positions, gates, balance_loss)

    @torch.no_grad()
    def expert_mass(self, h: torch.Tensor) -> torch.Tensor:
        """Router probability mass of every expert summed over the tokens ``h`` (N, d): (n,)."""
        scores = self.proj(h).float().split(self.keys, dim=-1)
        return self._mass([F.softmax(s, dim=-1) for s in scores])  # (n,)

    def _within(
        self, log_probs: list[torch.Tensor], candidates: torch.Tensor, expert_slots: int, mass_hook: MassHook | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k > candidates.numel():
            raise ValueError(f"{candidates.numel()} candidate experts cannot give each token k={self.k}")
        mass = self._log_prob_at(log_probs, candidates).detach().exp().sum(dim=0)  # (C,)
        if mass_hook is not None:
            mass = mass_hook(mass)
        working_set = candidates[mass.topk(min(expert_slots, candidates.numel())).indices]  # (S,)
        positions = self._log_prob_at(log_probs, working_set).detach().topk(self.k, dim=-1).indices  # (N, k)
        taken = torch.bincount(positions.flatten(), minlength=working_set.numel()).float()  # (S,)
        if mass_hook is not None:
            taken = mass_hook(taken)
        kept = taken > 0
        new_position = kept.long().cumsum(0) - 1  # (S,) position among the kept experts
        return working_set[kept], new_position[positions]  # (S',), (N, k)

    def _split(self, experts: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "flat":
            return [experts]
        return [experts // self.keys[1], experts % self.keys[1]]

    def _log_prob_at(self, per_key: list[torch.Tensor], experts: torch.Tensor) -> torch.Tensor:
        """Sum over key sets of ``per_key[m][:, key_m(e)]`` for each expert e: (N, len(experts))."""
        return sum(values[:, idx] for values, idx in zip(per_key, self._split(experts)))

    def _value_at(self, per_key: list[torch.Tensor], experts: torch.Tensor) -> torch.Tensor:
        """Sum over key sets of ``per_key[m][t, key_m(experts[t, j])]``: each token's own experts (N, k)."""
        return sum(values.gather(1, idx) for values, idx in zip(per_key, self._split(experts)))

    def _mean_prob(self, log_probs: list[torch.Tensor], experts: torch.Tensor) -> torch.Tensor:
        """Router probability of each of ``experts`` (S,) averaged over the tokens: (S,), differentiable.

        Product keys: ``mean_t p1_t(i)·p2_t(j)`` from the (U1, U2) block of ``P1ᵀ·P2`` over the keys the experts
        use, so nothing of size N·S is built (per-token routing has S up to N·k).
        """
        num_tokens = log_probs[0].size(0)
        if self.kind == "flat":
            return log_probs[0][:, experts].exp().mean(dim=0)  # (N, n) exists already
        (keys1, at1), (keys2, at2) = (idx.unique(return_inverse=True) for idx in self._split(experts))
        joint = log_probs[0][:, keys1].exp().t() @ log_probs[1][:, keys2].exp()  # (U1, U2) Σ_t p1_t(i)·p2_t(j)
        return joint[at1, at2] / num_tokens

    def _mass(self, probs: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "flat":
            return probs[0].sum(dim=0)  # (n,)
        joint = probs[0].t() @ probs[1]  # (n1, n2) Σ_t p1_t(i)·p2_t(j)
        return joint.flatten()[: self.num_experts]  # (n,)

    def _per_token_topk(
        self, log_probs: list[torch.Tensor], mass_hook: MassHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "flat":
            experts = log_probs[0].topk(self.k, dim=-1).indices  # (N, k)
        else:
            k1, k2 = (min(self.k, n) for n in self.keys)
            top1, top2 = log_probs[0].topk(k1, dim=-1), log_probs[1].topk(k2, dim=-1)
            combined = top1.values[:, :, None] + top2.values[:, None, :]  # (N, k1, k2)
            ids = top1.indices[:, :, None] * self.keys[1] + top2.indices[:, None, :]  # (N, k1, k2)
            combined = combined.masked_fill(ids >= self.num_experts, float("-inf")).flatten(1)
            best = combined.topk(self.k, dim=-1).indices  # (N, k)
            experts = ids.flatten(1).gather(1, best)  # (N, k)
        if mass_hook is None:
            working_set, inverse = experts.unique(return_inverse=True)
            return working_set, inverse  # (S,), (N, k)
        chosen = mass_hook(torch.bincount(experts.flatten(), minlength=self.num_experts).float())  # (n,)
        working_set = chosen.nonzero().squeeze(-1)  # (S,) every expert some token chose (on some rank)
        return working_set, torch.searchsorted(working_set, experts)  # (S,), (N, k)
