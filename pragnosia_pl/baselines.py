"""Baselines of DESIGN §7, built from the same blocks: a globally trained MoE and a dense model.

Fair by construction: with the same ``seed`` they start from ``PragnosiaLM``'s weights (backbone and router from
the seed, expert e from ``(seed, e)``) and get the same shared AdamW and the same ``grad_clip``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from pragnosia_pl.experts import ExpertLayout, FlatSGD, feed_forward_expert
from pragnosia_pl.lm_base import LanguageModel, check_positive, router_stream, seeded
from pragnosia_pl.model import FeedForward, Placement, init_weights
from pragnosia_pl.router import Router


class GlobalMoE(LanguageModel):
    """Standard per-token top-k MoE: every expert resident, one loss backpropagated through everything.

    One AdamW over all parameters (betas (0.9, 0.95), no weight decay), automatic optimization.
    Same backbone, router and experts as ``PragnosiaLM``, from the same ``seed``; an expert without tokens keeps
    its gradient ``None``, so AdamW neither moves it nor decays its state (the lazy Adam of PragnosiaLM's
    experts). Each layer gathers its (token, expert) pairs once, each expert runs on its rows of them, and one
    scatter adds the gated outputs back. ``grad_clip`` clips the shared parameters by their own norm and each
    expert routed to since the last optimizer step by its own (one norm and one scaling over all of them), as
    ``PragnosiaLM(objective="exact")`` does: with the same seed, data and clipping the two train identically.

    Args:
        d_model: width d.
        n_shared_layers: causal trunk blocks.
        n_heads: attention heads.
        num_experts: n.
        num_active_experts: k, experts per token.
        expert_hidden: hidden width of each FFN expert; default 4·d.
        lr: AdamW learning rate.
        balance_coef: α of the load-balancing term.
        router: ``flat`` (standard) or ``product``.
        grad_clip: max norm of the shared gradient and of each expert's (0 disables).
        seed: the backbone and router come from ``seed``, expert e from ``(seed, e)``.
        expert_layers: where the expert layers sit: ``top`` (one after the last block), ``every_other`` or ``every``
            (in place of those blocks' feed-forward), as ``PragnosiaLM``'s; expert e of layer l is ``(seed, l·n + e)``.
        vocab_size: V, token ids; ``pragnosia fit`` links it to ``data.vocab_size`` (256: bytes).

    Raises:
        ValueError: on an inconsistent configuration; the message names the YAML key.

    Example::

        baseline = GlobalMoE(d_model=128, num_experts=32, num_active_experts=2, seed=0)
    """

    def __init__(
        self,
        d_model: int = 128,
        n_shared_layers: int = 2,
        n_heads: int = 4,
        num_experts: int = 32,
        num_active_experts: int = 2,
        expert_hidden: int | None = None,
        lr: float = 1e-3,
        balance_coef: float = 0.01,
        router: Literal["flat", "product"] = "flat",
        grad_clip: float = 1.0,
        seed: int = 0,
        expert_layers: Placement = "top",
        vocab_size: int = 256,
    ) -> None:
        super().__init__(d_model, n_shared_layers, n_heads, lr, seed, grad_clip, expert_layers, vocab_size)
        self.save_hyperparameters()
        hidden = 4 * d_model if expert_hidden is None else expert_hidden
        check_positive(num_experts=num_experts, num_active_experts=num_active_experts, expert_hidden=hidden)
        if num_active_experts > num_experts:
            raise ValueError(
                f"model.num_active_experts ({num_active_experts}) must be ≤ model.num_experts ({num_experts})"
            )
        self.routers = nn.ModuleList()
        for layer in range(len(self.placement.after)):
            with seeded(seed, router_stream(layer)):
                self.routers.append(Router(d_model, num_experts, num_active_experts, router=router))
        layout = ExpertLayout(lambda: feed_forward_expert(d_model, hidden), FlatSGD(0.0), seed)
        # expert e of layer l at l·n + e, as in PragnosiaLM's store
        self.experts = nn.ModuleList(FeedForward(d_model, hidden) for _ in range(num_experts * len(self.routers)))
        for expert_id, expert in enumerate(self.experts):
            torch.nn.utils.vector_to_parameters(layout.init_params(expert_id), expert.parameters())
        self.step_working_set: set[int] = set()  # experts (l·n + e) routed to since the last optimizer step

    @override
    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.routers.parameters()]

    def _mix(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.backbone.embed_tokens(tokens)  # (B, T, d)
        balance_losses = []
        n = self.hparams.num_experts
        for layer, (start, stop) in enumerate(self.segments[:-1]):
            x = self.backbone.run_blocks(x, start, stop)
            h = x.flatten(0, 1)  # (N, d)
            routing = self.routers[layer](h)  # per-token top-k over all n
            groups = routing.groups()
            if self.training and torch.is_grad_enabled():
                self.step_working_set.update(layer * n + expert_id for expert_id in groups.expert_ids)
            inputs = h[groups.token_idx]  # (N·k, d) every (token, expert) pair, grouped by expert
            # split, not a slice per expert: a slice's backward builds an (N·k, d) gradient for each expert
            sizes = [stop - start for start, stop in zip(groups.offsets, groups.offsets[1:])]
            outputs = torch.cat(
                [
                    self.experts[layer * n + expert_id](rows)  # (N_e, d)
                    for expert_id, rows in zip(groups.expert_ids, inputs.split(sizes))
                ]
            )  # (N·k, d)
            mixture = torch.zeros_like(h).index_add_(0, groups.token_idx, groups.gates[:, None] * outputs)  # (N, d)
            x = (h + mixture).view_as(x)
            balance_losses.append(routing.balance_loss)
        logits = self.backbone.logits(self.backbone.run_blocks(x, *self.segments[-1]))  # (B, T, V)
        return logits, torch.stack(balance_losses).mean()

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._mix(tokens)[0]

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        logits, balance_loss = self._mix(tokens)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/balance_loss", balance_loss.detach())
        return lm_loss + self.hparams.balance_coef * balance_loss

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.clip_shared_gradients()
        touched = [self.experts[expert_id] for expert_id in sorted(self.step_working_set)]
        self.step_working_set.clear()
        if self.hparams.grad_clip > 0:
            _clip_each_expert(touched, self.hparams.grad_clip)


def _clip_each_expert(experts: list[nn.Module], max_norm: float) -> None:
    """Clip each expert's gradient by its own norm, as ``clip_grad_norm_(expert.parameters(), max_norm)`` on each
    would, in one norm and one scaling over all of them. Experts no backward reached (gradient ``None``) are skipped.
    """
    experts = [expert for expert in experts if next(expert.parameters()).grad is not None]
    if not experts:
        return
    grads = [p.grad for expert in experts for p in expert.parameters()]
    norms = torch.stack(torch._foreach_norm(grads)).view(len(experts), -1)  # (S, P): P tensors per expert
    coefficients = (max_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)  # (S,)
    torch._foreach_mul_(grads, list(coefficients.repeat_interleave(norms.size(1)).unbind()))


class DenseLM(LanguageModel):
    """The trunk plus one FFN with the active parameters of k experts (hidden width k · expert_hidden).

    Args:
        d_model: width d.
        n_shared_layers: causal trunk blocks.
        n_heads: attention heads.
        num_active_experts: k of the MoE it is compared with.
        expert_hidden: hidden width of one expert of that MoE; default 4·d.
        lr: AdamW learning rate.
        grad_clip: max norm of the gradient (0 disables).
        seed: the backbone comes from ``seed`` (as in every model), the FFN from ``(seed, 2)``.
        expert_layers: where the MoE it is compared with has its expert layers: the FFN of k experts' width sits
            there (``top``: one after the last block; ``every_other``, ``every``: in place of those blocks').
        vocab_size: V, token ids; ``pragnosia fit`` links it to ``data.vocab_size`` (256: bytes).

    Raises:
        ValueError: on a non-positive size; the message names the YAML key.

    Example::

        dense = DenseLM(d_model=128, num_active_experts=2)  # FFN hidden width 2·4·128
    """

    def __init__(
        self,
        d_model: int = 128,
        n_shared_layers: int = 2,
        n_heads: int = 4,
        num_active_experts: int = 2,
        expert_hidden: int | None = None,
        lr: float = 1e-3,
        grad_clip: float = 1.0,
        seed: int = 0,
        expert_layers: Placement = "top",
        vocab_size: int = 256,
    ) -> None:
        super().__init__(d_model, n_shared_layers, n_heads, lr, seed, grad_clip, expert_layers, vocab_size)
        self.save_hyperparameters()
        hidden = 4 * d_model if expert_hidden is None else expert_hidden
        check_positive(num_active_experts=num_active_experts, expert_hidden=hidden)
        self.ffns = nn.ModuleList()
        for layer in range(len(self.placement.after)):
            with seeded(seed, 2 if layer == 0 else 2**10 + layer):
                self.ffns.append(FeedForward(d_model, num_active_experts * hidden))
                self.ffns[-1].apply(init_weights)

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.backbone.embed_tokens(tokens)  # (B, T, d)
        for ffn, (start, stop) in zip(self.ffns, self.segments[:-1]):
            x = self.backbone.run_blocks(x, start, stop)
            x = x + ffn(x)
        return self.backbone.logits(self.backbone.run_blocks(x, *self.segments[-1]))  # (B, T, V)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.clip_shared_gradients()
