"""Benchmarks: each module is a command whose figures go into bench/RESULTS.md."""
