"""Experiments and benchmarks behind the scripts in ``scripts/`` (kept here so tests can reach them)."""
