"""MemoryMonitor and ConstantMemoryGuard with Lightning's demo model (DESIGN §6)."""

import re
import sys

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from callbacks import ConstantMemoryGuard, MemoryGrowthError, MemoryMonitor, _memory
from callbacks.memory_guard import linear_slope

MIB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-step RSS peaks need /proc")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_trainer(tmp_path, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return Trainer(**options)


class CountingModel(BoringModel):
    """Reports the counters an expert-offloading model would (DESIGN §11: ``memory_stats``): running totals of
    bytes moved, 3 MiB in every step and (2·step − 1) MiB out in step ``step``."""

    def memory_stats(self) -> dict[str, float]:
        steps = self.global_step
        return {"bytes_in": 3.0 * MIB * steps, "bytes_out": float(MIB * steps**2), "resident_experts": 2}


class LeakyModel(BoringModel):
    """Keeps a freshly written 8 MiB tensor alive after every step: its per-step peak RSS climbs."""

    def __init__(self) -> None:
        super().__init__()
        self.leaked: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.leaked.append(torch.ones(2 * MIB))  # 2 Mi float32 = 8 MiB, every page touched
        return super().training_step(batch, batch_idx)


class ScriptedPeakModel(BoringModel):
    """Logs a scripted "peak" per step, so the guard's arithmetic can be checked exactly."""

    def __init__(self, peaks: list[float]) -> None:
        super().__init__()
        self.peaks = peaks

    def training_step(self, batch, batch_idx):
        self.log("scripted/peak", self.peaks[self.global_step], on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)


# --- MemoryMonitor -----------------------------------------------------------------------------------------


