"""Benchmarks: each module is a command whose figures go into bench/RESULTS.md."""

import migserve  # noqa: F401  (first: it keeps onnxruntime off the network, see migserve/__init__.py)
