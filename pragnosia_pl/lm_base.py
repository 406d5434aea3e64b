"""What every language model of the package shares: the backbone, the shared optimizer and evaluation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from typing_extensions import override

from pragnosia_pl.model import Backbone


def check_positive(**sizes: int | float) -> None:
    """Raise ``ValueError`` naming the YAML key of the first size that is not positive."""
    for key, value in sizes.items():
        if value is None or value <= 0:
            raise ValueError(f"model.{key} ({value}) must be > 0")


class LanguageModel(LightningModule):
    """Base of ``PragnosiaLM``, ``GlobalMoE`` and ``DenseLM``: backbone, shared Adam, validation metrics.

    Subclasses implement ``forward(tokens) -> logits`` (evaluation path) and ``training_step``.
    Validation logs ``val/loss`` and ``val/bpb`` over all tokens and ``val/loss/<domain>``,
    ``val/bpb/<domain>`` per validation dataloader, named by the datamodule's ``val_domain_names``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_shared_layers: int,
        n_heads: int,
        lr: float,
        weight_decay: float,
        max_len: int,
    ) -> None:
        super().__init__()
        check_positive(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, lr=lr, max_len=max_len)
        if n_shared_layers < 0:
            raise ValueError(f"model.n_shared_layers ({n_shared_layers}) must be ≥ 0")
        if d_model % n_heads:
            raise ValueError(f"model.d_model ({d_model}) must be divisible by model.n_heads ({n_heads})")
        self.backbone = Backbone(vocab_size, d_model, n_shared_layers, n_heads, max_len)
        self.val_losses: dict[str, MeanMetric] = {}

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters trained by the shared optimizer."""
        return list(self.parameters())

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for p in self.shared_parameters() if p.dim() >= 2]
        no_decay = [p for p in self.shared_parameters() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.95))

    def val_domain_name(self, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "val_domain_names", None)
        return names[dataloader_idx] if names else str(dataloader_idx)

    @override
    def on_validation_epoch_start(self) -> None:
        self.val_losses = {}  # fresh each epoch: metrics reset under inference mode could not be updated later

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        tokens, targets = batch  # (B, T), (B, T)
        logits = self(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        for name in ("", self.val_domain_name(dataloader_idx)):
            if name not in self.val_losses:
                with torch.inference_mode(False):
                    self.val_losses[name] = MeanMetric(sync_on_compute=True).to(self.device)
            self.val_losses[name].update(loss.detach(), weight=targets.numel())
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_losses.items():
            loss = metric.compute()
            suffix = f"/{name}" if name else ""
            self.log(f"val/loss{suffix}", loss, prog_bar=not name, sync_dist=False)
            self.log(f"val/bpb{suffix}", loss / math.log(2), prog_bar=not name, sync_dist=False)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    @torch.no_grad()
    def generate(self, prompt: bytes, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int = 0) -> bytes:
        """Sample ``max_new_tokens`` bytes after ``prompt`` (constant memory: experts stream through the slots)."""
        check_positive(max_new_tokens=max_new_tokens, temperature=temperature)
        tokens = torch.tensor(list(prompt) or [10], dtype=torch.long, device=self.device)[None]  # (1, T)
        start = tokens.size(1)
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.hparams.max_len :])[0, -1] / temperature  # (V,)
            if top_k:
                logits[logits < logits.topk(top_k).values[-1]] = -math.inf
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1)  # (1,)
            tokens = torch.cat([tokens, next_token[None]], dim=1)
        return bytes(tokens[0, start:].tolist())
