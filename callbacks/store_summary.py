"""Lightning's model summary, plus the parameters a module keeps outside itself (an expert store)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from typing_extensions import override


class StoreModelSummary(ModelSummary):
    r"""Lightning's ``ModelSummary`` table, followed by the parameters the module holds outside its ``nn.Module``
    tree, which the table cannot see: those of experts that live in a store off the device.

    The module tells them through an optional ``parameters_in_store() -> dict[str, int]`` with ``total`` (every
    parameter in the store) and ``active`` (the store's parameters one token uses). Three lines follow the table::

        4.2 M     Params in the store (not in the table above)
        4.7 M     Total params, the store's included
        694 K     Active params per token (the table's + the store's per token)

    Without that method it prints Lightning's table alone.

    Args:
        max_depth: as ``ModelSummary``: the depth of submodules in the table (-1: all, 0: no summary).

    Example::

        from lightning.pytorch import Trainer
        from callbacks import StoreModelSummary

        trainer = Trainer(callbacks=[StoreModelSummary()])
    """

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        in_store = store_parameters(pl_module)
        if not self._max_depth or in_store is None:
            return
        in_module = sum(p.numel() for p in pl_module.parameters())
        rows = [
            (in_store["total"], "Params in the store (not in the table above)"),
            (in_module + in_store["total"], "Total params, the store's included"),
            (in_module + in_store["active"], "Active params per token (the table's + the store's per token)"),
        ]
        rank_zero_info("\n".join(f"{get_human_readable_count(count):<10}{text}" for count, text in rows))


def store_parameters(pl_module: pl.LightningModule) -> dict[str, int] | None:
    """``pl_module.parameters_in_store()`` checked: ``{"total": int, "active": int}``; ``None`` without the method."""
    method = getattr(pl_module, "parameters_in_store", None)
    if not callable(method):
        return None
    counts = method()
    if not isinstance(counts, Mapping) or not {"total", "active"} <= set(counts):
        raise TypeError(
            f"{type(pl_module).__name__}.parameters_in_store() must return a dict with 'total' and 'active' counts"
        )
    return {"total": int(counts["total"]), "active": int(counts["active"])}
