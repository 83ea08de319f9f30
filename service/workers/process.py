"""The worker process: one per partition, started with `spawn`.

`CUDA_VISIBLE_DEVICES` is set to the partition's UUID and the CPU affinity to its
cores before onnxruntime is imported, so a process sees exactly one MIG instance
(or GPU, or its cores). Each model's sha256 is checked against its contract before
its session is created. Then: receive a batch, run it on views of shared memory,
write the outputs to a new segment, reply. No logging on the hot path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from . import shm
from .buckets import BucketedSession
from .protocol import (
    BatchDone,
    BatchFailed,
    FailureKind,
    LoadModel,
    ModelLoaded,
    ModelUnloaded,
    RunBatch,
    Stop,
    UnloadModel,
    WorkerReady,
    WorkerSpec,
)


def _session_options(ort: Any, spec: WorkerSpec) -> Any:
    options = ort.SessionOptions()
    if spec.cores:
        options.intra_op_num_threads = len(spec.cores)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _providers(ort: Any, spec: WorkerSpec) -> list[str]:
    if spec.device and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _provider_options(providers: list[str], spec: WorkerSpec) -> list[dict[str, str]]:
    """onnxruntime's default, EXHAUSTIVE, makes cuDNN's slower plan choice whenever a convolution's input shape changes:
    165-250 ms per new batch size for crowd-csrnet on an H200, against 30-34 ms for HEURISTIC (bench/RESULTS.md)."""
    return [{"cudnn_conv_algo_search": spec.options.conv_algo_search} if p == "CUDAExecutionProvider" else {} for p in providers]


def used_providers(ort: Any, spec: WorkerSpec, sessions: dict[str, Any]) -> tuple[tuple[str, ...], str | None]:
    """The providers the sessions really run on, and on a GPU or MIG partition without CUDA, a warning saying why.

    onnxruntime drops CUDAExecutionProvider without an error when its CUDA or cuDNN libraries do not load, so the
    requested list is not evidence: each session's own list is."""
    used = tuple(dict.fromkeys(p for session in sessions.values() for p in session.get_providers())) or tuple(_providers(ort, spec))
    if not spec.device or "CUDAExecutionProvider" in used:
        return used, None
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        why = (
            f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider (it offers {', '.join(available)}); "
            "install onnxruntime-gpu instead of onnxruntime (pip install 'migserve[gpu]')"
        )
    else:
        why = f"onnxruntime {ort.__version__} offers CUDAExecutionProvider but could not start it: {_cuda_provider_failure(ort)}"
    return used, f"partition {spec.partition} ({spec.device}) runs its models on the CPU: {why}"


def _cuda_provider_failure(ort: Any) -> str:
    """Why onnxruntime's CUDA provider library does not load here: usually a CUDA or cuDNN library it needs."""
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return f"{exc} (the CUDA and cuDNN versions this onnxruntime needs must be on the library path)"
    return "its library loads, so the device itself refused (is the driver loaded, and does CUDA_VISIBLE_DEVICES name a device?)"


def load_sessions(ort: Any, spec: WorkerSpec) -> tuple[dict[str, Any], dict[str, str]]:
    sessions: dict[str, Any] = {}
    refused: dict[str, str] = {}
    options, providers = _session_options(ort, spec), _providers(ort, spec)
    for model in spec.models:
        try:
            data = Path(model.path).read_bytes()  # sessions are made from the bytes checked, never from the file again
        except OSError as exc:
            refused[model.name] = f"cannot read {model.path}: {exc.strerror}"
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != model.sha256:
            refused[model.name] = f"{model.path}: sha256 {digest[:12]}... is not the contract's {model.sha256[:12]}..."
            continue
        make = functools.partial(
            ort.InferenceSession, data, sess_options=options, providers=providers, provider_options=_provider_options(providers, spec)
        )
        try:
            session = make()
            session.run(None, {k: np.zeros(shape, dtype) for k, (shape, dtype) in model.warmup.items()})  # first runs are slow
        except Exception as exc:  # onnxruntime raises its own exception types
            refused[model.name] = f"onnxruntime cannot load or run {model.path}: {exc}"
            continue
        if session.get_providers()[0] == "CUDAExecutionProvider" and model.max_batch and spec.options.shape_sessions:
            # cuDNN plans are rebuilt at every shape change: pad batches to a few shapes, one session each
            session = BucketedSession(session, make, model.max_batch, keep=spec.options.shape_sessions)
        sessions[model.name] = session
    return sessions, refused


def run_batch(sessions: dict[str, Any], message: RunBatch, inputs: shm.Attachments, outputs: shm.Arena) -> BatchDone | BatchFailed:
    session = sessions.get(message.model)
    if session is None:
        return BatchFailed(message.batch_id, FailureKind.BAD_INPUT, f"model {message.model} is not loaded on this partition")
    feeds = {name: inputs.view(ref) for name, ref in message.inputs.items()}
    started = time.perf_counter()
    try:
        results = session.run(None, feeds)
    except Exception as exc:  # InvalidArgument and friends: shapes or values the graph rejects
        kind = FailureKind.BAD_INPUT if "INVALID_ARGUMENT" in str(exc) or "Invalid" in type(exc).__name__ else FailureKind.RUNTIME
        return BatchFailed(message.batch_id, kind, str(exc).strip().splitlines()[0][:500])
    compute = time.perf_counter() - started
    del feeds
    names = [o.name for o in session.get_outputs()]
    try:
        refs = outputs.write({name: [value] for name, value in zip(names, results, strict=True)})
    except shm.SharedMemoryFull as exc:
        return BatchFailed(message.batch_id, FailureKind.RUNTIME, str(exc))
    return BatchDone(message.batch_id, refs, compute)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    # A process group of its own: Ctrl-C in a terminal (or a supervisor's signal to the gateway's group) reaches
    # the gateway alone, which stops its workers in order; a worker killed alongside it looked like a crash.
    os.setpgid(0, 0)
    if spec.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.device
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
        if spec.options.idle_priority:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.environ["OMP_NUM_THREADS"] = str(len(spec.cores))
    import onnxruntime as ort  # only now: the device and cores are fixed

    sessions, refused = load_sessions(ort, spec)
    providers, device_warning = used_providers(ort, spec, sessions)
    conn.send(WorkerReady(spec.partition, tuple(sessions), providers, refused, device_warning))
    inputs, outputs = shm.Attachments(), shm.Arena()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the gateway is gone
            if isinstance(message, Stop):
                return
            if isinstance(message, LoadModel):
                loaded, refused = load_sessions(ort, dataclasses.replace(spec, models=(message.model,)))
                sessions.update(loaded)  # a reload replaces the old session only once the new one runs
                conn.send(ModelLoaded(message.model.name, refused.get(message.model.name)))
            elif isinstance(message, UnloadModel):
                sessions.pop(message.model, None)
                conn.send(ModelUnloaded(message.model))
            else:
                conn.send(run_batch(sessions, message, inputs, outputs))
    finally:
        inputs.close()
        outputs.close()
