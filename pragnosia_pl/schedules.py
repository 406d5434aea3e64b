"""Learning-rate schedules, and how a schedule reaches the experts' optimizer.

Lightning steps no scheduler under manual optimization, so every model of the package steps its own once per
training step (:func:`step_schedulers`); ``PragnosiaLM``'s experts take the shared optimizer's factor
(:func:`schedule_factor`), so ``exact`` stays ``GlobalMoE``'s update under any schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Linear warmup from 0 to the optimizer's learning rate, then a cosine decay to ``min_lr_ratio`` of it at
    ``total_steps``, constant after. Stepped once per training step.

    Args:
        optimizer: the optimizer whose learning rates it scales.
        warmup_steps: steps of the linear warmup (0: none).
        total_steps: the step at which the cosine ends; ``None``: the run's optimizer steps
            (``trainer.estimated_stepping_batches``, i.e. ``trainer.max_steps``), filled in by ``pragnosia fit``.
        min_lr_ratio: the final learning rate as a fraction of the peak.
        last_epoch: the index of the last step (-1: a fresh schedule).

    Raises:
        ValueError: on a negative warmup, ``total_steps`` ≤ ``warmup_steps`` or a ratio outside [0, 1].

    Example::

        pragnosia fit --config configs/streamed.yaml --lr_scheduler pragnosia_pl.WarmupCosine \\
            --lr_scheduler.warmup_steps 50 --lr_scheduler.total_steps 1000
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps ({warmup_steps}) must be ≥ 0")
        if total_steps is not None and total_steps <= warmup_steps:
            raise ValueError(
                f"lr_scheduler.total_steps ({total_steps}) must be > lr_scheduler.warmup_steps ({warmup_steps})"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_ratio ({min_lr_ratio}) must be in [0, 1]")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the peak learning rate at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step == self.warmup_steps:
            return 1.0
        if self.total_steps is None:
            raise ValueError("lr_scheduler.total_steps is not set (pragnosia fit sets it to the run's steps)")
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]


def with_warmup_cosine(model: Any, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> Any:
    """``model`` (a LightningModule of the package) trained under :class:`WarmupCosine`, stepped once per training
    step: what ``pragnosia fit --lr_scheduler pragnosia_pl.WarmupCosine`` sets up, for a ``Trainer`` of one's own.

    Example::

        model = with_warmup_cosine(PragnosiaLM(objective="exact", expert_optimizer="adam"), 50, 1000)
        Trainer(max_steps=1000).fit(model, datamodule=TextDomains())
    """
    own = model.configure_optimizers

    def configure() -> dict[str, Any]:
        optimizer = own()
        scheduler = WarmupCosine(optimizer, warmup_steps, total_steps, min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model.configure_optimizers = configure
    return model


def fill_total_steps(scheduler: object, total_steps: int) -> None:
    """A :class:`WarmupCosine` without ``total_steps`` ends its cosine at the run's last step, ``total_steps``."""
    if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
        if total_steps <= scheduler.warmup_steps:  # a short try of a long recipe: warm up over its first tenth
            shortened = total_steps // 10
            rank_zero_warn(
                f"lr_scheduler.warmup_steps ({scheduler.warmup_steps}) does not fit in the run's {total_steps} steps: "
                f"{shortened} for this run"
            )
            scheduler.warmup_steps = shortened
            scheduler.last_epoch -= 1
            scheduler.step()  # the first step's learning rate under the shortened warmup
        scheduler.total_steps = max(total_steps, 1)


def schedule_factor(optimizer: torch.optim.Optimizer) -> float:
    """The shared optimizer's learning rate now, relative to its value before any schedule (1 without one)."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr", group["lr"])
    return float(group["lr"]) / float(initial) if initial else 1.0
