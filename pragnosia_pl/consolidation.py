"""What ``PragnosiaLM`` keeps when the training domain changes, so that it does not forget (``experts_per_domain``).

Trained on domains in sequence, the local-learning MoE forgets through two paths: the router keeps sending the new
domain to the experts an earlier domain trained, and the shared parts (embedding, trunk, head, router) keep adapting
to the newest domain. The policy closes both, told of each switch by ``on_domain_switch`` (``DomainSwitcher``):

- each domain trains a group of ``experts_per_domain`` experts of its own, chosen on its first batch as those with
  the most router mass among the experts no earlier domain trained; a closed group is never trained again;
- at each switch the closing domain keeps a copy of the shared parameters as they were at its end (O(shared)
  floats, off the device), and the live ones go on learning the next domain at full rate.

Evaluation needs no domain label: each known domain's model (its experts, and its copy of the shared parts or the
live ones) predicts every token, and the predictions are averaged with the posterior weight of the domain given the
sequence so far, ``p(g | x_≤t) ∝ Π_{u≤t} p_g(x_u | x_<u)``, with a share :data:`DOMAIN_SWITCH_RATE` of the weight
spread evenly after each token, so a sequence may change domain midway (fixed share). It costs one forward per known
domain.

The state is O(domains × (experts_per_domain + shared parameters)), independent of the number of experts n.
Shape letters: B batch, T time, V vocabulary, G known domains, m experts per domain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# α, the chance per token that the domain changes within a sequence, for evaluation's average of the domains' models
DOMAIN_SWITCH_RATE = 0.01
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(values: torch.Tensor) -> torch.Tensor:
    return values


@dataclass(eq=False)  # compared by identity: fields are tensors
class DomainGroup:
    """One domain as the model knows it: its experts and its copy of the shared parameters."""

    experts: torch.Tensor | None = None  # (m,) expert ids, sorted; None until its first batch
    shared: list[torch.Tensor] | None = None  # the shared parameters at the domain's end, on the CPU


class EvalDomain(NamedTuple):
    """What evaluation runs for one known domain: its experts, and its shared parameters (``None``: the live ones)."""

    experts: torch.Tensor  # (m,)
    shared: list[torch.Tensor] | None


class Consolidation:
    """The consolidation policy of one ``PragnosiaLM``: a group of protected experts and a copy of the shared
    parameters per domain.

    ``groups[-1]`` is the open group (the domain being trained); the others are closed.

    Args:
        experts_per_domain: m, the experts each domain trains (``model.experts_per_domain``).
        num_experts: n.
        num_active_experts: k.

    Raises:
        ValueError: if ``experts_per_domain`` is below k or above n; the message names the YAML key.

    Example::

        policy = Consolidation(experts_per_domain=8, num_experts=32, num_active_experts=2)
        candidates = policy.training_candidates(h, router)  # (m,) the experts this domain may train
        policy.switch(step=300, parameters=model.parameters(), previous="code", new="docs")  # close the domain
        for domain in policy.eval_domains(): ...  # each known domain's experts and shared parameters
    """

    def __init__(self, experts_per_domain: int, num_experts: int, num_active_experts: int) -> None:
        if not num_active_experts <= experts_per_domain <= num_experts:
            raise ValueError(
                f"model.experts_per_domain ({experts_per_domain}) must be between model.num_active_experts "
                f"({num_active_experts}) and model.num_experts ({num_experts}), or null (no consolidation)"
            )
        self.experts_per_domain = experts_per_domain
        self.num_experts = num_experts
        self.groups: list[DomainGroup] = [DomainGroup()]
        self.switches: list[dict[str, Any]] = []  # every switch that closed a domain: step, previous and new names

    @property
    def protected(self) -> torch.Tensor | None:
        """Ids of the experts of closed domains (never trained again), or ``None``."""
        closed = [g.experts for g in self.groups[:-1]]
        return torch.cat(closed) if closed else None

    # --------------------------------------------------------------------------------------------- training

    def training_candidates(self, h: torch.Tensor, router: Any, reduce: Reduce = _no_reduce) -> torch.Tensor:
        """The experts the open domain may train (m,), chosen on its first batch ``h`` (N, d): the m with the most
        router mass on that batch among those no closed domain trained (``reduce`` sums the mass across ranks).

        Raises:
            ValueError: when fewer than m experts are left unprotected.
        """
        group = self.groups[-1]
        if group.experts is None:
            mass = reduce(router.expert_mass(h.detach())).clone()  # (n,)
            protected = self.protected
            free = self.num_experts - (0 if protected is None else protected.numel())
            if free < self.experts_per_domain:
                raise ValueError(
                    f"domain {len(self.groups)} needs model.experts_per_domain ({self.experts_per_domain}) "
                    f"unprotected experts but only {free} of model.num_experts ({self.num_experts}) are left; raise "
                    "model.num_experts or lower model.experts_per_domain"
                )
            if protected is not None:
                mass[protected.to(mass.device)] = -math.inf
            group.experts = mass.topk(self.experts_per_domain).indices.sort().values  # (m,)
        return group.experts.to(h.device)

    def switch(self, step: int, parameters: Iterable[torch.Tensor], previous: str, new: str) -> bool:
        """The domain changed: close the open group (its experts become protected; it keeps a CPU copy of
        ``parameters``, the live shared ones) and open a new one. A group not trained on yet stays open. Returns
        whether a switch happened."""
        closing = self.groups[-1]
        if closing.experts is None:
            return False
        closing.shared = [p.detach().to("cpu", copy=True) for p in parameters]
        self.groups.append(DomainGroup())
        self.switches.append({"step": step, "previous": previous, "new": new})
        return True

    # ------------------------------------------------------------------------------------------- evaluation

    def eval_domains(self) -> list[EvalDomain]:
        """Each known domain's experts and shared parameters (``None``: the live ones, for the open domain)."""
        return [EvalDomain(g.experts, g.shared) for g in self.groups if g.experts is not None]

    @staticmethod
    def mix(
        log_probs: list[torch.Tensor], tokens: torch.Tensor, switch_rate: float = DOMAIN_SWITCH_RATE
    ) -> torch.Tensor:
        """Average the domains' predictions (G × (B, T, V) log-probabilities) by their weight given the prefix.

        Domain g's weight at position t starts uniform and follows the evidence of the inputs ``tokens`` (B, T) up
        to t only, ``p_g(x_u | x_<u)``: after each token's Bayesian update a share α = ``switch_rate`` (0 < α < 1)
        is spread evenly over the domains (fixed share, Herbster & Warmuth). Returns log-probabilities (B, T, V).
        """
        if len(log_probs) == 1:
            return log_probs[0]
        stacked = torch.stack(log_probs)  # (G, B, T, V)
        G, B, T, _ = stacked.shape
        seen = tokens[None, :, 1:, None].expand(G, B, T - 1, 1)  # (G, B, T-1, 1) the next input token
        evidence = stacked[:, :, :-1].gather(-1, seen).squeeze(-1)  # (G, B, T-1) log p_g(x_t+1 | x_≤t)
        log_w = torch.full((G, B), -math.log(G), device=stacked.device)  # (G, B)
        share = torch.full_like(log_w, math.log(switch_rate / G))  # (G, B) log(α / G)
        steps = [log_w]
        for t in range(T - 1):
            posterior = (log_w + evidence[:, :, t]).log_softmax(dim=0)  # (G, B)
            log_w = torch.logaddexp(posterior + math.log1p(-switch_rate), share)  # (1-α)·posterior + α/G
            steps.append(log_w)
        weights = torch.stack(steps, dim=-1)  # (G, B, T)
        return (weights[..., None] + stacked).logsumexp(dim=0)  # (B, T, V)

    # ---------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        groups = [{"experts": None if g.experts is None else g.experts.cpu(), "shared": g.shared} for g in self.groups]
        return {"groups": groups, "switches": list(self.switches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = [DomainGroup(**group) for group in state["groups"]]
        self.switches = list(state["switches"])

    def summary(self) -> dict[str, Any]:
        """JSON-ready: each known domain's experts and whether it keeps its own shared parameters, and the switches."""
        domains = [
            {"experts": g.experts.tolist(), "shared_snapshot": g.shared is not None}
            for g in self.groups
            if g.experts is not None
        ]
        return {"domains": domains, "switches": self.switches}