@linux_only
def test_monitor_scalars_and_custom_scalars_layout_in_event_files(tmp_path):
    monitor = MemoryMonitor()
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, logger=logger, log_every_n_steps=1, callbacks=[monitor]).fit(CountingModel())

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalar_tags = set(events.Tags()["scalars"])
    logged = {"rss_mib", "peak_rss_mib", "mib_in_per_step", "mib_out_per_step", "resident_experts"}
    assert {tag for tag in scalar_tags if tag.startswith("memory/")} == {f"memory/{key}" for key in logged}
    assert [e.value for e in events.Scalars("memory/mib_in_per_step")] == [3.0] * 5
    assert [e.value for e in events.Scalars("memory/mib_out_per_step")] == [1.0, 3.0, 5.0, 7.0, 9.0]
    rss = [e.value for e in events.Scalars("memory/rss_mib")]
    peak = [e.value for e in events.Scalars("memory/peak_rss_mib")]
    assert len(peak) == 5 and all(p >= r > 0 for p, r in zip(peak, rss))
    assert peak == pytest.approx([row["peak_rss_bytes"] / MIB for row in monitor.history])

    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(proto).item())
    (category,) = [c for c in layout.category if c.title == "Memory"]
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    matched = {  # TensorBoard matches each regex against the run's tags with re.match
        title: {tag for tag in scalar_tags for regex in regexes if re.match(regex, tag)}
        for title, regexes in charts.items()
    }
    assert matched == {
        "host memory: current vs peak within step (MiB)": {"memory/rss_mib", "memory/peak_rss_mib"},
        "MiB moved in/out per step": {"memory/mib_in_per_step", "memory/mib_out_per_step"},
        "module memory counters": {"memory/resident_experts"},
    }

    assert [row["step"] for row in monitor.history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert monitor.history[-1]["bytes_in"] == 15.0 * MIB and monitor.history[-1]["peak_rss_bytes"] > 0  # raw


def test_monitor_every_n_steps_and_prefix(tmp_path):
    monitor = MemoryMonitor(every_n_steps=2, prefix="mem.")
    trainer = make_trainer(tmp_path, callbacks=[monitor])
    trainer.fit(CountingModel())
    assert [row["step"] for row in monitor.history] == [1.0, 3.0, 5.0]
    assert trainer.callback_metrics["mem.mib_out_per_step"] == 9.0  # step 5's alone, not since step 3
    assert "mem.peak_rss_mib" in trainer.callback_metrics


@linux_only
def test_host_peak_is_reset_each_step():
    cpu = torch.device("cpu")
    _memory.reset_peak(cpu)
    before = _memory.read_memory(cpu)
    block = torch.ones(16 * MIB)  # 64 MiB, touched
    during = _memory.read_memory(cpu)
    del block
    _memory.reset_peak(cpu)
    after = _memory.read_memory(cpu)
    assert during["peak_rss_bytes"] - before["rss_bytes"] >= 60 * MIB
    assert after["peak_rss_bytes"] < during["peak_rss_bytes"] - 32 * MIB  # the 64 MiB peak was forgotten


@linux_only
def test_process_peak_survives_the_per_step_resets():
    """Resetting VmHWM resets the kernel's peak for the process (getrusage, /usr/bin/time); process_peak_rss()
    still returns the lifelong peak."""
    import resource

    from callbacks import process_peak_rss

    cpu = torch.device("cpu")
    _memory.reset_peak(cpu)
    block = torch.ones(64 * MIB)  # 256 MiB, touched
    high = _memory.read_memory(cpu)["peak_rss_bytes"]
    del block
    _memory.reset_peak(cpu)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < high - 128 * MIB  # the kernel forgot it
    assert process_peak_rss() >= high - 4 * MIB  # (VmHWM is updated lazily: a few pages either way)


@pytest.mark.cuda
@cuda
def test_monitor_reads_cuda_memory(tmp_path):
    monitor = MemoryMonitor()
    trainer = make_trainer(tmp_path, accelerator="cuda", callbacks=[monitor])
    trainer.fit(BoringModel())
    row = monitor.history[-1]
    assert row["cuda_peak_bytes"] >= row["cuda_allocated_bytes"] > 0
    assert row["cuda_reserved_bytes"] >= row["cuda_allocated_bytes"]
    for key in ("cuda_allocated", "cuda_reserved", "cuda_peak"):
        assert float(trainer.callback_metrics[f"memory/{key}_mib"]) == pytest.approx(row[f"{key}_bytes"] / MIB)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"MemoryMonitor.every_n_steps \(0\) must be an integer ≥ 1"),
        ({"every_n_steps": 1.5}, r"MemoryMonitor.every_n_steps \(1.5\) must be an integer ≥ 1"),
        ({"prefix": ""}, r"MemoryMonitor.prefix must be a non-empty string"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryMonitor(**kwargs)


@pytest.mark.parametrize(
    ("stats", "match"),
    [
        ([1.0, 2.0], r"BadStats.memory_stats\(\) must return a flat dict\[str, float\], got list"),
        ({"bytes_in": "many"}, r"BadStats.memory_stats\(\) must return a flat dict\[str, float\] \(numbers only\)"),
    ],
)
def test_monitor_rejects_bad_memory_stats(tmp_path, stats, match):
    class BadStats(BoringModel):
        def memory_stats(self):
            return stats

    with pytest.raises(TypeError, match=match):
        make_trainer(tmp_path, callbacks=[MemoryMonitor()]).fit(BadStats())


# --- ConstantMemoryGuard -----------------------------------------------------------------------------------


@linux_only
def test_guard_raises_on_a_module_that_leaks(tmp_path):
    guard = ConstantMemoryGuard(warmup_steps=3, baseline_steps=2, tolerance=0.05)
    model = LeakyModel()
    pattern = r"at step \d+ is [\d,]+ bytes .*above the baseline [\d,]+ bytes .*× \(1 \+ tolerance 0.05\)"
    with pytest.raises(MemoryGrowthError, match=pattern):
        make_trainer(tmp_path, limit_train_batches=60, callbacks=[guard]).fit(model)
    assert guard.violations["drift"] == 1
    assert len(model.leaked) < 60  # stopped the run early
    assert guard.peaks[-1] > guard.baseline * 1.05


@linux_only
def test_guard_is_silent_on_a_steady_module(tmp_path):
    guard = ConstantMemoryGuard(warmup_steps=3, baseline_steps=2, window=10, tolerance=0.05)
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=15, limit_val_batches=2, callbacks=[guard])
    trainer.fit(BoringModel())
    assert guard.violations == {"drift": 0, "trend": 0, "max_bytes": 0}
    assert len(guard.peaks) == 27 and guard.baseline > 0
    assert 0 <= guard.cv < 0.05  # allocator noise: measured up to 0.023 in the full suite
    assert guard.slope * 27 < 0.02 * guard.baseline  # no growth (RSS may fall as earlier tests' memory is freed)


