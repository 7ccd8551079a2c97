"""Benchmark targets for `hetero bench`; see hetero/commands/bench.py."""
