"""What ``PragnosiaLM`` keeps when the training domain changes, so that it does not forget (DESIGN §3).

Trained on domains in sequence, the local-learning MoE forgets through two paths: the shared parts
(embedding, trunk, head, router) keep adapting to the newest domain, and the router keeps sending the new
domain to the experts an earlier domain trained. The policy has a switch for each path and one for noticing a
new domain:

- ``protect_experts``: each domain trains a group of ``experts_per_domain`` experts of its own, chosen on its
  first batch as those with the most router mass among the experts no earlier domain trained; a closed group
  is never trained again. This is the issue's claim made true: new domains go to other experts and old ones
  are not touched.
- the shared parts: either slowed or frozen after the first domain (``shared_lr_factor``; 0 freezes, which
  costs the later domains most of their plasticity), or kept per domain (``snapshot_shared``): at each switch
  the domain keeps a copy of the shared parameters as they were at its end (O(shared) floats, off the device),
  and the live ones go on learning the next domain at full rate.
- ``novelty="auto"``: a new domain is detected rather than told, from a shift of the training loss: a batch
  whose loss under the current model (trunk and head, before any update) lies more than ``novelty_threshold``
  standard deviations above the open domain's running level starts a new domain.

With protected experts, evaluation needs no domain label: each known domain's model (its experts, and its copy
of the shared parts or the live ones) predicts every token, and the predictions are averaged with the posterior
weight of the domain given the sequence so far, ``p(g | x_≤t) ∝ Π_{u≤t} p_g(x_u | x_<u)`` (a Bayesian model
average: causal, and per sequence at most ``log G`` nats worse than the right domain's model alone). It costs
one forward per known domain.

The state is O(domains × (experts_per_domain + shared parameters)), independent of the number of experts n.
Shape letters: B batch, T time, V vocabulary, G known domains, m experts per domain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

NOVELTY = ("told", "auto")
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(values: torch.Tensor) -> torch.Tensor:
    return values


@dataclass
class ConsolidationConfig:
    """Switches of the consolidation policy (YAML: ``model.consolidation``); the defaults change nothing.

    Args:
        shared_lr_factor: after the first domain switch the live shared parts (embedding, trunk, head, router)
            learn at ``lr`` × this; 0 freezes them.
        protect_experts: each domain trains its own ``experts_per_domain`` experts, never an earlier domain's;
            evaluation averages the domains' models by their posterior given the prefix.
        experts_per_domain: m, experts a domain may train (``protect_experts``); default ``expert_slots``.
        snapshot_shared: each domain keeps its own copy of the shared parameters, taken at its end; needs
            ``protect_experts``.
        domain_switch_rate: α, the chance per token that the domain changes within a sequence, for evaluation's
            average of the domains' models (fixed-share weights; 0: one domain per sequence, a plain posterior).
        novelty: ``told`` (a switch happens when ``on_domain_switch`` is called) or ``auto`` (detected from the
            training loss; ``on_domain_switch`` is only recorded).
        novelty_threshold: z-score of a batch's loss above the open domain's running level that marks a new one.
        novelty_warmup: batches a domain must have been trained on before a new one can be detected.
        stats_momentum: EMA momentum of the running loss level and spread.

    Raises:
        ValueError: on a value out of range; the message names the YAML key.
    """

    shared_lr_factor: float = 1.0
    protect_experts: bool = False
    experts_per_domain: int | None = None
    snapshot_shared: bool = False
    domain_switch_rate: float = 0.0
    novelty: str = "told"
    novelty_threshold: float = 4.0
    novelty_warmup: int = 50
    stats_momentum: float = 0.9

    @classmethod
    def of(cls, value: ConsolidationConfig | dict[str, Any] | None) -> ConsolidationConfig:
        """``value`` itself, the config a mapping of its fields describes, or the defaults for ``None``."""
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(**value)

    def __post_init__(self) -> None:
        key = "model.consolidation"
        if not 0.0 <= self.shared_lr_factor <= 1.0:
            raise ValueError(f"{key}.shared_lr_factor ({self.shared_lr_factor}) must be in [0, 1]")
        if self.experts_per_domain is not None and self.experts_per_domain < 1:
            raise ValueError(f"{key}.experts_per_domain ({self.experts_per_domain}) must be ≥ 1 or null")
        if self.snapshot_shared and not self.protect_experts:
            raise ValueError(
                f"{key}.snapshot_shared needs {key}.protect_experts: true (a domain's copy of the shared parts is "
                "only worth keeping with experts that stay as that domain left them)"
            )
        if not 0.0 <= self.domain_switch_rate < 1.0:
            raise ValueError(f"{key}.domain_switch_rate ({self.domain_switch_rate}) must be in [0, 1)")
        if self.novelty not in NOVELTY:
            raise ValueError(f"{key}.novelty ({self.novelty!r}) must be one of: {', '.join(NOVELTY)}")
        if self.novelty_threshold <= 0:
            raise ValueError(f"{key}.novelty_threshold ({self.novelty_threshold}) must be > 0")
        if self.novelty_warmup < 1:
            raise ValueError(f"{key}.novelty_warmup ({self.novelty_warmup}) must be ≥ 1")
        if not 0.0 < self.stats_momentum < 1.0:
            raise ValueError(f"{key}.stats_momentum ({self.stats_momentum}) must be in (0, 1)")


@dataclass(eq=False)  # compared by identity: fields are tensors
class DomainGroup:
    """One domain as the model knows it: its experts, its copy of the shared parameters, its loss level.

    ``loss_mean``/``loss_sq_mean`` are EMAs of the batch loss and its square, each measured before the batch
    was trained on.
    """

    experts: torch.Tensor | None = None  # (m,) expert ids, sorted; None until its first batch
    shared: list[torch.Tensor] | None = None  # the shared parameters at the domain's end, on the CPU
    loss_mean: float = 0.0
    loss_sq_mean: float = 0.0
    batches: int = 0

    def loss_std(self) -> float:
        return math.sqrt(max(self.loss_sq_mean - self.loss_mean**2, 1e-6))


class EvalDomain(NamedTuple):
    """What evaluation runs for one known domain: its experts, and its shared parameters (``None``: the live ones)."""

    experts: torch.Tensor  # (m,)
    shared: list[torch.Tensor] | None


class Consolidation:
    """The consolidation policy of one ``PragnosiaLM``: domain groups, protected experts, novelty detection.

    ``groups[-1]`` is the open group (the domain being trained); the others are closed.

    Args:
        config: the switches.
        num_experts: n.
        num_active_experts: k.
        expert_slots: S, the default of ``experts_per_domain``.

    Raises:
        ValueError: if ``experts_per_domain`` is below k or above n; the message names the YAML key.

    Example::

        policy = Consolidation(ConsolidationConfig(protect_experts=True, snapshot_shared=True), 32, 2, 8)
        candidates = policy.training_candidates(h, router)  # (m,) the experts this domain may train
        policy.observe(loss, step=0, parameters=model.parameters())  # True when a new domain was detected
        policy.switch(step=300, reason="told", parameters=model.parameters())  # close the domain
        for domain in policy.eval_domains(): ...  # each known domain's experts and shared parameters
    """

    def __init__(
        self, config: ConsolidationConfig, num_experts: int, num_active_experts: int, expert_slots: int
    ) -> None:
        self.config = config
        self.num_experts = num_experts
        self.experts_per_domain = expert_slots if config.experts_per_domain is None else config.experts_per_domain
        if config.protect_experts and not num_active_experts <= self.experts_per_domain <= num_experts:
            raise ValueError(
                f"model.consolidation.experts_per_domain ({self.experts_per_domain}) must be between "
                f"model.num_active_experts ({num_active_experts}) and model.num_experts ({num_experts})"
            )
        self.groups: list[DomainGroup] = [DomainGroup()]
        self.switches: list[dict[str, Any]] = []  # every switch that happened: step, reason, domains when told
        self.told: list[dict[str, Any]] = []  # every on_domain_switch call, acted on or not
        self.last_z: float | None = None  # the last batch's loss z-score against the open domain's level

    @property
    def enabled(self) -> bool:
        """Whether the policy changes anything at all (the defaults reproduce DESIGN §3's plain step)."""
        c = self.config
        return c.shared_lr_factor != 1.0 or c.protect_experts or c.novelty == "auto"

    @property
    def detects_novelty(self) -> bool:
        return self.config.novelty == "auto"

    @property
    def shared_lr_factor(self) -> float:
        """Factor on the live shared learning rate now: 1 until the first switch, then ``shared_lr_factor``."""
        return self.config.shared_lr_factor if self.switches else 1.0

    @property
    def protected(self) -> torch.Tensor | None:
        """Ids of the experts of closed domains (never trained again), or ``None``."""
        closed = [g.experts for g in self.groups[:-1] if g.experts is not None]
        return torch.cat(closed) if closed else None

    # --------------------------------------------------------------------------------------------- training

    def observe(self, loss: float, step: int, parameters: Iterable[torch.Tensor] = ()) -> bool:
        """Take a training batch's loss before any update (the same on every rank); ``novelty="auto"``: test it.

        A batch more than ``novelty_threshold`` standard deviations above the open domain's running loss
        switches to a new domain (``parameters``: the live shared ones, for its snapshot). Returns whether it did.
        """
        group = self.groups[-1]
        self.last_z = (loss - group.loss_mean) / group.loss_std() if group.batches > 1 else None
        switched = (
            self.detects_novelty
            and group.batches >= self.config.novelty_warmup
            and self.last_z > self.config.novelty_threshold
        )
        if switched:
            self.switch(step, reason="novelty", parameters=parameters)
            group = self.groups[-1]
        if group.batches == 0:
            group.loss_mean, group.loss_sq_mean = loss, loss * loss
        else:
            beta = self.config.stats_momentum
            group.loss_mean = beta * group.loss_mean + (1 - beta) * loss
            group.loss_sq_mean = beta * group.loss_sq_mean + (1 - beta) * loss * loss
        group.batches += 1
        return switched

    def training_candidates(self, h: torch.Tensor, router: Any, reduce: Reduce = _no_reduce) -> torch.Tensor | None:
        """The experts the open domain may train (m,), chosen on its first batch ``h`` (N, d); ``None``: any.

        They are the m experts with the most router mass on that batch among those no closed domain trained.

        Raises:
            ValueError: when fewer than m experts are left unprotected.
        """
        if not self.config.protect_experts:
            return None
        group = self.groups[-1]
        if group.experts is None:
            mass = reduce(router.expert_mass(h.detach())).clone()  # (n,)
            protected = self.protected
            free = self.num_experts - (0 if protected is None else protected.numel())
            if free < self.experts_per_domain:
                raise ValueError(
                    f"domain {len(self.groups)} needs model.consolidation.experts_per_domain "
                    f"({self.experts_per_domain}) unprotected experts but only {free} of model.num_experts "
                    f"({self.num_experts}) are left; raise model.num_experts or lower experts_per_domain"
                )
            if protected is not None:
                mass[protected.to(mass.device)] = -math.inf
            group.experts = mass.topk(self.experts_per_domain).indices.sort().values  # (m,)
        return group.experts.to(h.device)

    def switch(
        self,
        step: int,
        reason: str,
        parameters: Iterable[torch.Tensor] = (),
        previous: str | None = None,
        new: str | None = None,
    ) -> bool:
        """The domain changed: close the open group (its experts become protected) and open a new one.

        ``snapshot_shared``: the closing domain keeps a CPU copy of ``parameters`` (the live shared ones). A group
        not trained on yet stays open. Returns whether a switch happened.
        """
        closing = self.groups[-1]
        if closing.batches == 0:
            return False
        if self.config.snapshot_shared:
            closing.shared = [p.detach().to("cpu", copy=True) for p in parameters]
        self.groups.append(DomainGroup())
        self.switches.append({"step": step, "reason": reason, "previous": previous, "new": new})
        return True

    def on_domain_switch(self, step: int, previous: str, new: str, parameters: Iterable[torch.Tensor] = ()) -> bool:
        """A switch announced from outside (``DomainSwitcher``): acted on with ``novelty="told"``, else recorded."""
        self.told.append({"step": step, "previous": previous, "new": new})
        if self.detects_novelty or not self.enabled:
            return False
        return self.switch(step, reason="told", parameters=parameters, previous=previous, new=new)

    # ------------------------------------------------------------------------------------------- evaluation

    def eval_domains(self) -> list[EvalDomain] | None:
        """Each known domain's experts and shared parameters; ``None`` without protected experts (plain routing)."""
        if not self.config.protect_experts:
            return None
        known = [g for g in self.groups if g.experts is not None]
        if not known:
            return None
        return [EvalDomain(g.experts, g.shared) for g in known]

    @staticmethod
    def mix(log_probs: list[torch.Tensor], tokens: torch.Tensor, switch_rate: float = 0.0) -> torch.Tensor:
        """Average the domains' predictions (G × (B, T, V) log-probabilities) by their posterior given the prefix.

        Domain g's weight at position t is ``p(g | x_≤t) ∝ Π_{1≤u≤t} p_g(x_u | x_<u)`` under a uniform prior: it
        uses the inputs ``tokens`` (B, T) up to t only. With ``switch_rate`` α > 0 the weights are fixed-share
        (Herbster & Warmuth): after each token's update a share α is spread evenly over the domains, so a sequence
        may change domain midway. Returns log-probabilities (B, T, V).
        """
        if len(log_probs) == 1:
            return log_probs[0]
        stacked = torch.stack(log_probs)  # (G, B, T, V)
        G, B, T, _ = stacked.shape
        seen = tokens[None, :, 1:, None].expand(G, B, T - 1, 1)  # (G, B, T-1, 1) the next input token
        evidence = stacked[:, :, :-1].gather(-1, seen).squeeze(-1)  # (G, B, T-1) log p_g(x_t+1 | x_≤t)
        if switch_rate == 0:
            weights = F.pad(evidence.cumsum(-1), (1, 0)).log_softmax(dim=0)  # (G, B, T) log posterior
        else:
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
        return {
            "groups": [
                {
                    "experts": None if g.experts is None else g.experts.cpu(),
                    "shared": g.shared,
                    "loss_mean": g.loss_mean,
                    "loss_sq_mean": g.loss_sq_mean,
                    "batches": g.batches,
                }
                for g in self.groups
            ],
            "switches": list(self.switches),
            "told": list(self.told),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = [DomainGroup(**group) for group in state["groups"]]
        self.switches = list(state["switches"])
        self.told = list(state["told"])

    def summary(self) -> dict[str, Any]:
        """JSON-ready: each domain's experts and batches, and the switches (told and happened)."""
        return {
            "domains": [
                {
                    "experts": None if g.experts is None else g.experts.tolist(),
                    "batches": g.batches,
                    "shared_snapshot": g.shared is not None,
                }
                for g in self.groups
                if g.batches > 0
            ],
            "switches": self.switches,
            "told": self.told,
        }
