"""Per-step memory panels in MiB: device and host memory within each training step, plus the module's own counters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from . import _memory

_MIB = 2**20
_MOVED = re.compile(r"^(?P<stem>.*)bytes_(?P<direction>in|out)$")  # a module's cumulative count of bytes moved


class MemoryMonitor(Callback):
    r"""Log the memory each training step needs, and keep it in :attr:`history`.

    Before a step the peaks are reset; after it they are read, so a *peak* is the peak within that step
    (DESIGN §6). Logged under ``prefix``, in MiB (2**20 bytes):

    - ``rss_mib``, ``peak_rss_mib``: the process's resident set now and its peak within the step
      (``VmRSS``/``VmHWM``; the peak is reset through ``/proc/self/clear_refs``. Where that is not possible,
      ``peak_rss_mib`` is the peak of the whole process so far, from ``resource.getrusage``).
    - ``cuda_allocated_mib``, ``cuda_reserved_mib``, ``cuda_peak_mib``: when the module is on a CUDA
      device; the peak is ``torch.cuda.max_memory_allocated`` within the step.
    - every key of ``pl_module.memory_stats()`` when the module has that method (a flat ``dict[str, float]``,
      e.g. resident experts, cache hits). A key ending in ``bytes_in`` or ``bytes_out`` is taken as a running
      total of bytes moved and logged as the MiB moved within the step: ``bytes_in`` as ``mib_in_per_step``,
      ``store_bytes_out`` as ``store_mib_out_per_step``.

    Values go through ``pl_module.log(..., on_step=True)``, so they reach the loggers at the Trainer's
    ``log_every_n_steps`` cadence and are in ``trainer.callback_metrics``. With a ``TensorBoardLogger`` a
    custom-scalars layout is written too: TensorBoard's *Custom Scalars* tab shows a "Memory" section with
    current against peak in one chart (host, and CUDA when used), the MiB moved in and out per step in
    another, and the module's other counters in a third.

    The raw readings stay in :attr:`history`: bytes (``rss_bytes``, ``peak_rss_bytes``, ``cuda_peak_bytes``,
    ...) and the module's counters as ``memory_stats()`` returned them (running totals).

    Resetting the host peak resets the kernel's peak of the whole process: ``getrusage`` and ``/usr/bin/time``
    then report the peak since the last step only. ``callbacks.process_peak_rss()`` returns the lifelong peak.

    Args:
        every_n_steps: measure every this many training batches.
        prefix: prepended to every logged key.

    Attributes:
        history: one dict per measured step: ``"step"`` (``trainer.global_step`` after the step) and the raw
            readings (bytes, the module's running totals). Not checkpointed; it starts empty in each process.

    Raises:
        ValueError: if ``every_n_steps`` is not a positive integer, or ``prefix`` is empty.
        TypeError: if ``pl_module.memory_stats()`` does not return a mapping of str to numbers.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import MemoryMonitor

        monitor = MemoryMonitor(every_n_steps=10)
        trainer = Trainer(callbacks=[monitor], log_every_n_steps=10)
        trainer.fit(model)
        peaks = [row["peak_rss_bytes"] for row in monitor.history]  # bytes
    """

    def __init__(self, every_n_steps: int = 1, prefix: str = "memory/") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"MemoryMonitor.every_n_steps ({every_n_steps!r}) must be an integer ≥ 1")
        if not prefix:
            raise ValueError("MemoryMonitor.prefix must be a non-empty string such as 'memory/'")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self._batches_seen = 0
        self._measuring = False
        self._stats_before_step: dict[str, float] = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches_seen = 0
        layout = memory_layout(
            self.prefix,
            on_cuda=pl_module.device.type == "cuda",
            module_stats=callable(getattr(pl_module, "memory_stats", None)),
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._write_layout(logger, layout)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._measuring = self._batches_seen % self.every_n_steps == 0
        if self._measuring:
            self._stats_before_step = module_memory_stats(pl_module)
            _memory.reset_peak(pl_module.device)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_seen += 1
        if not self._measuring:
            return
        reading = _memory.read_memory(pl_module.device)
        module_stats = module_memory_stats(pl_module)
        panels = {key.removesuffix("_bytes") + "_mib": value / _MIB for key, value in reading.items()}
        for key, value in module_stats.items():
            moved = _MOVED.match(key)
            if moved:
                step_bytes = value - self._stats_before_step.get(key, 0.0)
                panels[f"{moved['stem']}mib_{moved['direction']}_per_step"] = step_bytes / _MIB
            else:
                panels[key] = value
        pl_module.log_dict({self.prefix + k: v for k, v in panels.items()}, on_step=True, on_epoch=False)
        self.history.append({"step": float(trainer.global_step), **reading, **module_stats})

    @rank_zero_only
    def _write_layout(self, logger: TensorBoardLogger, layout: dict[str, dict[str, list]]) -> None:
        writer = logger.experiment
        if hasattr(writer, "add_custom_scalars"):
            writer.add_custom_scalars(layout)


def module_memory_stats(pl_module: pl.LightningModule) -> dict[str, float]:
    """``pl_module.memory_stats()`` as ``dict[str, float]``; empty when the module has no such method."""
    memory_stats = getattr(pl_module, "memory_stats", None)
    if not callable(memory_stats):
        return {}
    stats = memory_stats()
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"{type(pl_module).__name__}.memory_stats() must return a flat dict[str, float], got {type(stats).__name__}"
        )
    try:
        return {str(key): float(value) for key, value in stats.items()}
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{type(pl_module).__name__}.memory_stats() must return a flat dict[str, float] (numbers only): {err}"
        ) from err


def memory_layout(prefix: str, on_cuda: bool, module_stats: bool) -> dict[str, dict[str, list]]:
    """The "Memory" category of TensorBoard's custom-scalars layout, as ``SummaryWriter.add_custom_scalars`` takes.

    Charts are ``Multiline`` with regular expressions over the logged tags, so they fill in with whatever keys
    the module's ``memory_stats()`` returns (``module_stats``: whether it has that method).
    """
    p = re.escape(prefix)
    own = "rss_mib|peak_rss_mib|cuda_allocated_mib|cuda_reserved_mib|cuda_peak_mib"
    charts: dict[str, list] = {
        "host memory: current vs peak within step (MiB)": ["Multiline", [rf"^{p}(rss_mib|peak_rss_mib)$"]],
    }
    if on_cuda:
        charts["CUDA memory: allocated, reserved, peak within step (MiB)"] = [
            "Multiline",
            [rf"^{p}cuda_(allocated|reserved|peak)_mib$"],
        ]
    if module_stats:
        charts["MiB moved in/out per step"] = ["Multiline", [rf"^{p}.*mib_(in|out)_per_step$"]]
        charts["module memory counters"] = ["Multiline", [rf"^{p}(?!({own})$)(?!.*mib_(in|out)_per_step$).+$"]]
    return {"Memory": charts}