@pytest.mark.parametrize(
    ("peaks", "kind", "match"),
    [
        # warm-up 2, baseline = max(1000, 1000); step 6 at 1060 > 1000 × 1.05
        ([9999, 9999, 1000, 1000, 1020, 1060], "drift", r"at step 6 is 1,060 bytes .*baseline 1,000 bytes"),
        # baseline 1100 is a spike; then +10/step: the fitted line over 8 steps rises 70 > 0.05 × 1100 = 55
        # while every peak stays under the 1155 drift limit
        (
            [0, 0, 1100, 1000, 1010, 1020, 1030, 1040, 1050, 1060, 1070],
            "trend",
            r"trends upward at step 11: \+10 bytes/step over the last 8 steps, a rise of 70 bytes .*> tolerance "
            r"0.05 × baseline 1,100 bytes .*measured 1,070 bytes",
        ),
    ],
)
def test_guard_drift_and_trend_arithmetic(tmp_path, peaks, kind, match):
    guard = ConstantMemoryGuard(warmup_steps=2, baseline_steps=2, window=8, tolerance=0.05, metric="scripted/peak")
    with pytest.raises(MemoryGrowthError, match=match):
        make_trainer(tmp_path, limit_train_batches=len(peaks), callbacks=[guard]).fit(ScriptedPeakModel(peaks))
    assert guard.violations[kind] == 1 and sum(guard.violations.values()) == 1


def test_guard_warn_mode_warns_once_per_kind_and_reports(tmp_path):
    peaks = [0.0, 1000.0, 1000.0] + [1000.0 + 100 * i for i in range(1, 10)]
    guard = ConstantMemoryGuard(warmup_steps=1, baseline_steps=2, window=50, mode="warn", metric="scripted/peak")
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, logger=logger, limit_train_batches=len(peaks), callbacks=[guard])
    with pytest.warns(
        UserWarning, match=r"ConstantMemoryGuard: per-step peak memory at step 4 is 1,100 bytes"
    ) as record:
        trainer.fit(ScriptedPeakModel(peaks))
    assert sum("ConstantMemoryGuard" in str(w.message) for w in record) == 1
    assert guard.violations == {"drift": 9, "trend": 0, "max_bytes": 0}
    assert guard.slope == pytest.approx(linear_slope(peaks[1:]))
    assert guard.cv == pytest.approx(torch.tensor(peaks[1:]).std(unbiased=False).item() / (sum(peaks[1:]) / 11))
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "memory_guard/cv" in logged and "memory_guard/slope_bytes_per_step" in logged


def test_guard_max_bytes_applies_from_the_first_step(tmp_path):
    guard = ConstantMemoryGuard(warmup_steps=10, max_bytes=1)
    with pytest.raises(MemoryGrowthError, match=r"at step 1 is [\d,]+ bytes .*above ConstantMemoryGuard.max_bytes 1 "):
        make_trainer(tmp_path, callbacks=[guard]).fit(BoringModel())


@linux_only
def test_guard_reuses_the_monitor_readings(tmp_path):
    monitor = MemoryMonitor()
    guard = ConstantMemoryGuard(warmup_steps=2, baseline_steps=1, metric="memory/peak_rss_mib")
    make_trainer(tmp_path, limit_train_batches=6, callbacks=[monitor, guard]).fit(BoringModel())
    assert guard.peaks == [row["peak_rss_bytes"] for row in monitor.history[2:]]


def test_guard_metric_must_be_logged(tmp_path):
    guard = ConstantMemoryGuard(metric="memory/nope")
    match = r"ConstantMemoryGuard.metric \('memory/nope'\) is not among the logged metrics"
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, callbacks=[guard]).fit(BoringModel())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "loud"}, r"ConstantMemoryGuard.mode \('loud'\) must be one of 'raise', 'warn'"),
        ({"tolerance": 0}, r"ConstantMemoryGuard.tolerance \(0\) must be > 0"),
        ({"warmup_steps": -1}, r"ConstantMemoryGuard.warmup_steps \(-1\) must be an integer ≥ 0"),
        ({"window": 1}, r"ConstantMemoryGuard.window \(1\) must be an integer ≥ 2"),
        ({"baseline_steps": 0}, r"ConstantMemoryGuard.baseline_steps \(0\) must be an integer ≥ 1"),
        ({"max_bytes": 0}, r"ConstantMemoryGuard.max_bytes \(0\) must be > 0 bytes, or None"),
    ],
)
def test_guard_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConstantMemoryGuard(**kwargs)


def test_linear_slope():
    assert linear_slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert linear_slope([4.0, 4.0, 4.0]) == 0.0
    assert linear_slope([5.0]) == 0.0
