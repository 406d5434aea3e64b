"""Fail a run whose per-step peak memory grows after warm-up."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from . import _memory

_MODES = ("raise", "warn")
_MIB = 2**20


class MemoryGrowthError(RuntimeError):
    """Per-step peak memory grew beyond what :class:`ConstantMemoryGuard` tolerates."""


class ConstantMemoryGuard(Callback):
    r"""Fail a run whose per-step peak memory grows: the check behind "device memory is constant in n".

    Each training step is bracketed like in :class:`~callbacks.MemoryMonitor` (peak reset before the step,
    read after it): the CUDA peak when the module is on a CUDA device, else the process's peak RSS within the
    step. With ``metric`` set, the guard reads that key of ``trainer.callback_metrics`` instead (e.g.
    ``"memory/cuda_peak_mib"`` logged by a ``MemoryMonitor`` listed *before* the guard); a key ending in
    ``_mib`` is read as MiB, any other as bytes.

    The first ``warmup_steps`` steps are ignored (allocator caches, optimizer state, dataloader workers). The
    *baseline* is the largest peak of the ``baseline_steps`` steps after them. From then on, a step is a
    violation when:

    - **drift**: its peak > ``baseline × (1 + tolerance)``;
    - **trend**: the least-squares line through the last ``window`` peaks after warm-up rises by more than
      ``tolerance × baseline`` across the window (a steady leak, even one hidden in noise);
    - **cap**: its peak > ``max_bytes`` (checked from the first step, warm-up included).

    ``mode="raise"`` raises :class:`MemoryGrowthError` at the first violation; ``mode="warn"`` warns once
    per kind and counts them in :attr:`violations`. At the end of training the guard reports the coefficient
    of variation and the slope of the peaks after warm-up (``rank_zero_info`` and the loggers, under
    ``memory_guard/``). Its state is per process and is not checkpointed: a resumed run warms up again.

    Args:
        warmup_steps: training steps ignored before the baseline is taken.
        tolerance: allowed relative growth over the baseline, e.g. ``0.05`` for 5 %.
        max_bytes: absolute cap on the per-step peak, in bytes; ``None`` for no cap.
        mode: ``"raise"`` or ``"warn"``.
        metric: key of ``trainer.callback_metrics`` to read instead of measuring (MiB if it ends in ``_mib``,
            else bytes); ``None`` to measure.
        window: number of post-warm-up steps the trend is fitted over.
        baseline_steps: number of post-warm-up steps whose largest peak is the baseline.

    Attributes:
        baseline: the baseline peak in bytes, once taken.
        peaks: the per-step peaks after warm-up, in bytes.
        cv: standard deviation / mean of :attr:`peaks`, set at the end of training.
        slope: least-squares slope of :attr:`peaks`, bytes per step, set at the end of training.
        violations: count of violations per kind (``"drift"``, ``"trend"``, ``"max_bytes"``).

    Raises:
        ValueError: if an argument is out of range or ``mode`` is not one of the choices; if ``metric`` is
            set but not among the logged metrics.
        MemoryGrowthError: in ``mode="raise"``, when memory grows (see above).

    Example::

        from lightning.pytorch import Trainer
        from callbacks import ConstantMemoryGuard

        guard = ConstantMemoryGuard(warmup_steps=20, tolerance=0.05, max_bytes=8 * 2**30)
        trainer = Trainer(callbacks=[guard])
        trainer.fit(model)
        print(guard.cv, guard.slope)
    """

    def __init__(
        self,
        warmup_steps: int = 10,
        tolerance: float = 0.05,
        max_bytes: int | None = None,
        mode: str = "raise",
        metric: str | None = None,
        window: int = 50,
        baseline_steps: int = 5,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"ConstantMemoryGuard.mode ({mode!r}) must be one of {', '.join(map(repr, _MODES))}")
        if not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise ValueError(f"ConstantMemoryGuard.tolerance ({tolerance!r}) must be > 0, e.g. 0.05 for 5 %")
        for name, value, low in (
            ("warmup_steps", warmup_steps, 0),
            ("window", window, 2),
            ("baseline_steps", baseline_steps, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ConstantMemoryGuard.{name} ({value!r}) must be an integer ≥ {low}")
        if max_bytes is not None and not max_bytes > 0:
            raise ValueError(f"ConstantMemoryGuard.max_bytes ({max_bytes!r}) must be > 0 bytes, or None for no cap")
        self.warmup_steps = warmup_steps
        self.tolerance = float(tolerance)
        self.max_bytes = max_bytes
        self.mode = mode
        self.metric = metric
        self.window = window
        self.baseline_steps = baseline_steps
        self._reset()

    def _reset(self) -> None:
        self.baseline: float | None = None
        self.peaks: list[float] = []
        self.cv: float | None = None
        self.slope: float | None = None
        self.violations: dict[str, int] = {"drift": 0, "trend": 0, "max_bytes": 0}
        self._steps_seen = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.metric is None:
            _memory.reset_peak(pl_module.device)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps_seen += 1
        peak = self._read_peak(trainer, pl_module)
        step = trainer.global_step
        if self.max_bytes is not None and peak > self.max_bytes:
            self._violation(
                "max_bytes",
                f"per-step peak memory at step {step} is {_fmt(peak)}, above "
                f"ConstantMemoryGuard.max_bytes {_fmt(self.max_bytes)} (baseline {_fmt(self.baseline)}, "
                f"tolerance {self.tolerance:g})",
            )
        if self._steps_seen <= self.warmup_steps:
            return
        self.peaks.append(peak)
        if len(self.peaks) <= self.baseline_steps:
            self.baseline = max(self.peaks)
            return
        assert self.baseline is not None
        limit = self.baseline * (1 + self.tolerance)
        if peak > limit:
            self._violation(
                "drift",
                f"per-step peak memory at step {step} is {_fmt(peak)}, above the baseline {_fmt(self.baseline)} "
                f"× (1 + tolerance {self.tolerance:g}) = {_fmt(limit)}",
            )
        if len(self.peaks) >= self.window:
            slope = linear_slope(self.peaks[-self.window :])
            rise = slope * (self.window - 1)
            if rise > self.tolerance * self.baseline:
                self._violation(
                    "trend",
                    f"per-step peak memory trends upward at step {step}: +{slope:,.0f} bytes/step over the last "
                    f"{self.window} steps, a rise of {_fmt(rise)} > tolerance {self.tolerance:g} × baseline "
                    f"{_fmt(self.baseline)}; measured {_fmt(peak)}",
                )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.peaks) < 2:
            rank_zero_info(
                f"ConstantMemoryGuard: {len(self.peaks)} step(s) after {self.warmup_steps} warm-up steps; "
                "too few for CV and slope"
            )
            return
        mean = sum(self.peaks) / len(self.peaks)
        std = math.sqrt(sum((p - mean) ** 2 for p in self.peaks) / len(self.peaks))
        self.cv = std / mean if mean else 0.0
        self.slope = linear_slope(self.peaks)
        rank_zero_info(
            f"ConstantMemoryGuard: {len(self.peaks)} steps after warm-up, per-step peak mean {_fmt(mean)}, "
            f"baseline {_fmt(self.baseline)}, CV {self.cv:.2%}, slope {self.slope:+,.0f} bytes/step"
        )
        metrics = {"memory_guard/cv": self.cv, "memory_guard/slope_bytes_per_step": self.slope}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _read_peak(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        if self.metric is None:
            peak = _memory.step_peak(_memory.read_memory(pl_module.device))
            if peak is None:
                raise RuntimeError(
                    "ConstantMemoryGuard cannot read this process's memory on this platform; set "
                    "ConstantMemoryGuard.metric to a logged per-step peak"
                )
            return peak
        if self.metric not in trainer.callback_metrics:
            raise ValueError(
                f"ConstantMemoryGuard.metric ({self.metric!r}) is not among the logged metrics "
                f"{sorted(trainer.callback_metrics)}; list the callback that logs it (e.g. MemoryMonitor) before "
                "the guard in trainer.callbacks, or leave metric unset so the guard measures memory itself"
            )
        value = float(trainer.callback_metrics[self.metric])
        return value * _MIB if self.metric.endswith("_mib") else value

    def _violation(self, kind: str, message: str) -> None:
        self.violations[kind] += 1
        message = f"ConstantMemoryGuard: {message}"
        if self.mode == "raise":
            raise MemoryGrowthError(message)
        if self.violations[kind] == 1:
            rank_zero_warn(f"{message} (ConstantMemoryGuard mode='warn': warned once, counted in .violations)")


def linear_slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (0, 1, 2, ...)."""
    n = len(values)
    if n < 2:
        return 0.0
    x_mean = (n - 1) / 2
    y_mean = sum(values) / n
    covariance = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values))
    variance = sum((i - x_mean) ** 2 for i in range(n))
    return covariance / variance


def _fmt(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "not yet taken"
    return f"{num_bytes:,.0f} bytes ({num_bytes / _MIB:,.1f} MiB)"
