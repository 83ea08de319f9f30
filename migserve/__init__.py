"""migserve: serve research vision models on MIG-partitioned GPUs."""

from __future__ import annotations

import os

__version__ = "0.1.0"

# onnxruntime's PyPI wheels for Linux (1.32 here) record usage events (process, OS, interpreter path, sessions) in
# ~/.cache/Microsoft/DeveloperTools/.onnxruntime and a .ses file in TMPDIR, and upload them to Microsoft's collector,
# unless ORT_DISABLE_TELEMETRY is set before onnxruntime is imported. migserve uses no network at run time, so every
# process that imports it first turns that off: the CLI, the gateway and its workers (they inherit the environment),
# the exporters and bench (their packages import migserve before anything else). A value the user set is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
