"""migserve: serve research vision models on MIG-partitioned GPUs."""

from __future__ import annotations

__version__ = "0.1.0"
