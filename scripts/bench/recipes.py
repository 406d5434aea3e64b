"""The recipes the benchmarks run are the shipped configs (``configs/*.yaml``): this reads their model sections."""

from __future__ import annotations

from typing import Any

from bench.engine import CONFIGS, model_options

# What a benchmark itself sets in every model: the shape its contenders are compared at, the seed, and where the
# experts live. Every other PragnosiaLM option of a benchmark's recipe comes from a shipped config.
BENCHMARK_KEYS = frozenset(
    {"d_model", "n_shared_layers", "n_heads", "num_experts", "num_active_experts", "lr", "max_len", "seed"}
    | {"store", "store_dir"}
)

__all__ = ["BENCHMARK_KEYS", "CONFIGS", "method_options", "model_options"]


def method_options(config_file: str) -> dict[str, Any]:
    """A shipped config's ``PragnosiaLM`` options without :data:`BENCHMARK_KEYS`: its method."""
    return {k: v for k, v in model_options(config_file).items() if k not in BENCHMARK_KEYS}
