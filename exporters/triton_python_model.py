"""The python-backend twin of an exported model: Triton's `model.py` running `model.onnx` with onnxruntime on CPU.

`migserve export --triton-backend python` copies this file to `<model>/1/model.py`
so that a Triton server without the onnxruntime backend (the CPU-only
`tritonserver` of the nvidia-pytriton wheel) serves the repository. It checks
`model.onnx` against the sha256 in config.pbtxt, and runs the requests of one
`execute` call as one batch where their shapes agree.

Triton's python stub ignores PYTHONPATH: set MIGSERVE_SITE_PACKAGES (paths joined
by ':') to where numpy 1.x and onnxruntime are installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

# Before onnxruntime is imported: its Linux wheels upload usage events unless told not to (migserve/__init__.py).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
for _path in reversed([p for p in os.environ.get("MIGSERVE_SITE_PACKAGES", "").split(":") if p]):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]  # noqa: E402


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:  # noqa: PTH123  (kept free of pathlib: runs inside Triton's stub)
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")  # noqa: PTH118
        expected = config.get("parameters", {}).get("model_sha256", {}).get("string_value")
        if expected and _sha256(path) != expected:
            raise pb_utils.TritonModelException(f"{path}: sha256 does not match config.pbtxt's model_sha256; re-export it")
        options = ort.SessionOptions()
        threads = int(config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0") or 0)
        # Never onnxruntime's default (0): it pins a thread to every core of the machine whatever the stub may use
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        """Requests whose inputs have the same shapes (but for the batch dim) run as one batch."""
        arrays = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, named in enumerate(arrays):
            groups.setdefault(tuple((n, a.shape[1:], a.dtype.str) for n, a in named.items()), []).append(i)
        responses: list[Any] = [None] * len(requests)
        for members in groups.values():
            feed = {n: np.concatenate([arrays[i][n] for i in members]) for n in self.inputs}
            try:
                results = self.session.run(self.outputs, feed)
            except Exception as exc:  # onnxruntime's errors name the bad input
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
                continue
            start = 0
            for i in members:
                rows = arrays[i][self.inputs[0]].shape[0]
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(r[start : start + rows])) for n, r in zip(self.outputs, results, strict=True)
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += rows
        return responses
