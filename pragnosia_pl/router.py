"""Routing: the router scores the n experts, each token takes its top-k, and a step visits its experts in id order.

Shape legend: N = B·T tokens, d width, n experts, k experts per token, S experts touched by the step
(S ≤ min(n, N·k)), C candidate experts, n1·n2 ≥ n the two key sets of the product-key router.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ROUTERS = ("product", "flat")
SCORE_BUDGET = 1 << 18  # router scores (floats) held at once: tokens are scored in chunks of this / (n1 + n2)


class ExpertGroups(NamedTuple):
    """The step's (token, expert) pairs grouped by expert, experts in ascending id order.

    Expert ``expert_ids[s]`` owns the rows ``offsets[s]:offsets[s + 1]`` of ``token_idx`` and ``gates``.
    """

    expert_ids: list[int]  # (S,) ascending
    offsets: list[int]  # (S + 1,)
    token_idx: torch.Tensor  # (N·k,) token of each pair, ascending within an expert
    gates: torch.Tensor  # (N·k,) its gate, differentiable w.r.t. the router

    def rows(self, position: int) -> slice:
        return slice(self.offsets[position], self.offsets[position + 1])


class Routing(NamedTuple):
    """One routing decision.

    ``working_set[s]`` is the s-th touched expert (ascending ids); ``positions[t, j]`` is the position of
    token t's j-th expert in it and ``gates[t, j]`` its weight (differentiable w.r.t. the router).
    """

    working_set: torch.Tensor  # (S,) expert ids, ascending
    positions: torch.Tensor  # (N, k) into working_set
    gates: torch.Tensor  # (N, k)
    balance_loss: torch.Tensor  # () n·Σ f_i·P_i, without α

    def groups(self) -> ExpertGroups:
        """Every (token, expert) pair sorted by expert: one host sync for the whole step, not one per expert."""
        k = self.positions.size(1)
        order = self.positions.flatten().argsort(stable=True)  # (N·k,)
        counts = torch.bincount(self.positions.flatten(), minlength=self.working_set.numel())  # (S,)
        offsets = [0, *torch.cumsum(counts, 0).tolist()]
        return ExpertGroups(self.working_set.tolist(), offsets, order // k, self.gates.flatten()[order])


MassHook = Callable[[torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """Per-token top-k router over n experts, optionally within a cap of S experts per step.

    ``router="flat"`` is the standard linear router (logits over all n: its parameters and its (N, n)
    activations grow with n). ``router="product"`` scores experts with product keys: expert
    ``e = i·n2 + j`` has logit ``a_i + b_j`` from two linear maps of size n1, n2 ≈ √n, so its softmax
    factorises ``p(e) = p1(i)·p2(j)`` and nothing of size N·n is ever built. That keeps the shared parts of
    the model, and device memory, flat in n. Gates are the softmax over each token's chosen logits.

    Args:
        d_model: width d of the hidden states it reads.
        num_experts: n.
        num_active_experts: k, experts per token.
        router: ``"product"`` or ``"flat"``.

    Raises:
        ValueError: if ``router`` is not one of its choices.

    Example::

        router = Router(d_model=64, num_experts=1024, num_active_experts=2)
        routing = router(h)  # each token its top-2 of all 1024 experts
        groups = routing.groups()  # the touched experts in id order, each with all of its tokens
    """

    def __init__(
        self, d_model: int, num_experts: int, num_active_experts: int, router: Literal["product", "flat"] = "product"
    ) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"model.router ({router!r}) must be one of: {', '.join(ROUTERS)}")
        self.num_experts = num_experts
        self.k = num_active_experts
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
        expert_slots: int | None = None,
        mass_hook: MassHook | None = None,
        candidates: torch.Tensor | None = None,
    ) -> Routing:
        """Route each token of ``h`` (N, d) to its top-k experts.

        ``expert_slots`` S caps the distinct experts of the step: the S with the most router mass over the
        batch, inside which each token takes its top-k (``None``: no cap, each token its top-k of all n).
        ``candidates`` (C,) restricts every choice to those expert ids (one domain's experts, DESIGN §3).
        ``mass_hook`` receives per-expert sums (router mass, tokens taken) and returns the sums to decide on:
        distributed training all-reduces them, so every rank visits the same experts (the union of theirs).

        Tokens are scored in chunks of at most :data:`SCORE_BUDGET` / (n1 + n2), and the differentiable part
        (gates, the balance term's P_i) is recomputed per chunk in the backward pass, so the router holds no
        (N, n1 + n2) tensor: its memory does not grow with n, nor with N beyond its (N, k) outputs.
        """
        parts = h.split(max(1, SCORE_BUDGET // sum(self.keys)))
        pool = candidates
        with torch.no_grad():
            if expert_slots is not None and expert_slots < (self.num_experts if pool is None else pool.numel()):
                mass = self._mass(parts, pool)  # (n,) or (C,)
                if mass_hook is not None:
                    mass = mass_hook(mass)
                top = mass.topk(expert_slots).indices  # (S,)
                pool = top if pool is None else pool[top]
            if pool is not None and self.k > pool.numel():
                raise ValueError(f"{pool.numel()} candidate experts cannot give each token k={self.k}")
            chosen = torch.cat([self._choose(self._log_probs(part), pool) for part in parts])  # (N, k) ids
        working_set = self._touched(chosen, mass_hook)  # (S,) ascending
        positions = torch.searchsorted(working_set, chosen)  # (N, k)
        keys = [idx.unique(return_inverse=True) for idx in self._split(working_set)]  # per key set: (U,), (S,)
        gates, prob_sum = [], 0.0
        for part, chosen_part in zip(parts, chosen.split(parts[0].size(0))):
            if len(parts) > 1 and torch.is_grad_enabled():
                outputs = checkpoint(self._gates_and_mass, part, chosen_part, keys, use_reentrant=False)
            else:
                outputs = self._gates_and_mass(part, chosen_part, keys)
            gates.append(outputs[0])
            prob_sum = prob_sum + outputs[1]
        prob_in_set = prob_sum / h.size(0)  # (S,) P_i
        fraction = torch.bincount(positions.flatten(), minlength=working_set.numel()).float() / positions.numel()
        balance_loss = self.num_experts * (fraction * prob_in_set).sum()  # fraction: (S,) f_i
        return Routing(working_set, positions, torch.cat(gates), balance_loss)

    def _log_probs(self, h: torch.Tensor) -> list[torch.Tensor]:
        return self._key_log_probs(self.proj(h).float().split(self.keys, dim=-1))  # (N, n1), (N, n2)

    def _key_log_probs(self, scores: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Per key set log-probabilities whose products are each token's distribution over the n experts.

        Product keys with n < n1·n2: the pairs of the last row past column r (ids ≥ n) do not exist, so the joint
        ``p1(i)·p2(j)`` is renormalised over the real experts, ``Z_t = 1 - p1_t(last)·Σ_{j ≥ r} p2_t(j)``, folded into
        the first key set (``log p1 - log Z``). Without it a share of the mass falls on ids ≥ n, and the balance
        term, which sums the mass of real experts only, is lowered by moving mass there.
        """
        log_probs = [F.log_softmax(s, dim=-1) for s in scores]
        if self.kind == "flat" or self.num_experts == self.keys[0] * self.keys[1]:
            return log_probs
        lp1, lp2 = log_probs
        r = self.num_experts - (self.keys[0] - 1) * self.keys[1]  # real columns of the last row
        phantom = lp1[:, -1] + torch.logsumexp(lp2[:, r:], dim=-1)  # (N,) log of the mass on ids ≥ n
        log_z = torch.log1p(-phantom.exp().clamp(max=1 - 1e-6))  # (N,)
        return [lp1 - log_z[:, None], lp2]

    def _mass(self, parts: tuple[torch.Tensor, ...], pool: torch.Tensor | None) -> torch.Tensor:
        """Router probability mass summed over the tokens of ``parts``: of every expert (n,), or of the ``pool``
        (C,), accumulated in place chunk by chunk."""
        size = (
            self.keys
            if pool is None and self.kind == "product"
            else (self.num_experts if pool is None else pool.numel(),)
        )
        mass = parts[0].new_zeros(size, dtype=torch.float32)
        for part in parts:
            log_probs = self._log_probs(part)
            if pool is not None:
                mass += self._log_prob_at(log_probs, pool).exp().sum(dim=0)  # (C,)
            elif self.kind == "flat":
                mass += log_probs[0].exp().sum(dim=0)  # (n,)
            else:
                mass.addmm_(log_probs[0].exp().t(), log_probs[1].exp())  # (n1, n2) Σ_t p1_t(i)·p2_t(j)
        return mass.flatten()[: self.num_experts]

    def _choose(self, log_probs: list[torch.Tensor], pool: torch.Tensor | None) -> torch.Tensor:
        """Each token's top-k expert ids: of all n, or of the ``pool``: (N, k)."""
        if pool is None:
            return self._per_token_topk(log_probs)
        return pool[self._log_prob_at(log_probs, pool).topk(self.k, dim=-1).indices]

    def _gates_and_mass(
        self, h: torch.Tensor, chosen: torch.Tensor, keys: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates (N, k), the softmax over each token's chosen summed key logits, and Σ_t p_t(e) for the working
        set's experts (S,) (product keys: from the (U1, U2) block of ``P1ᵀ·P2`` over the keys the experts use,
        so nothing of size N·S is built), both differentiable."""
        scores = self.proj(h).float().split(self.keys, dim=-1)  # (N, n1), (N, n2)
        gates = F.softmax(self._value_at(scores, chosen), dim=-1)  # (N, k)
        probs = [log_p.exp() for log_p in self._key_log_probs(scores)]  # no mass on ids ≥ n
        if self.kind == "flat":
            ((experts, _),) = keys
            return gates, probs[0][:, experts].sum(dim=0)  # (S,)
        (keys1, at1), (keys2, at2) = keys
        joint = probs[0][:, keys1].t() @ probs[1][:, keys2]  # (U1, U2) Σ_t p1_t(i)·p2_t(j)
        return gates, joint[at1, at2]  # (S,)

    def _touched(self, chosen: torch.Tensor, mass_hook: MassHook | None) -> torch.Tensor:
        """The experts some token chose (on some rank, through ``mass_hook``), ascending: (S,)."""
        if mass_hook is None:
            return chosen.unique()
        taken = mass_hook(torch.bincount(chosen.flatten(), minlength=self.num_experts).float())  # (n,)
        return taken.nonzero().squeeze(-1)

    @torch.no_grad()
    def expert_mass(self, h: torch.Tensor) -> torch.Tensor:
        """Router probability mass of every expert summed over the tokens ``h`` (N, d): (n,)."""
        return self._mass(h.split(max(1, SCORE_BUDGET // sum(self.keys))), None)

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

    def _per_token_topk(self, log_probs: list[torch.Tensor]) -> torch.Tensor:
        """Each token's k most probable experts of all n: (N, k) ids.

        Product keys: expert ``i·n2 + j`` exists for every j in the rows i < n1 - 1 and for j < r in the last
        row (n = (n1 - 1)·n2 + r). A top-k expert of the full rows pairs a top-k row among them with a top-k
        column; one of the last row pairs it with a top-k column among the first r. Those ≤ k² + k
        candidates hold the exact top-k, and none of them is out of range.
        """
        if self.kind == "flat":
            return log_probs[0].topk(self.k, dim=-1).indices  # (N, k)
        lp1, lp2 = log_probs
        n1, n2 = self.keys
        last_row, r = n1 - 1, self.num_experts - (n1 - 1) * n2
        values, ids = [], []
        if last_row > 0:  # the full rows
            rows, cols = lp1[:, :last_row].topk(min(self.k, last_row)), lp2.topk(min(self.k, n2))
            values.append((rows.values[:, :, None] + cols.values[:, None, :]).flatten(1))  # (N, k1·k2)
            ids.append((rows.indices[:, :, None] * n2 + cols.indices[:, None, :]).flatten(1))
        cols = lp2[:, :r].topk(min(self.k, r))  # the last row
        values.append(lp1[:, last_row : last_row + 1] + cols.values)  # (N, kr)
        ids.append(last_row * n2 + cols.indices)
        best = torch.cat(values, dim=1).topk(self.k, dim=-1).indices  # (N, k)
        return torch.cat(ids, dim=1).gather(1, best)  # (N, k)
