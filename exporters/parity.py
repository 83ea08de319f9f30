"""Compare onnxruntime (CPU) with PyTorch on the model's seeded samples."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from migserve.contract import OutputError, Parity, ParitySample, TensorSpec
from migserve.types import Array

from .errors import ParityFailed
from .zoo import Sample

FP16_TOLERANCE = 1e-2


def run_torch(module: nn.Module, inputs: dict[str, Array]) -> list[Array]:
    with torch.inference_mode():
        result = module(**{name: torch.from_numpy(value) for name, value in inputs.items()})
    outputs = result if isinstance(result, tuple) else (result,)
    return [t.numpy() for t in outputs]


def compare(expected: Array, got: Array, name: str) -> OutputError:
    if expected.shape != got.shape:
        raise ParityFailed(f"output {name}: onnxruntime shape {got.shape}, torch {expected.shape}")
    if not np.isfinite(got).all():
        raise ParityFailed(f"output {name}: onnxruntime produced non-finite values")
    scale = float(np.abs(expected).max())
    if scale == 0.0:
        raise ParityFailed(f"output {name}: the reference is all zeros, so parity proves nothing")
    max_abs = float(np.abs(expected.astype(np.float64) - got.astype(np.float64)).max())
    return OutputError(max_abs=max_abs, max_rel=max_abs / scale)


def cpu_session(model: bytes) -> ort.InferenceSession:
    """onnxruntime on the cores this process may use. Left to its default thread count it pins a thread to every core
    of the machine by number, which in a container limited to some cores logs "pthread_setaffinity_np failed"."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def check_parity(
    module: nn.Module,
    proto: onnx.ModelProto,
    samples: list[Sample],
    outputs: tuple[TensorSpec, ...],
    tolerance: float,
) -> Parity:
    """Every output of every sample within `tolerance` of torch, relative to the output's scale."""
    session = cpu_session(proto.SerializeToString())
    results = []
    for sample in samples:
        expected = run_torch(module, sample.inputs)
        got = session.run([o.name for o in outputs], sample.inputs)
        errors = {spec.name: compare(e, np.asarray(g), spec.name) for spec, e, g in zip(outputs, expected, got, strict=True)}
        results.append(ParitySample(name=sample.name, shapes={k: tuple(v.shape) for k, v in sample.inputs.items()}, outputs=errors))
        for out_name, err in errors.items():
            if err.max_rel > tolerance:
                raise ParityFailed(
                    f"parity failed on sample {sample.name!r}, output {out_name}: "
                    f"relative error {err.max_rel:.2e} > tolerance {tolerance:.0e} (max abs {err.max_abs:.2e})"
                )
    return Parity(runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider", tolerance=tolerance, samples=tuple(results))
