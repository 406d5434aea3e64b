"""The learning rate of every optimizer, the module's own included, in the loggers and the progress bar."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class LearningRates(Callback):
    r"""Log, before each training step, the learning rate that step uses, for every optimizer.

    Keys, as Lightning's ``LearningRateMonitor`` names them: ``lr-<OptimizerClass>`` for each optimizer of
    ``trainer.optimizers`` (``lr-<OptimizerClass>/pg<i>`` when it has several parameter groups, ``-<j>`` after the
    class for a second optimizer of the same class), plus ``lr-<name>`` for every item of the module's optional
    ``learning_rates() -> dict[str, float]``: optimizers Lightning does not know of, such as per-expert optimizers
    stepped in ``training_step``. Values go through ``pl_module.log``, so they reach TensorBoard and, with
    ``prog_bar``, the progress bar (``LearningRateMonitor`` logs through the loggers only). With manual
    optimization a schedule is stepped in ``training_step``; logged before the step, the value is the one the
    step's update uses when the schedule steps after the optimizer.

    Args:
        prog_bar: show the learning rates in the progress bar.

    Raises:
        TypeError: if ``pl_module.learning_rates()`` does not return a mapping of str to numbers.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import LearningRates

        trainer = Trainer(callbacks=[LearningRates()])  # lr-AdamW, and lr-<name> per module.learning_rates()
    """

    def __init__(self, prog_bar: bool = True) -> None:
        self.prog_bar = prog_bar

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rates = optimizer_learning_rates(trainer.optimizers)
        rates.update({f"lr-{name}": value for name, value in module_learning_rates(pl_module).items()})
        if rates:
            pl_module.log_dict(rates, on_step=True, on_epoch=False, prog_bar=self.prog_bar)


def optimizer_learning_rates(optimizers: list[Any]) -> dict[str, float]:
    """``lr-<OptimizerClass>[-<j>][/pg<i>]`` to the learning rate of each parameter group of each optimizer."""
    rates: dict[str, float] = {}
    seen: Counter[str] = Counter()
    for optimizer in optimizers:
        name = f"lr-{type(optimizer).__name__}"
        seen[name] += 1
        if seen[name] > 1:
            name = f"{name}-{seen[name] - 1}"
        groups = optimizer.param_groups
        for index, group in enumerate(groups):
            rates[name if len(groups) == 1 else f"{name}/pg{index + 1}"] = float(group["lr"])
    return rates


def module_learning_rates(pl_module: pl.LightningModule) -> dict[str, float]:
    """``pl_module.learning_rates()`` as ``dict[str, float]``; empty when the module has no such method."""
    learning_rates = getattr(pl_module, "learning_rates", None)
    if not callable(learning_rates):
        return {}
    rates = learning_rates()
    if not isinstance(rates, Mapping):
        raise TypeError(
            f"{type(pl_module).__name__}.learning_rates() must return a dict[str, float], got {type(rates).__name__}"
        )
    try:
        return {str(key): float(value) for key, value in rates.items()}
    except (TypeError, ValueError) as err:
        raise TypeError(f"{type(pl_module).__name__}.learning_rates() must return numbers: {err}") from err
