"""Tokens per second of every training step, in the loggers and the progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def count_tokens(batch: Any) -> int:
    """Tokens in a batch: the element count of its inputs (the batch itself if a tensor, its first item if a tuple
    or list, its ``"input_ids"`` if a mapping)."""
    inputs = batch
    if isinstance(batch, Mapping):
        inputs = batch.get("input_ids", next(iter(batch.values()), None))
    elif isinstance(batch, (tuple, list)):
        inputs = batch[0] if batch else None
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"TokenThroughput cannot count the tokens of a {type(batch).__name__} batch; give count_tokens=fn(batch)"
        )
    return inputs.numel()


class TokenThroughput(Callback):
    r"""Log the tokens per second of each training step, measured from its start to its end.

    Logged through ``pl_module.log`` (so in TensorBoard and, with ``prog_bar``, the progress bar):

    - ``<prefix>tokens_per_s``: the step's tokens on every process (``count_tokens(batch)`` × world size) over its
      wall time, from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward and every optimizer
      step, also under manual optimization; CUDA is synchronised at both ends).
    - ``<prefix>step_time_s``: that wall time.

    Lightning's ``ThroughputMonitor`` logs through ``logger.log_metrics`` only, so it never reaches the progress
    bar, and it times from batch end to batch end (data loading included); this callback times the step alone.

    Args:
        prefix: prepended to the logged keys.
        prog_bar: show tokens/s in the progress bar.
        count_tokens: tokens of a batch; default :func:`count_tokens` (the inputs' element count).

    Attributes:
        history: one dict per step: ``step`` (``trainer.global_step`` after it), ``tokens``, ``seconds``.
            Not checkpointed.

    Raises:
        ValueError: if ``prefix`` is empty.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import TokenThroughput

        trainer = Trainer(callbacks=[TokenThroughput()])  # logs train/tokens_per_s and train/step_time_s
    """

    def __init__(
        self, prefix: str = "train/", prog_bar: bool = True, count_tokens: Callable[[Any], int] = count_tokens
    ) -> None:
        if not prefix:
            raise ValueError("TokenThroughput.prefix must be a non-empty string such as 'train/'")
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.count_tokens = count_tokens
        self.history: list[dict[str, float]] = []
        self._start: float | None = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        _synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start
        self._start = None
        tokens = self.count_tokens(batch) * trainer.world_size
        self.history.append({"step": float(trainer.global_step), "tokens": float(tokens), "seconds": seconds})
        pl_module.log(
            f"{self.prefix}tokens_per_s", tokens / seconds, on_step=True, on_epoch=False, prog_bar=self.prog_bar
        )
        pl_module.log(f"{self.prefix}step_time_s", seconds, on_step=True, on_epoch=False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
