"""The gateway side. Imports onnxruntime, numpy and pydantic; never torch."""

import migserve  # noqa: F401  (first: it keeps onnxruntime off the network, see migserve/__init__.py)
