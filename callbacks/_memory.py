"""Per-step memory readings shared by ``MemoryMonitor`` and ``ConstantMemoryGuard`` (DESIGN §6).

A step is bracketed by :func:`reset_peak` (before it) and :func:`read_memory` (after it), so the peaks read
are the peaks *within* the step:

- CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``, plus allocated and reserved.
- Host: ``VmRSS`` (current) and ``VmHWM`` (peak) from ``/proc/self/status``; the peak is reset by writing
  ``5`` to ``/proc/self/clear_refs`` (Linux). Elsewhere the peak falls back to ``resource.getrusage``,
  which cannot be reset: it is the peak of the whole process so far, and no current RSS is reported.

Resetting ``VmHWM`` resets the kernel's peak for the whole process: after it, ``getrusage``'s ``ru_maxrss`` and
``/usr/bin/time``'s "Maximum resident set size" report the peak since the last reset only. :func:`reset_host_peak`
therefore keeps the peak it is about to clear, and :func:`process_peak_rss` returns the process's lifelong peak.
"""

from __future__ import annotations

import sys

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"

RSS = "rss_bytes"
PEAK_RSS = "peak_rss_bytes"
CUDA_ALLOCATED = "cuda_allocated_bytes"
CUDA_RESERVED = "cuda_reserved_bytes"
CUDA_PEAK = "cuda_peak_bytes"


def _proc_status() -> dict[str, float]:
    fields = {}
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    fields[name] = float(int(value.split()[0]) * 1024)  # the file reports kB
    except OSError:
        pass
    return fields


def _getrusage_peak() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, kB on Linux


_cleared_peak = 0.0  # the largest VmHWM a reset has cleared: the process's peak before the current window


def process_peak_rss() -> float | None:
    """The process's peak RSS over its whole life, in bytes, whatever peak windows were reset in between
    (``None`` where neither ``/proc/self/status`` nor ``getrusage`` is available)."""
    peaks = [_proc_status().get("VmHWM"), _getrusage_peak(), _cleared_peak or None]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def reset_host_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (keeping the cleared peak for :func:`process_peak_rss`); ``False`` where
    the OS does not allow it (the peak is then lifelong)."""
    global _cleared_peak
    _cleared_peak = max(_cleared_peak, _proc_status().get("VmHWM", 0.0))
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak(device: torch.device) -> None:
    """Start a new peak window on the host and, when ``device`` is a CUDA device, on it too."""
    reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_memory(device: torch.device) -> dict[str, float]:
    """Memory now and the peak since the last :func:`reset_peak`, in bytes, keyed by the names above."""
    status = _proc_status()
    reading = {}
    if "VmRSS" in status and "VmHWM" in status:
        reading[RSS] = status["VmRSS"]
        reading[PEAK_RSS] = status["VmHWM"]
    else:
        peak = _getrusage_peak()
        if peak is not None:
            reading[PEAK_RSS] = peak
    if device.type == "cuda":
        reading[CUDA_ALLOCATED] = float(torch.cuda.memory_allocated(device))
        reading[CUDA_RESERVED] = float(torch.cuda.memory_reserved(device))
        reading[CUDA_PEAK] = float(torch.cuda.max_memory_allocated(device))
    return reading


def step_peak(reading: dict[str, float]) -> float | None:
    """The number that says how much memory a step needed: the device peak on CUDA, else the host peak."""
    return reading.get(CUDA_PEAK, reading.get(PEAK_RSS))
