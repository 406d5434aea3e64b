"""Benchmarks of pragnosia-pl: each module runs one experiment and writes its JSON, markdown and plots.

The command-line entry points are ``scripts/bench_*.py``; the tests import these modules (``scripts`` on the path).
"""
