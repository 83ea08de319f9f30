"""Gateway settings: typed, validated once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MB = 1 << 20
DEFAULT_PENDING_BYTES = 1 << 30
PENDING_SHARE_OF_MEMORY = 4  # at most a quarter of a memory limit holds request bodies by default, and CT jobs another
DEFAULT_JOB_BYTES = 4 << 30


def default_pending_bytes(max_body_bytes: int, memory_limit: int | None) -> tuple[int, str | None]:
    """--max-pending-mb's default: 1 GiB, or under a memory limit (service/cgroups.py) a quarter of it, though never
    below one body of --max-body-mb; and, where the limit lowered it, a warning saying so."""
    if memory_limit is None or memory_limit // PENDING_SHARE_OF_MEMORY >= DEFAULT_PENDING_BYTES:
        return DEFAULT_PENDING_BYTES, None
    pending = max(memory_limit // PENDING_SHARE_OF_MEMORY, max_body_bytes)
    warning = (
        f"this process may use {memory_limit / MB:g} MB of memory (its cgroup's limit: docker --memory, a Kubernetes memory "
        f"limit): request bodies held at once are bounded at {pending / MB:g} MB, not {DEFAULT_PENDING_BYTES / MB:g} "
        "(--max-pending-mb sets it)"
    )
    if pending * 2 > memory_limit:
        warning += f"; one body of --max-body-mb {max_body_bytes / MB:g} is over half the memory: lower --max-body-mb"
    return pending, warning


def default_run_slices_cache(environ: Mapping[str, str]) -> Path:
    """--cpu-run-slices-cache's default: migserve/cpu-run-slices.json in the user's cache directory (XDG_CACHE_HOME,
    else ~/.cache)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "migserve" / "cpu-run-slices.json"


