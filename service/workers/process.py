"""The worker process: one per partition, started with `spawn`.

`CUDA_VISIBLE_DEVICES` is set to the partition's UUID and the CPU affinity to its
cores before onnxruntime is imported, so a process sees exactly one MIG instance
(or GPU, or its cores). Each model's sha256 is checked against its contract before
its session is created. Then: receive a batch, run it on views of shared memory,
write the outputs to a new segment, reply. No logging on the hot path.

A CUDA worker runs several batches at once, one per thread (serve --worker-threads): a
small model's batch on a GPU is mostly onnxruntime launching kernels one after another
and waiting for them, with the GPU's engines idle, and each process sending batches (the
gateway and its front-ends) has at most one in flight, so batches from different
front-ends that do not arrive together would otherwise wait for each other. onnxruntime
runs concurrent `run` calls of one session with a CUDA stream and cuDNN handles per call.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from migserve.types import Array

from . import shm
from .affinity import pin_threads
from .buckets import BucketedSession
from .oom import killed_first
from .pinned import DeviceBuffers, HostPinning
from .protocol import (
    BatchDone,
    BatchFailed,
    FailureKind,
    LoadModel,
    ModelLoaded,
    ModelSpec,
    ModelUnloaded,
    RunBatch,
    Stop,
    Trim,
    UnloadModel,
    WorkerReady,
    WorkerSpec,
)
from .slices import SlicedSession, agreed_rows, rows_of, timing_key

GPU_THREADS = 4  # batches a CUDA worker runs at once unless serve --worker-threads says otherwise
logger = logging.getLogger(__name__)


def _session_options(ort: Any, spec: WorkerSpec) -> Any:
    """Thread counts always set: left to its default, onnxruntime pins a pool thread to each core of the machine by
    number, whatever the process's mask (in a container limited to some cores it logs "pthread_setaffinity_np
    failed" for each), and its threads spin between parallel sections. A CPU slice: a thread per core of the slice,
    no spinning. A GPU or MIG worker: the CUDA provider computes on the device and the CPU runs shape-sized nodes
    only, so one thread (what onnxruntime's maintainers advise for GPU providers); on the CPU instead (an onnxruntime
    without CUDA: the partition reports it), a thread per core the process may use."""
    options = ort.SessionOptions()
    if spec.cores:
        threads = len(spec.cores)
    elif "CUDAExecutionProvider" in _providers(ort, spec):
        threads = 1
    else:
        threads = len(os.sched_getaffinity(0))
    options.intra_op_num_threads = threads
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
            started = time.perf_counter()
            session.run(None, {k: np.zeros(shape, dtype) for k, (shape, dtype) in model.warmup.items()})  # first runs are slow
            warmup_s = time.perf_counter() - started
        except Exception as exc:  # onnxruntime raises its own exception types
            refused[model.name] = f"onnxruntime cannot load or run {model.path}: {exc}"
            continue
        provider = session.get_providers()[0]
        if provider == "CUDAExecutionProvider" and model.max_batch and spec.options.shape_sessions:
            # cuDNN plans are rebuilt at every shape change: pad batches to a few shapes, one session each
            session = BucketedSession(
                session, make, model.max_batch, keep=spec.options.shape_sessions, pinning=cuda_pinning(), device=cuda_buffers(ort)
            )
        elif provider == "CPUExecutionProvider" and spec.options.run_slices != "off":
            session = _sliced(session, model, spec, warmup_s, ort.__version__)  # or itself, where slices gain nothing
        sessions[model.name] = session
    return sessions, refused


def _sliced(session: Any, model: ModelSpec, spec: WorkerSpec, warmup_s: float, runtime: str) -> Any:
    """A CPU session run in slices as `--cpu-run-slices` says: a fixed size; or (auto) what this partition's worker
    before chose, else what a worker timed for this model file on as many cores of this CPU under this onnxruntime
    (another of the gateway's, or one of an earlier start: --cpu-run-slices-cache), else timed here (and recorded)."""
    option = spec.options.run_slices
    if isinstance(option, int):
        return SlicedSession.made(session, model, option, warmup_s)
    if model.name in spec.timed:
        return SlicedSession.made(session, model, spec.timed[model.name], warmup_s)
    if spec.options.timings is None:
        return SlicedSession.made(session, model, "auto", warmup_s)
    timed_here: list[Any] = []

    def decide() -> int:
        timed_here.append(SlicedSession.made(session, model, "auto", warmup_s))
        return rows_of(timed_here[0])

    rows = agreed_rows(spec.options.timings, timing_key(model.sha256, len(spec.cores), runtime), decide)
    return timed_here[0] if timed_here else SlicedSession.made(session, model, rows, warmup_s)


def sliced_rows(sessions: Mapping[str, Any]) -> dict[str, int]:
    """Rows per run of each model whose batches run in slices (what /v1/partitions shows as run_slices)."""
    return {name: rows for name, session in sessions.items() if (rows := rows_of(session))}


def timed_choices(spec: WorkerSpec, sessions: Mapping[str, Any]) -> dict[str, int]:
    """What `--cpu-run-slices auto` chose for each CPU model (0: run whole), for a restart of this worker to take
    instead of timing again: a restart then comes back sooner, and runs its batches as the worker before it did."""
    if spec.options.run_slices != "auto":
        return {}
    return {name: rows_of(session) for name, session in sessions.items() if session.get_providers()[0] == "CPUExecutionProvider"}


@functools.cache
def cuda_pinning() -> HostPinning | None:
    """Page-locking through the CUDA runtime onnxruntime loaded; call once a CUDA session exists."""
    return HostPinning.for_this_process()


@functools.cache
def cuda_buffers(ort: Any) -> DeviceBuffers | None:
    """Input buffers on the device that padded and merged batches are copied into; call once a CUDA session exists."""
    return DeviceBuffers.for_this_process(ort)


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
    return _answer(message.batch_id, outputs, dict(zip([o.name for o in session.get_outputs()], results, strict=True)), compute)


def _answer(batch_id: int, outputs: shm.Arena, results: dict[str, Array], compute: float) -> BatchDone | BatchFailed:
    """A batch's outputs written to its client's arena, and the reply that names them."""
    try:
        return BatchDone(batch_id, outputs.write({name: [value] for name, value in results.items()}), compute)
    except shm.SharedMemoryFull as exc:
        return BatchFailed(batch_id, FailureKind.RUNTIME, str(exc))


def _rows(message: RunBatch) -> int:
    return next(iter(message.inputs.values())).shape[0]


Group = list[tuple[shm.Attachments, shm.Arena, RunBatch]]


def merged(batches: list[tuple[Any, RunBatch]], max_batch: dict[str, int]) -> list[list[tuple[Any, RunBatch]]]:
    """Batches that arrived together, grouped to run as one: same model, same non-batch shapes and dtypes, at most the
    model's largest batch in all. The gateway's front-end processes each batch their own requests; a worker that
    ran their small batches one by one spent its time per batch (serve --frontends, bench/RESULTS.md)."""
    groups: list[list[tuple[Any, RunBatch]]] = []
    open_groups: dict[object, tuple[list[tuple[Any, RunBatch]], int]] = {}
    for item in batches:
        message = item[1]
        key = (message.model, tuple((name, ref.shape[1:], ref.dtype) for name, ref in sorted(message.inputs.items())))
        rows = _rows(message)
        group, size = open_groups.get(key, (None, 0))
        if group is None or size + rows > max_batch.get(message.model, 0):
            group, size = [], 0
            groups.append(group)
        group.append(item)
        open_groups[key] = (group, size + rows)
    return groups


def run_merged(sessions: dict[str, Any], group: Group) -> list[BatchDone | BatchFailed] | None:
    """Several batches of one model run as one; each gets its own rows, written to its own client's arena.
    None if the merged run fails: then each runs alone, so that a failure is answered to the batch it belongs to."""
    message = group[0][2]
    session = sessions.get(message.model)
    if session is None:
        return None
    parts = {name: [inputs.view(m.inputs[name]) for inputs, _, m in group] for name in message.inputs}
    started = time.perf_counter()
    try:
        if isinstance(session, BucketedSession | SlicedSession):
            results = session.run_parts(None, parts)  # copied once into padded (pinned) buffers, or run in slices
        else:
            results = session.run(None, {name: np.concatenate(p) for name, p in parts.items()})
    except Exception:  # onnxruntime's own types; the batches alone say whose input it was
        return None
    compute = time.perf_counter() - started
    rows = [_rows(m) for _, _, m in group]
    if any(r.ndim == 0 or r.shape[0] != sum(rows) for r in results):
        return None  # an output without the batch axis first: it cannot be split
    named = dict(zip([o.name for o in session.get_outputs()], results, strict=True))
    replies: list[BatchDone | BatchFailed] = []
    start = 0
    for (_, outputs, m), n in zip(group, rows, strict=True):
        share = compute * n / sum(rows)  # each batch's rows' part of the run: the front-ends' counts add up to it
        replies.append(_answer(m.batch_id, outputs, {name: value[start : start + n] for name, value in named.items()}, share))
        start += n
    return replies


def _listen(path: str) -> socket.socket:
    """The Unix socket where the gateway's front-end processes connect; a stale one from a dead worker is replaced."""
    Path(path).unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # in the gateway's private run directory (mode 0700): only its own processes reach it
    listener.listen(16)
    return listener


@dataclasses.dataclass
class _Client:
    """One process that sends batches: its connection, and per slot (a batch it may have in flight) the arena it
    writes inputs to and the one outputs are written to for it."""

    conn: Connection
    pinning: HostPinning | None = None  # a CUDA worker's: input arenas are page-locked while attached
    keep: int = shm.SHRINK_ABOVE  # arenas up to this size are kept between batches (WorkerOptions.arena_keep)
    inputs: dict[int, shm.Attachments] = dataclasses.field(default_factory=dict)
    outputs: dict[int, shm.Arena] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one message at a time on the connection
    running: int = 0  # its batches handed to the pool's threads and not yet answered
    gone: bool = False  # its connection closed: its arenas go once none of its batches runs

    def arenas(self, slot: int) -> tuple[shm.Attachments, shm.Arena]:
        """The slot's two arenas, made on its first batch (in the loop's thread, before the batch is handed on)."""
        if slot not in self.inputs:
            self.inputs[slot], self.outputs[slot] = shm.Attachments(pinning=self.pinning), shm.Arena(keep=self.keep)
        return self.inputs[slot], self.outputs[slot]

    def send(self, message: object) -> None:
        """Send from any thread; a front-end that went away is let go (its connection's EOF comes next)."""
        with self.lock, contextlib.suppress(OSError):
            self.conn.send(message)

    def started(self) -> None:
        with self.lock:
            self.running += 1

    def finished(self) -> None:
        with self.lock:
            self.running -= 1
            last = self.gone and not self.running
        if last:
            self._close_arenas()

    def close(self) -> None:
        """The connection now; the arenas once no thread runs a batch of this client's (a front-end that went away
        while one ran: its output arena would be written again, and never unlinked, or its inputs unpinned mid-copy)."""
        self.conn.close()
        with self.lock:
            self.gone = True
            idle = not self.running
        if idle:
            self._close_arenas()

    def trim(self) -> None:
        """Its arenas larger than `keep`, on both sides, once none of its batches runs (Trim)."""
        with self.lock:
            idle = not self.running
        if idle:
            for inputs in self.inputs.values():
                inputs.trim(self.keep)  # it has released them: the pages go once this mapping does
            for outputs in self.outputs.values():
                outputs.trim()

    def _close_arenas(self) -> None:
        for inputs in self.inputs.values():
            inputs.close()
        for outputs in self.outputs.values():
            outputs.close()


class _Serving:
    """The loop of a worker whose models are loaded: batches from the gateway and from its front-end processes,
    each answered on the connection it came from, in the order each sent them."""

    def __init__(self, ort: Any, spec: WorkerSpec, conn: Connection) -> None:
        self.ort, self.spec = ort, spec
        self.sessions, self.refused = load_sessions(ort, spec)
        self.providers, self.device_warning = used_providers(ort, spec, self.sessions)
        # a CUDA worker's input arenas are page-locked: the GPU copies batches in by itself (service/workers/pinned.py)
        self.pinning = cuda_pinning() if "CUDAExecutionProvider" in self.providers else None
        self.listener = _listen(spec.listen) if spec.listen else None
        self.gateway = self._client(conn)
        self.clients: dict[int, _Client] = {conn.fileno(): self.gateway}  # by file descriptor
        self.max_batch = {m.name: m.max_batch for m in spec.models if m.max_batch}  # rows a merged run may reach
        self.threads = spec.options.threads or (GPU_THREADS if "CUDAExecutionProvider" in self.providers else 1)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="batch") if self.threads > 1 else None

    def _client(self, conn: Connection) -> _Client:
        return _Client(conn, self.pinning, self.spec.options.arena_keep)

    def ready(self) -> WorkerReady:
        return WorkerReady(
            self.spec.partition,
            tuple(self.sessions),
            self.providers,
            self.refused,
            self.device_warning,
            os.getpid(),
            self.threads,
            sliced_rows(self.sessions),
            timed_choices(self.spec, self.sessions),
        )

    def run(self) -> None:
        self.gateway.conn.send(self.ready())
        while True:
            watched: list[Any] = [c.conn for c in self.clients.values()]
            batches: list[tuple[_Client, RunBatch]] = []
            for source in wait([*watched, self.listener] if self.listener is not None else watched):
                if source is self.listener:
                    self._accept()
                elif not isinstance(source, int):
                    client = self.clients[source.fileno()]
                    message = self._receive(client)
                    if isinstance(message, RunBatch):
                        client.arenas(message.slot)
                        batches.append((client, message))
                    elif message is not None and not self._serve(client, message):
                        return
            for group in merged(batches, self.max_batch):
                if self.pool is None:
                    self._run(group)
                else:
                    for client, _ in group:
                        client.started()
                    self.pool.submit(self._run_answered, group)

    def _receive(self, client: _Client) -> object:
        """The client's next message; None once a front-end has gone (Stop once the gateway has)."""
        try:
            return client.conn.recv()
        except (EOFError, OSError):
            if client is self.gateway:
                return Stop()
            del self.clients[client.conn.fileno()]  # a front-end process that went away
            client.close()
            return None

    def _run(self, group: list[tuple[_Client, RunBatch]]) -> None:
        """Run batches of one model from several front-ends as one, each answered with its own rows."""
        replies = run_merged(self.sessions, [(*c.arenas(m.slot), m) for c, m in group]) if len(group) > 1 else None
        if replies is None:  # one batch, or a merged run that failed: each on its own, for its own answer
            replies = [run_batch(self.sessions, message, *client.arenas(message.slot)) for client, message in group]
        for (client, _), reply in zip(group, replies, strict=True):
            client.send(reply)

    def _run_answered(self, group: list[tuple[_Client, RunBatch]]) -> None:
        """_run on a thread of the pool, where an exception would be lost and its batches never answered."""
        try:
            self._run(group)
        except Exception as exc:
            logger.exception("a batch of %s failed in the worker", group[0][1].model)
            for client, message in group:
                client.send(BatchFailed(message.batch_id, FailureKind.RUNTIME, f"the worker failed: {type(exc).__name__}: {exc}"[:500]))
        finally:
            for client, _ in group:
                client.finished()

    def _accept(self) -> None:
        assert self.listener is not None
        joined = self._client(Connection(self.listener.accept()[0].detach()))
        try:
            joined.conn.send(self.ready())
        except OSError:
            joined.close()
            return
        self.clients[joined.conn.fileno()] = joined

    def _serve(self, client: _Client, message: object) -> bool:
        """Answer a control message; False once the worker should stop."""
        if isinstance(message, Stop):
            return False
        if isinstance(message, Trim):
            client.trim()
        elif isinstance(message, LoadModel):
            # timed afresh: a reload may bring another model under the same name
            loaded, refused = load_sessions(self.ort, dataclasses.replace(self.spec, models=(message.model,), timed={}))
            self.sessions.update(loaded)  # a reload replaces the old session only once the new one runs
            if loaded and message.model.max_batch:
                self.max_batch[message.model.name] = message.model.max_batch
            name = message.model.name
            rows, timed = sliced_rows(loaded).get(name), timed_choices(self.spec, loaded).get(name)
            client.send(ModelLoaded(name, refused.get(name), rows, timed))
        elif isinstance(message, UnloadModel):
            self.sessions.pop(message.model, None)
            client.send(ModelUnloaded(message.model))
        return True

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # the batches running finish (their answers may find no one) before the arenas go
        for client in self.clients.values():
            client.close()
        if self.listener is not None and self.spec.listen:
            self.listener.close()
            Path(self.spec.listen).unlink(missing_ok=True)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    # A process group of its own: Ctrl-C in a terminal (or a supervisor's signal to the gateway's group) reaches
    # the gateway alone, which stops its workers in order; a worker killed alongside it looked like a crash.
    os.setpgid(0, 0)
    # When memory runs out, the kernel takes a worker (restarted) before the gateway (service/workers/oom.py).
    killed_first(Path("/proc/self/oom_score_adj"), Path(f"/proc/{os.getppid()}/oom_score_adj"))
    # A worker logs only what goes wrong (a refused page-locking), in the gateway's format; not on the hot path.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s %(name)s[worker {spec.partition}]: %(message)s")
    if spec.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.device
    if spec.cores:
        pin_threads(spec.cores)
        if spec.options.idle_priority:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.environ["OMP_NUM_THREADS"] = str(len(spec.cores))
    import onnxruntime as ort  # only now: the device and cores are fixed

    serving = _Serving(ort, spec, conn)
    try:
        serving.run()
    finally:
        serving.close()
