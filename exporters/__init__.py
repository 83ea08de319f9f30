"""The exporters: PyTorch models of the papers to ONNX and Triton model repositories."""

import migserve  # noqa: F401  (first: it keeps onnxruntime off the network, see migserve/__init__.py)