def default_job_bytes(memory_limit: int | None) -> int:
    """--max-job-mb's default: 4 GiB, or under a memory limit a quarter of it."""
    return DEFAULT_JOB_BYTES if memory_limit is None else min(DEFAULT_JOB_BYTES, memory_limit // PENDING_SHARE_OF_MEMORY)


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repo: Path = Field(Path("model_repo"), description="exported models, one directory each")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(None, ge=0, le=65535, description="also serve KServe v2 over gRPC on this port (Triton uses 8001)")
    topology: Path | None = Field(None, description="declared partitions; overrides NVML and CPU discovery")
    cpu_slices: tuple[int, ...] | None = Field(None, description="cores per CPU slice when there is no GPU; default one per core")
    models: tuple[str, ...] | None = Field(None, description="serve only these models (default: every model in the repository)")
    max_body_bytes: int = Field(256 << 20, ge=1024, description="larger request bodies are refused with 413")
    max_json_bytes: int = Field(
        16 << 20,
        ge=1024,
        description="largest JSON part of an inference request, and largest JSON body to a /v1 endpoint; larger is refused "
        "with 413 (JSON is parsed in the event loop, which stalls every other request meanwhile: send large tensors as "
        "binary data, files as multipart parts). An output asked for as JSON that would certainly be larger gets 400",
    )
    max_pending_bytes: int = Field(
        1 << 30, ge=1024, description="request bodies held at once (received, queued or running); more are refused with 503"
    )
    default_timeout_s: float = Field(30.0, gt=0, description="per-request deadline unless the request sets one")
    receive_timeout_s: float = Field(
        30.0,
        gt=0,
        description="longest wait for more of a request's head or body once it has begun; then 408 and the connection closes, "
        "giving back the body's share of --max-pending-mb",
    )
    head_timeout_s: float = Field(
        60.0,
        gt=0,
        description="longest a request's head (request line and headers) may take to arrive whole, however steadily it "
        "comes; then 408 and the connection closes (nginx's client_header_timeout), so that clients trickling heads in "
        "cannot hold connections for ever",
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="client connections each process takes at once over HTTP, and as many over gRPC; more are answered 503 "
        "(gRPC: closed) at once. Default: the process's limit on open files less a reserve for the gateway's own (workers, "
        "shared memory, uploads), shared between the protocols (service/fds.py)",
    )
    send_timeout_s: float = Field(
        60.0,
        gt=0,
        description="longest wait for a client to take any of an answer left in its connection's buffer (counted in "
        "--max-pending-mb meanwhile); then the connection closes and the answer is dropped. Over gRPC also about the longest "
        "a connection with calls may leave a ping unanswered",
    )
    arena_keep_bytes: int = Field(
        64 << 20,
        ge=1 << 20,
        description="shared memory each worker keeps for batches between them; a batch larger than this is copied into an "
        "arena counted in --max-pending-mb and released once no batch has come for 2 s",
    )
    queue_capacity: int = Field(256, ge=1, description="requests waiting per model before 503")
    worker_hang_s: float = Field(
        300.0,
        gt=0,
        description="a worker that has not answered a batch for this long is taken as hung (a stuck GPU, a deadlock): it is "
        "killed and restarted, and its batch retried once on another replica",
    )
    max_queue_delay_s: float | None = Field(None, ge=0, description="override every contract's batching delay")
    max_batch_size: int | None = Field(None, ge=1, description="cap every contract's max batch size (1 disables batching)")
    preferred_batch_sizes: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        None, description="override every contract's preferred batch sizes; () waits for a full batch under load"
    )
    cpu_worker_priority: Literal["normal", "idle"] = Field(
        "normal",
        description="idle: CPU-slice workers run under SCHED_IDLE, so the gateway and clients on their cores run first "
        "(for hosts that serve nothing else; other busy processes would starve the workers)",
    )
    cpu_run_slices: Literal["auto", "off"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="auto: a CPU-slice worker times each model at 1, 2, 4, ... rows as it loads it and runs larger batches "
        "as consecutive runs of a size fastest per row (face-pros: 0.47-0.52 ms a row at 2-8 rows, 0.56-0.64 at 32 on one core); "
        "N: runs of N rows at each model's default sizes, untimed; off: every batch in one run",
    )
    cpu_run_slices_cache: Path | None = Field(
        default_factory=lambda: default_run_slices_cache(os.environ),
        description="with cpu_run_slices auto: where the choices timed are kept between starts, per model file, core count, "
        "CPU and onnxruntime version, so a gateway started again takes them instead of timing again; None: timed at every start",
    )
    cudnn_conv_algo_search: Literal["heuristic", "exhaustive", "default"] = Field(
        "heuristic",
        description="GPU partitions: how cuDNN picks convolution kernels at each new input shape. exhaustive (onnxruntime's "
        "default) took 165-250 ms per new batch size for crowd-csrnet on an H200, heuristic 30-34 ms; default: cuDNN's "
        "fallback kernels (slow)",
    )
    gpu_shape_sessions: int = Field(
        8,
        ge=0,
        description="GPU partitions: onnxruntime sessions per model, one per batch shape; batches are padded to powers of two "
        "so that each session keeps one shape (cuDNN rebuilds its plans whenever the shape changes). 0: one session, no padding",
    )
    worker_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="batches each worker runs at once, one per thread: on a GPU a small model's batch leaves the device "
        "mostly idle, and batches from different front-ends then overlap. 0: 4 on a GPU or MIG partition, 1 on a CPU slice "
        "(whose cores onnxruntime's own threads already use)",
    )
    batches_in_flight: int = Field(
        1,
        ge=1,
        le=64,
        description="batches each gateway process may have in flight on a worker that runs several at once (--worker-threads "
        "over 1), each in shared memory of its own, at most the worker's threads: over 1 the next batch starts while one "
        "runs. On an H200, 2 helped with four front-ends and hurt with two (bench/RESULTS.md)",
    )
    model_control_mode: Literal["none", "explicit"] = Field(
        "none",
        description="explicit: models can be loaded and unloaded while the gateway runs (Triton's model repository "
        "extension); none: the models it started with, fixed",
    )
    frontends: int = Field(
        1,
        ge=1,
        le=64,
        description="processes that take inference requests on the port (SO_REUSEPORT), each with its own batchers, all "
        "sending batches to the same workers; the first also serves everything else. One Python process answers about "
        "3,000 requests/s: more keep a GPU busy. --queue-capacity and --max-pending-mb bound them all together",
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded images with more pixels are refused with 413")
    max_volume_voxels: int = Field(64_000_000, ge=1, description="CT volumes with more voxels are refused with 413")
    job_min_tiles: int = Field(32, ge=0, description="/v1/lns/segment runs as a job (202) when both stages need more tiles than this")
    job_timeout_s: float = Field(1800.0, gt=0, description="deadline of one job's inference")
    max_jobs: int = Field(4, ge=1, description="jobs running at once; more are answered 503")
    job_ttl_s: float = Field(900.0, gt=0, description="how long a finished job's result is kept")
    max_job_results_bytes: int = Field(
        512 << 20, ge=0, description="finished jobs' results kept at once; past it the oldest finished jobs are dropped"
    )
    jobs_dir: Path | None = Field(
        None,
        description="where jobs, finished results and running jobs' uploads are kept, so that a gateway started again "
        "answers for them and runs the running ones again (none: in memory, lost at a stop)",
    )
    tiles_in_flight: int = Field(32, ge=1, description="tiles of one volume outstanding in the dispatcher at once")
    max_job_bytes: int = Field(
        DEFAULT_JOB_BYTES,
        ge=1,
        description="memory the running CT jobs may hold in the gateway together, by their estimates (service/families/lns.py "
        "job_bytes); a job that would pass it runs fewer tiles at once, else is answered 503 (413 if alone it would)",
    )
    trace_file: Path | None = Field(None, description="where Triton's trace extension writes traces (none: tracing is off)")

    @model_validator(mode="after")
    def _one_body_fits(self) -> ServeConfig:
        if self.max_pending_bytes < self.max_body_bytes:
            raise ValueError(
                f"--max-pending-mb {self.max_pending_bytes / MB:g} is below --max-body-mb {self.max_body_bytes / MB:g}: "
                "a request of the largest allowed size could never be served"
            )
        return self


def first_problem(exc: ValidationError) -> str:
    """pydantic's first error in one line, where it is and what is wrong (its own text is a multi-line report naming
    the model class and a web page): 'partitions.0.kind: Input should be ...'."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}"
