"""`migserve serve`: start the gateway and its partition workers."""

from __future__ import annotations

import argparse
import logging
import math
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from pydantic import ValidationError

if TYPE_CHECKING:
    from .config import ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repo", type=Path, default=Path("model_repo"), help="exported models (default: model_repo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; :: takes IPv6 and IPv4 clients (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--grpc-port", type=int, help="also serve KServe v2 over gRPC on this port, e.g. 8001 as Triton (default: off)")
    parser.add_argument("--topology", type=Path, help="declared partitions (YAML); overrides discovery")
    parser.add_argument(
        "--cpu-slices",
        help="cores per CPU slice without a GPU, e.g. 2,2 (default: one slice per core, and no more slices than a CPU "
        "quota (docker --cpus, a Kubernetes CPU limit) has CPUs)",
    )
    parser.add_argument("--models", nargs="+", metavar="NAME", help="serve only these models")
    parser.add_argument("--max-body-mb", type=_finite, default=256.0, help="largest request body (default: 256)")
    parser.add_argument(
        "--max-json-mb",
        type=_finite,
        default=16.0,
        help="largest JSON part of a KServe v2 inference request, and largest JSON body to a /v1 endpoint (JSON is parsed "
        "in the gateway's event loop, which answers nothing else meanwhile); larger gets 413 asking for binary tensors "
        "or the file as a multipart part, and an output asked for as JSON that would certainly be larger gets 400 asking "
        "for it as binary data (default: 16)",
    )
    parser.add_argument(
        "--max-pending-mb",
        type=_finite,
        help="request bodies held at once, received to answered; an HTTP body that would pass it gets 503 before it is read "
        "(default: 1024, or a quarter of a memory limit (docker --memory, a Kubernetes limit) where that is less)",
    )
    parser.add_argument("--timeout-s", type=_finite, default=30.0, help="default per-request deadline (default: 30)")
    parser.add_argument(
        "--receive-timeout-s",
        type=_finite,
        default=30.0,
        help="a client that sends nothing for this long in the middle of a request's head or body gets 408 and is "
        "disconnected, and the body's share of --max-pending-mb is given back (default: 30)",
    )
    parser.add_argument(
        "--head-timeout-s",
        type=_finite,
        default=60.0,
        help="a request's head (request line and headers) not received whole within this long, however steadily it "
        "comes, gets 408 and the connection is closed (default: 60, as nginx's client_header_timeout)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        help="client connections each gateway process takes at once over HTTP, and as many over gRPC; one past it is "
        "answered 503 (gRPC: closed) at once (default: the limit on open files less a tenth, at least 256, kept for the "
        "gateway's own files, and with --grpc-port half of the rest)",
    )
    parser.add_argument(
        "--arena-keep-mb",
        type=_finite,
        default=64.0,
        help="shared memory kept per worker for batches between them (input and output); larger batches' arenas are "
        "counted in --max-pending-mb and released once idle for 2 s (default: 64)",
    )
    parser.add_argument(
        "--send-timeout-s",
        type=_finite,
        default=60.0,
        help="a client that takes none of an answer waiting in its connection's buffer for this long is disconnected "
        "(over gRPC also one that answers no ping for about this long); until then the answer is counted in --max-pending-mb "
        "(default: 60)",
    )
    parser.add_argument(
        "--queue-capacity",
        type=int,
        default=256,
        help="requests waiting per model before 503, all front-end processes together (default: 256)",
    )
    parser.add_argument(
        "--worker-hang-s",
        type=_finite,
        default=300.0,
        help="a worker that has not answered a batch for this long is killed and restarted, its batch retried once "
        "elsewhere; above the slowest batch you serve (default: 300)",
    )
    parser.add_argument("--max-batch-size", type=int, help="cap every model's batch size; 1 disables batching")
    parser.add_argument("--max-queue-delay-ms", type=_finite, help="override every model's batching delay")
    parser.add_argument(
        "--preferred-batch-sizes",
        help="override every model's preferred batch sizes, e.g. 4,8 (under load a batch that reaches the smallest "
        "goes without waiting for the delay); none: wait for a full batch (default: each contract's)",
    )
    parser.add_argument(
        "--cpu-worker-priority",
        default="normal",
        choices=["normal", "idle"],
        help="idle: CPU-slice workers run under SCHED_IDLE and yield their cores to the gateway and clients at once; "
        "for hosts that serve nothing else (default: normal)",
    )
    parser.add_argument(
        "--cpu-run-slices",
        default="auto",
        metavar="auto|off|N",
        help="auto: CPU-slice workers time each model at 1, 2, 4, ... rows as they load it and run larger batches as "
        "consecutive runs of a size fastest per row, which on a CPU is often a small one (the activations fit the "
        "caches); N: runs of N rows at each model's default sizes (more rows of smaller inputs), untimed; off: every "
        "batch in one run (default: auto)",
    )
    parser.add_argument(
        "--cpu-run-slices-cache",
        default=None,
        metavar="PATH|off",
        help="with --cpu-run-slices auto, where the choices timed are kept between starts (per model file, core count, CPU "
        "and onnxruntime version): a gateway started again takes them instead of timing again; off: timed at every start "
        "(default: $XDG_CACHE_HOME/migserve/cpu-run-slices.json, else ~/.cache/...)",
    )
    parser.add_argument(
        "--cudnn-conv-algo-search",
        default="heuristic",
        choices=["heuristic", "exhaustive", "default"],
        help="GPU partitions: how cuDNN picks convolution kernels at each new input shape; exhaustive (onnxruntime's own "
        "default) took 165-250 ms per new batch size for crowd-csrnet on an H200, heuristic 30-34 ms; default uses "
        "cuDNN's fallback kernels, which onnxruntime warns may be slow (default: heuristic)",
    )
    parser.add_argument(
        "--gpu-shape-sessions",
        type=int,
        default=8,
        help="GPU partitions: sessions per model, one per padded batch shape, least recently used dropped first; "
        "0 runs every batch as it comes on one session (cuDNN then rebuilds its plans at each new batch size) (default: 8)",
    )
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=0,
        help="batches each worker runs at once, one per thread; on a GPU a small model's batch leaves the device mostly "
        "idle, and batches from different front-ends then overlap (default: 0, which is 4 on a GPU or MIG partition and 1 "
        "on a CPU slice)",
    )
    parser.add_argument(
        "--batches-in-flight",
        type=int,
        default=1,
        help="batches each gateway process may have in flight on a worker that runs several at once (--worker-threads "
        "over 1), at most its threads: over 1 the next batch starts while one runs; on an H200, 2 helped with four "
        "front-ends and hurt with two (default: 1)",
    )
    parser.add_argument(
        "--model-control-mode",
        default="none",
        choices=["none", "explicit"],
        help="explicit: POST /v2/repository/models/NAME/load and /unload (and gRPC's RepositoryModelLoad/Unload) load and "
        "unload models while the gateway runs, as Triton's explicit mode; --models names the ones loaded at start-up "
        "(default: none, the models it started with)",
    )
    parser.add_argument("--max-image-mp", type=_finite, default=40.0, help="largest decoded image, megapixels (default: 40)")
    parser.add_argument("--max-volume-mvox", type=_finite, default=64.0, help="largest CT volume, million voxels (default: 64)")
    parser.add_argument("--job-min-tiles", type=int, default=32, help="CT volumes needing more tiles run as jobs (default: 32)")
    parser.add_argument("--max-jobs", type=int, default=4, help="CT jobs running at once; more are answered 503 (default: 4)")
    parser.add_argument(
        "--job-timeout-s",
        type=_finite,
        default=1800.0,
        help="a CT job's deadline, from its submission (or from when a gateway started again runs it again); past it "
        "the job fails 504 (default: 1800)",
    )
    parser.add_argument(
        "--tiles-in-flight",
        type=int,
        default=32,
        help="tiles of one CT volume outstanding in the dispatcher at once; each holds its input and logits in the gateway "
        "(at paper size 4 and 96 MB at the organ stage), and a job runs fewer where --max-job-mb has no room (default: 32)",
    )
    parser.add_argument(
        "--max-job-mb",
        type=_finite,
        help="memory the running CT jobs (/v1/lns/segment) may hold in the gateway together: the volume, its resampled "
        "copies, each label's score and the tiles in flight, estimated from the volume's size before the job starts; a "
        "job that would pass it runs fewer tiles at once, else is answered 503, or 413 if alone it would "
        "(default: 4096, or a quarter of a memory limit)",
    )
    parser.add_argument(
        "--job-results-mb",
        type=_finite,
        default=512.0,
        help="finished jobs' results (label maps) kept at once for GET /v1/jobs/ID, in memory or in --jobs-dir; past it "
        "the oldest finished are dropped, and their URLs say so (default: 512)",
    )
    parser.add_argument(
        "--jobs-dir",
        type=Path,
        help="keep CT jobs and their label maps in this directory (made if need be; one gateway to a directory), and a "
        "running job's upload: a gateway started again on it answers for the jobs finished in the 15 minutes before, and "
        "runs again the ones that were running (default: in memory only, lost at a stop)",
    )
    parser.add_argument(
        "--trace-file",
        type=Path,
        help="Triton's trace extension: where traces of sampled requests go (PATH, or PATH.0, PATH.1, ... with log_frequency); "
        'turn tracing on with POST /v2/trace/setting {"trace_level": ["TIMESTAMPS"]} (default: no tracing)',
    )
    parser.add_argument(
        "--http-server",
        default="migserve",
        choices=["migserve", "uvicorn"],
        help="migserve: inference requests are read straight off the socket, uvicorn serves the rest (default); "
        "uvicorn: uvicorn serves every request",
    )
    parser.add_argument(
        "--frontends",
        type=int,
        default=1,
        help="processes that take inference requests on --port (and --grpc-port), each with its own batchers over the same "
        "workers; the first serves everything else too. One answers about 3,000 requests/s: on a GPU, more keep it busy "
        "(default: 1)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _finite(raw: str) -> float:
    """A number flag's value: NaN and infinities refused by argparse, naming the flag (a limit of inf megabytes, or a
    deadline of NaN seconds, is a mistake, not a setting)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {raw!r}")
    return value


def _sizes(flag: str, raw: str | None, what: str, example: str) -> tuple[int, ...] | None:
    if raw is None:
        return None
    try:
        sizes = tuple(int(x) for x in raw.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{flag} {raw!r}: expected {what}, comma-separated, e.g. {example}")
    return sizes


def _run_slices_cache(raw: str | None) -> dict[str, Path | None]:
    """--cpu-run-slices-cache as ServeConfig's field: absent (its default), None (off) or a path."""
    if raw is None:
        return {}
    if not raw:
        raise ValueError("--cpu-run-slices-cache '': expected a file's path, or off")
    return {"cpu_run_slices_cache": None if raw == "off" else Path(raw)}


def _run_slices(raw: str) -> Literal["auto", "off"] | int:
    if raw in ("auto", "off"):
        return "auto" if raw == "auto" else "off"
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ValueError(f"--cpu-run-slices {raw!r}: expected auto, off, or rows per run (1 or more), e.g. 4")


# ServeConfig's fields that a flag of another name or unit sets: the flag, and how many of the field's units are one of
# the flag's. Every other field is set by the flag of its name (tests/unit/test_cli.py checks both).
FLAG_OF: dict[str, tuple[str, float]] = {
    "max_body_bytes": ("--max-body-mb", 1 << 20),
    "max_json_bytes": ("--max-json-mb", 1 << 20),
    "max_pending_bytes": ("--max-pending-mb", 1 << 20),
    "arena_keep_bytes": ("--arena-keep-mb", 1 << 20),
    "max_job_bytes": ("--max-job-mb", 1 << 20),
    "max_job_results_bytes": ("--job-results-mb", 1 << 20),
    "max_image_pixels": ("--max-image-mp", 1e6),
    "max_volume_voxels": ("--max-volume-mvox", 1e6),
    "max_queue_delay_s": ("--max-queue-delay-ms", 1e-3),
    "default_timeout_s": ("--timeout-s", 1),
}
NOT_FLAGS = frozenset({"job_ttl_s"})  # fields no flag sets


def flag_of(field: str) -> tuple[str, float]:
    return FLAG_OF.get(field, ("--" + field.replace("_", "-"), 1))


def flag_problem(exc: ValidationError, args: argparse.Namespace) -> str:
    """The first of the serve options' problems, naming the flag as given and its bound in the flag's units:
    "--arena-keep-mb 0: Input should be greater than or equal to 1" (pydantic names the field, in its own units:
    "arena_keep_bytes: ... 1048576")."""
    from .config import first_problem

    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    if not field or field in NOT_FLAGS:
        return first_problem(exc)
    message = first["msg"].removeprefix("Value error, ")
    flag, scale = flag_of(field)
    if scale != 1 and first["type"] == "greater_than_equal" and first.get("ctx", {}).get("ge") == 1:
        message = "Input should be greater than 0"  # one byte, one pixel: not a bound worth its digits in MB
    elif scale != 1:
        message = re.sub(r"\d+(?:\.\d+)?", lambda number: f"{float(number.group()) / scale:g}", message)
    value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
    given = f"{value:g}" if isinstance(value, float) else value
    return f"{flag}{'' if value is None else f' {given}'}: {message}"


def _check_port(host: str, port: int, flag: str) -> None:
    """Refuse at once a port out of range or another process holds, instead of after the workers start (gRPC binds
    late)."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"{flag} {port}: expected a port from 0 to 65535 (0: any free one)")

    from .api.sockets import tcp_socket

    try:
        with tcp_socket(host) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a port in TIME_WAIT is free
            sock.bind((host, port))
    except OSError as exc:
        raise ValueError(f"{flag} {port}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _pending_bytes(max_pending_mb: float | None, max_body: int) -> int:
    """--max-pending-mb, or its default: 1 GiB, less under a memory limit (service/config.default_pending_bytes)."""
    from .cgroups import memory_limit
    from .config import default_pending_bytes

    if max_pending_mb is not None:
        return int(max_pending_mb * (1 << 20))
    pending, lowered = default_pending_bytes(max_body, memory_limit())
    if lowered:
        logging.getLogger("service.config").warning(lowered)
    return pending


def _job_bytes(max_job_mb: float | None) -> int:
    """--max-job-mb, or its default (service/config.default_job_bytes)."""
    from .cgroups import memory_limit
    from .config import default_job_bytes

    return int(max_job_mb * (1 << 20)) if max_job_mb is not None else default_job_bytes(memory_limit())


def run(args: argparse.Namespace, err: TextIO = sys.stderr) -> int:
    import uvicorn

    from .api.app import create_app
    from .api.connection import infer_protocol
    from .api.uvicorn_protocol import bounded_protocol
    from .errors import ServiceError
    from .fds import raise_open_files
    from .heap import keep_request_buffers_in_heap
    from .partitions import TopologyError
    from .repository import RepositoryError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listening = reserved = None
    grpc_port = args.grpc_port
    try:
        # Refused at once, not once the workers are up (uvicorn and gRPC bind only then); with front-ends free first
        # too: SO_REUSEPORT alone would share a port with another server that set it too (Triton does).
        _check_port(args.host, args.port, "--port")
        if grpc_port is not None:
            _check_port(args.host, grpc_port, "--grpc-port")
        if args.frontends > 1:
            if args.http_server != "migserve":
                raise ValueError("--frontends above 1 needs --http-server migserve: front-end processes read requests off the socket")
            listening = _reuse_port(args.host, args.port)
            if grpc_port is not None:  # every front-end binds the same gRPC port: --grpc-port 0 is chosen once, here
                reserved = _reuse_port(args.host, grpc_port, "--grpc-port", listen=False)
                grpc_port = reserved.getsockname()[1]  # held, never listening (no connection lands on it), until exit
        elif ":" in args.host:  # IPv6 and IPv4 clients both: uvicorn's listener on "::" would take IPv6 alone
            listening = _reuse_port(args.host, args.port, shared=False)
        port = listening.getsockname()[1] if listening is not None else args.port
        config = _serve_config(args, port, grpc_port)
        app = create_app(config)
    except ValidationError as exc:  # a ValueError too, but its text is a multi-line report
        print(f"error: {flag_problem(exc, args)}", file=err)
        return 2
    except (ValueError, ServiceError, TopologyError, RepositoryError) as exc:
        for held in (listening, reserved):
            if held is not None:
                held.close()
        print(f"error: {exc}", file=err)
        return 2
    keep_request_buffers_in_heap()
    raise_open_files()  # before the front-end processes start: they inherit it
    # Inference requests are served off the socket by our protocol; it hands other requests to uvicorn's.
    http = infer_protocol(app.gateway) if args.http_server == "migserve" else bounded_protocol(app.gateway)
    from .api.app import GatewayServer

    # After a stop on Ctrl-C uvicorn raises SIGINT again, a KeyboardInterrupt under asyncio's runner: `migserve`'s
    # main then ends the process by the signal, without a traceback
    if listening is None:
        # a BufferedProtocol works; uvicorn types Protocol
        served = uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level, access_log=False, http=http)  # type: ignore[arg-type]
        GatewayServer(served, app.gateway).run()
        return 0
    from .api.frontends import adopter
    from .api.sockets import bracketed

    server = GatewayServer(uvicorn.Config(app, log_level=args.log_level, access_log=False, http=http), app.gateway)  # type: ignore[arg-type]
    if app.gateway.frontends is not None:
        app.gateway.frontends.adopt = adopter(server)  # connections the other front-ends hand over are served here
    host, port = listening.getsockname()[:2]  # uvicorn says nothing of sockets it is given
    logging.getLogger(__name__).info("KServe v2 HTTP on http://%s:%s", bracketed(host), port)
    server.run(sockets=[listening])
    return 0


def _serve_config(args: argparse.Namespace, port: int, grpc_port: int | None) -> ServeConfig:
    """`serve`'s arguments as the gateway's typed configuration (checked as it is made: ValidationError)."""
    from .config import ServeConfig

    max_body = int(args.max_body_mb * (1 << 20))
    pending = _pending_bytes(args.max_pending_mb, max_body)
    return ServeConfig(
        model_repo=args.model_repo,
        host=args.host,
        port=port,
        grpc_port=grpc_port,
        topology=args.topology,
        cpu_slices=_sizes("--cpu-slices", args.cpu_slices, "cores per slice", "2,2"),
        models=tuple(args.models) if args.models else None,
        max_body_bytes=max_body,
        max_json_bytes=int(args.max_json_mb * (1 << 20)),
        max_pending_bytes=pending,
        default_timeout_s=args.timeout_s,
        receive_timeout_s=args.receive_timeout_s,
        head_timeout_s=args.head_timeout_s,
        max_connections=args.max_connections,
        send_timeout_s=args.send_timeout_s,
        arena_keep_bytes=int(args.arena_keep_mb * (1 << 20)),
        queue_capacity=args.queue_capacity,
        worker_hang_s=args.worker_hang_s,
        max_batch_size=args.max_batch_size,
        max_queue_delay_s=args.max_queue_delay_ms / 1000 if args.max_queue_delay_ms is not None else None,
        preferred_batch_sizes=()
        if args.preferred_batch_sizes == "none"
        else _sizes("--preferred-batch-sizes", args.preferred_batch_sizes, "batch sizes of 1 or more", "4,8"),
        cpu_worker_priority=args.cpu_worker_priority,
        cpu_run_slices=_run_slices(args.cpu_run_slices),
        **_run_slices_cache(args.cpu_run_slices_cache),
        cudnn_conv_algo_search=args.cudnn_conv_algo_search,
        gpu_shape_sessions=args.gpu_shape_sessions,
        worker_threads=args.worker_threads,
        batches_in_flight=args.batches_in_flight,
        model_control_mode=args.model_control_mode,
        max_image_pixels=int(args.max_image_mp * 1e6),
        max_volume_voxels=int(args.max_volume_mvox * 1e6),
        job_min_tiles=args.job_min_tiles,
        max_jobs=args.max_jobs,
        job_timeout_s=args.job_timeout_s,
        tiles_in_flight=args.tiles_in_flight,
        max_job_bytes=_job_bytes(args.max_job_mb),
        max_job_results_bytes=int(args.job_results_mb * (1 << 20)),
        jobs_dir=args.jobs_dir,
        trace_file=args.trace_file,
        frontends=args.frontends,
    )


def _reuse_port(host: str, port: int, flag: str = "--port", *, listen: bool = True, shared: bool = True) -> socket.socket:
    """The port, bound so that the other front-end processes can bind it too (shared=False: bound for this one)."""
    from .api.sockets import reuse_port_socket

    try:
        return reuse_port_socket(host, port, listen=listen, shared=shared)
    except OSError as exc:
        raise ValueError(f"{flag} {port}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
