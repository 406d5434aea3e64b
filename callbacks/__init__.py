"""Reusable Lightning callbacks: memory panels, a constant-memory guard, domain switching, tokens/s and learning
rates.

Generic Lightning tooling: this package never imports ``pragnosia_pl``. It talks to a LightningModule or
DataModule only through small optional hooks (``memory_stats()``, ``learning_rates()``, ``parameters_in_store()``,
``on_domain_switch(previous, new)``, ``set_domain(name)``, ``val_domain_names``).
"""

from ._memory import process_peak_rss, read_memory
from .domain_switcher import DomainSwitcher
from .learning_rates import LearningRates
from .memory_guard import ConstantMemoryGuard, MemoryGrowthError
from .memory_monitor import MemoryMonitor
from .store_summary import StoreModelSummary
from .throughput import TokenThroughput, count_tokens

__all__ = [
    "ConstantMemoryGuard",
    "DomainSwitcher",
    "LearningRates",
    "MemoryGrowthError",
    "MemoryMonitor",
    "StoreModelSummary",
    "TokenThroughput",
    "count_tokens",
    "process_peak_rss",
    "read_memory",
]
