"""Baselines of DESIGN §7, built from the same blocks: a globally trained MoE and a dense model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from pragnosia_pl.lm_base import LanguageModel, check_positive
from pragnosia_pl.model import FeedForward, init_weights
from pragnosia_pl.router import Router


class GlobalMoE(LanguageModel):
    """Standard per-token top-k MoE: every expert resident, one loss backpropagated through everything.

    One AdamW over all parameters, automatic optimization. Same backbone, router and experts as
    ``PragnosiaLM``, so the two differ only in how experts learn and where they live.

    Args:
        vocab_size: token ids (256: bytes).
        d_model: width d.
        n_shared_layers: causal trunk blocks.
        n_heads: attention heads.
        num_experts: n.
        num_active_experts: k, experts per token.
        expert_hidden: hidden width of each FFN expert; default 4·d.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        balance_coef: α of the load-balancing term.
        gate: ``router`` or ``uniform``.
        router: ``flat`` (standard) or ``product``.
        max_len: longest sequence the rotary table covers.

    Raises:
        ValueError: on an inconsistent configuration; the message names the YAML key.

    Example::

        baseline = GlobalMoE(d_model=128, num_experts=32, num_active_experts=2)
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_shared_layers: int = 2,
        n_heads: int = 4,
        num_experts: int = 32,
        num_active_experts: int = 2,
        expert_hidden: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        balance_coef: float = 0.01,
        gate: str = "router",
        router: str = "flat",
        max_len: int = 1024,
    ) -> None:
        super().__init__(vocab_size, d_model, n_shared_layers, n_heads, lr, weight_decay, max_len)
        self.save_hyperparameters()
        hidden = 4 * d_model if expert_hidden is None else expert_hidden
        check_positive(num_experts=num_experts, num_active_experts=num_active_experts, expert_hidden=hidden)
        if num_active_experts > num_experts:
            raise ValueError(
                f"model.num_active_experts ({num_active_experts}) must be ≤ model.num_experts ({num_experts})"
            )
        self.router = Router(d_model, num_experts, num_active_experts, gate=gate, router=router)
        self.experts = nn.ModuleList(FeedForward(d_model, hidden) for _ in range(num_experts))
        self.experts.apply(init_weights)

    def _mix(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = tokens.shape
        h = self.backbone.trunk(tokens).flatten(0, 1)  # (N, d)
        routing = self.router(h, self.hparams.num_experts)  # per-token top-k over all n
        mixture = torch.zeros_like(h)  # (N, d)
        for position, expert_id in enumerate(routing.working_set.tolist()):
            token_idx, gate = routing.tokens_of(position)
            expert_out = self.experts[expert_id](h[token_idx])  # (N_e, d)
            mixture = mixture.index_add(0, token_idx, gate[:, None] * expert_out)
        logits = self.backbone.logits(h + mixture).view(B, T, -1)  # (B, T, V)
        return logits, routing.balance_loss

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


class DenseLM(LanguageModel):
    """The trunk plus one FFN with the active parameters of k experts (hidden width k · expert_hidden).

    Args:
        vocab_size: token ids (256: bytes).
        d_model: width d.
        n_shared_layers: causal trunk blocks.
        n_heads: attention heads.
        num_active_experts: k of the MoE it is compared with.
        expert_hidden: hidden width of one expert of that MoE; default 4·d.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        max_len: longest sequence the rotary table covers.

    Raises:
        ValueError: on a non-positive size; the message names the YAML key.

    Example::

        dense = DenseLM(d_model=128, num_active_experts=2)  # FFN hidden width 2·4·128
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_shared_layers: int = 2,
        n_heads: int = 4,
        num_active_experts: int = 2,
        expert_hidden: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        max_len: int = 1024,
    ) -> None:
        super().__init__(vocab_size, d_model, n_shared_layers, n_heads, lr, weight_decay, max_len)
        self.save_hyperparameters()
        hidden = 4 * d_model if expert_hidden is None else expert_hidden
        check_positive(num_active_experts=num_active_experts, expert_hidden=hidden)
        self.ffn = FeedForward(d_model, num_active_experts * hidden)
        self.ffn.apply(init_weights)

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.backbone.trunk(tokens)  # (B, T, d)
        return self.backbone.logits(h + self.ffn(h))  # (B, T, V)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss
