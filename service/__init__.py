"""The gateway side. Imports onnxruntime, numpy and pydantic; never torch."""
