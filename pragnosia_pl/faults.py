"""Crash points: named places in the write paths where a test can SIGKILL the process to prove crash safety.

A kill at a random moment rarely lands inside a write that takes microseconds, so the write paths name the
moments that matter and the environment variable ``PRAGNOSIA_CRASH_AT=<site>:<n>`` makes the process send
itself ``SIGKILL`` the ``n``-th time it reaches ``<site>`` (``n`` defaults to 1). Sites:

- ``checkpoint-write``: half of a checkpoint's bytes are in its temporary file, not yet renamed into place.
- ``snapshot-write``: an expert-store snapshot's files are written and fsynced, not yet renamed into place.
- ``store-write``: an expert's record has just been written to the disk store, its checksum not yet recorded.

Unset (the normal case) a crash point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_AT_ENV = "PRAGNOSIA_CRASH_AT"
SITES = ("checkpoint-write", "snapshot-write", "store-write")


def crash_point(site: str) -> None:
    """Kills this process with ``SIGKILL`` if ``PRAGNOSIA_CRASH_AT`` names ``site`` and its count runs out.

    The remaining count lives in the environment variable itself (decremented on each visit), so the hook
    keeps no state of its own and a forked or spawned child starts from what its parent had left.
    """
    armed = os.environ.get(CRASH_AT_ENV)
    if not armed:
        return
    name, _, count = armed.partition(":")
    if name != site:
        return
    remaining = int(count or 1) - 1
    if remaining > 0:
        os.environ[CRASH_AT_ENV] = f"{site}:{remaining}"
        return
    os.kill(os.getpid(), signal.SIGKILL)
