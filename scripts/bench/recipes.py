"""The recipes the benchmarks run are the shipped configs (``configs/*.yaml``): this reads their model sections."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# What a benchmark itself sets in every model: the shape its contenders are compared at, the seed, and where the
# experts live. Every other PragnosiaLM option of a benchmark's recipe comes from a shipped config.
BENCHMARK_KEYS = frozenset(
    {"d_model", "n_shared_layers", "n_heads", "num_experts", "num_active_experts", "lr", "seed"}
    | {"store", "store_dir"}
)

__all__ = [
    "BENCHMARK_KEYS",
    "CONFIGS",
    "given",
    "method_options",
    "model_options",
    "record_bpb",
    "shared_options",
    "step_recorder",
    "text_domains",
]


def model_options(config_file: str) -> dict[str, Any]:
    """The ``model.init_args`` of a shipped config."""
    return dict(yaml.safe_load((CONFIGS / config_file).read_text())["model"]["init_args"])


def method_options(config_file: str) -> dict[str, Any]:
    """A shipped config's ``PragnosiaLM`` options without :data:`BENCHMARK_KEYS`: its method."""
    return {k: v for k, v in model_options(config_file).items() if k not in BENCHMARK_KEYS}


def shared_options(config: Any) -> dict[str, Any]:
    """What every contender of a benchmark shares: the config's widths, k, shared lr and seed (so every model
    starts from the same trunk and takes the same shared optimizer)."""
    keys = ("d_model", "n_shared_layers", "n_heads", "num_active_experts", "lr", "seed")
    return {key: getattr(config, key) for key in keys}


def text_domains(config: Any, data_class: type | None = None):
    """The benchmark's data, prepared and set up for fitting: ``TextDomains`` (or ``data_class``, a subclass) over
    ``config.domains`` with the config's ``block_size``, ``batch_size``, ``max_bytes_per_domain``, ``seed`` and
    ``cache_dir``."""
    from pragnosia_pl import TextDomains

    data = (data_class or TextDomains)(
        dict(config.domains),
        block_size=config.block_size,
        batch_size=config.batch_size,
        max_bytes_per_domain=config.max_bytes_per_domain,
        seed=config.seed,
        cache_dir=config.cache_dir,
    )
    data.prepare_data()
    data.setup("fit")
    return data


def record_bpb(curve: list[dict[str, Any]], trainer: Any, **extra: Any) -> None:
    """Append the validation bpb of ``trainer``'s last validation to a learning ``curve`` (replacing the point of the
    same step, so a validation run twice at one step is recorded once)."""
    point = {"step": trainer.global_step, **extra}
    point.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/bpb")})
    if curve and curve[-1]["step"] == point["step"]:
        curve[-1] = point
    else:
        curve.append(point)


def _now(device) -> float:
    import torch

    if device.type == "cuda":  # the step's kernels are queued, not done, when the hook runs
        torch.cuda.synchronize(device)
    return time.perf_counter()


def step_recorder(tokens_per_step: int):
    """A callback that records the seconds and ``train/loss`` of every training step, the seconds of every
    validation, and ``val/bpb`` of every validation (a learning curve, with the tokens seen)."""
    from lightning.pytorch import Callback
    from typing_extensions import override

    class Recorder(Callback):
        """See :func:`step_recorder`."""

        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self.loss: list[float] = []
            self.validation_seconds: list[float] = []
            self.curve: list[dict[str, float]] = []
            self._start = 0.0

        @override
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            self._start = _now(pl_module.device)

        @override
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            self.step_seconds.append(_now(pl_module.device) - self._start)
            if "train/loss" in trainer.callback_metrics:
                self.loss.append(float(trainer.callback_metrics["train/loss"]))

        @override
        def on_validation_start(self, trainer, pl_module) -> None:
            self._start = _now(pl_module.device)

        @override
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            self.validation_seconds.append(_now(pl_module.device) - self._start)
            record_bpb(self.curve, trainer, tokens=trainer.global_step * tokens_per_step)

        @override
        def state_dict(self) -> dict[str, Any]:  # in a checkpoint, so a resumed run keeps its records
            return {key: getattr(self, key) for key in ("step_seconds", "loss", "validation_seconds", "curve")}

        @override
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            for key, value in state_dict.items():
                setattr(self, key, list(value))

    return Recorder()


def given(**options: Any) -> dict[str, Any]:
    """The options a command line set: those not ``None`` (unset ones leave the config's default standing)."""
    return {key: value for key, value in options.items() if value is not None}
