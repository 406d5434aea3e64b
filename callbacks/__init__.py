"""Reusable Lightning callbacks: memory panels, a constant-memory guard, and domain switching.

Generic Lightning tooling: this package never imports ``pragnosia_pl``. It talks to a LightningModule or
DataModule only through small optional hooks (``memory_stats()``, ``on_domain_switch(previous, new)``,
``set_domain(name)``, ``val_domain_names``).
"""

from ._memory import process_peak_rss, read_memory
from .domain_switcher import DomainSwitcher
from .memory_guard import ConstantMemoryGuard, MemoryGrowthError
from .memory_monitor import MemoryMonitor

__all__ = [
    "ConstantMemoryGuard",
    "DomainSwitcher",
    "MemoryGrowthError",
    "MemoryMonitor",
    "process_peak_rss",
    "read_memory",
]
