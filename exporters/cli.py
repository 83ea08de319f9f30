"""`migserve export`: arguments, per-model progress, and the closing table.

Importing this module needs no torch; `run` imports the export side. Models are exported
`--jobs` at a time, each in a process of its own: an export is mostly one core's work
(torch's tracing and ONNX passes), so on a machine with more cores the whole zoo takes a
fraction of the time. Each process reports its progress lines through a queue, which this
one prints as they come. With `--jobs 1` too the export runs in a process of its own, not in
this one: Ctrl-C ends that process where it is (`_stop_now`), which an exception raised in
the middle of torch's tracing cannot do safely.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from migserve.contract import SIZES, Contract, read_contract, sha256_file
from migserve.interrupts import signals_deferred

from . import leftovers
from .errors import BadOption, ExportError
from .names import MODEL_NAMES, known
from .request import ExportRequest, ExportResult
from .triton import switch_backend

STOP_GRACE_S = 60.0  # default --stop-grace-s: export processes end at once when stopped, unless something holds them
STACKS_S = 1.0  # how long export processes that will not stop get to write their stacks before they are killed
MAX_JOBS = 4  # default: one process per usable core, at most this many (each holds torch and a model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="export every model in the zoo")
    which.add_argument("--model", nargs="+", metavar="NAME", help="export these models")
    which.add_argument("--list", action="store_true", help="list the models and their options, then exit")
    parser.add_argument(
        "--size", choices=SIZES, default="tiny", help="tiny for tests and laptops, paper for the papers' architectures (default: tiny)"
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="weights for model NAME (.safetensors, .pth, .pt); repeatable",
    )
    parser.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="allow checkpoint keys to be missing; they keep the seeded init and the contract lists them",
    )
    parser.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="override an architecture option, e.g. face-pros.expression_classes=8; repeatable",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the random init and of the parity samples (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("model_repo"), help="model repository to write into (default: model_repo)")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights and compute with fp32 inputs and outputs (parity tolerance 1e-2)")
    parser.add_argument(
        "--triton-backend",
        choices=["onnxruntime", "python"],
        default="onnxruntime",
        help="config.pbtxt for Triton's onnxruntime backend on GPUs (default), or python twins (model.py) for a CPU-only Triton",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip models whose directory already holds an intact export of the same size, precision, seed or checkpoint "
        "(only its config.pbtxt is rewritten where --triton-backend differs); exports with --set are always redone",
    )
    parser.add_argument(
        "--stop-grace-s",
        type=float,
        default=STOP_GRACE_S,
        help="how long export processes get to end after Ctrl-C or SIGTERM before they are killed "
        f"(what they were writing removed) (default: {STOP_GRACE_S:g})",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help=f"models exported at once, each in a process of its own (default: one per usable core, at most {MAX_JOBS}; "
        "1: one after another)",
    )


def _seed(raw: str) -> int:
    """0 to 2**64 - 1: what both torch's and numpy's generators take (a negative seed was a traceback after torch loaded)."""
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**64 - 1; got {raw!r}")
    return value


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """What the command line gets wrong, the output folder tried, and what is up to date (--skip-existing): all
    before torch is imported, which takes seconds, and before minutes of exports."""
    if args.list:
        if _export_extra_missing(err):
            return 2
        _list_models(out)
        return 0
    try:
        names = list(MODEL_NAMES) if args.all else [known(n) for n in dict.fromkeys(args.model)]
        checkpoints = _pairs(args.checkpoint, "--checkpoint", names)
        options = _options(args.options, names)
    except ExportError as exc:
        print(f"error: {exc}", file=err)
        return 2
    if (wrong := _wrong_number(args)) is not None:
        print(f"error: {wrong}", file=err)
        return 2
    if (unwritable := _unwritable(args.out)) is not None:
        print(f"error: cannot write to {args.out}: {unwritable}", file=err)
        return 1
    for line in leftovers.sweep(args.out):  # before --skip-existing looks: a model may be put back
        print(line, file=err)
    requests = [
        ExportRequest(
            name=name,
            size=args.size,
            out=args.out,
            checkpoint=Path(checkpoints[name]) if name in checkpoints else None,
            strict=args.strict,
            seed=args.seed,
            fp16=args.fp16,
            options=options.get(name, {}),
            triton_backend=args.triton_backend,
        )
        for name in names
    ]
    work = _still_to_export(requests, args.skip_existing, err)
    if work is None:
        return 1
    if work and _export_extra_missing(err):
        return 2
    cores = len(os.sched_getaffinity(0))
    jobs = max(1, min(args.jobs or min(cores, MAX_JOBS), len(work)))
    # SIGTERM raises Terminated in here (migserve's main): the exports stop as on Ctrl-C, their processes not orphaned
    outcomes = _in_processes(work, jobs, max(1, cores // jobs), err, args.stop_grace_s)
    results: list[ExportResult] = []
    failures: list[tuple[str, str]] = []
    for (_, request), outcome in zip(work, outcomes, strict=True):  # in the order asked for, whatever finished first
        if isinstance(outcome, str):
            failures.append((request.name, outcome))
        else:
            results.append(outcome)
    print(format_table(results, failures), file=out)
    for name, reason in failures:
        print(f"error: {name}: {reason}", file=err)
    return 1 if failures else 0


def _wrong_number(args: argparse.Namespace) -> str | None:
    if args.jobs < 0:
        return f"--jobs {args.jobs}: give 1 or more, or 0 for one per usable core"
    if not 0 <= args.stop_grace_s < float("inf"):
        return f"--stop-grace-s {args.stop_grace_s:g}: give 0 or more seconds"
    return None


def _export_extra_missing(err: TextIO) -> bool:
    """Whether torch and the rest of the export extra are missing (said if so)."""
    try:
        from . import pipeline  # noqa: F401  (torch, onnx, onnxscript)
    except ImportError as exc:
        print(f"error: exporting needs the export extra ({exc}); run: pip install 'migserve[export]'", file=err)
        return True
    logging.getLogger("torch").setLevel(logging.ERROR)
    return False


def _still_to_export(requests: list[ExportRequest], skip_existing: bool, err: TextIO) -> list[tuple[str, ExportRequest]] | None:
    """The requests to export, each with its progress prefix; with `skip_existing`, those up to date are said to be
    skipped (their config switched to the Triton backend asked for). None where a config could not be written."""
    work: list[tuple[str, ExportRequest]] = []
    for i, request in enumerate(requests, 1):
        prefix = f"[{i:>2}/{len(requests)}] {request.name} ({request.size})"
        model_dir = request.out / request.name
        if skip_existing and (kept := up_to_date(model_dir, request)) is not None:
            try:
                switched = switch_backend(model_dir, kept, request.triton_backend)
            except OSError as exc:
                print(f"error: cannot write {model_dir}: {exc.strerror or exc}", file=err)
                return None
            note = f" (its config.pbtxt switched to Triton's {request.triton_backend} backend)" if switched else ""
            print(f"{prefix}: up to date, skipped{note}", file=err, flush=True)
            continue
        work.append((prefix, request))
    return work


class Interrupted(BaseException):
    """A stop seen by an export process at its export's next step (BaseException: no `except Exception` on the way
    takes it for the export's own failure)."""


def _progress(prefix: str) -> Callable[[str], None]:
    """An export's progress callback in an export process: each step said to the first process, unless it has stopped
    the exports."""
    started = time.perf_counter()

    def report(step: str) -> None:
        if _stopped():
            raise Interrupted
        _said(f"{prefix}: {step} (+{time.perf_counter() - started:.1f}s)")

    return report


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent ends
STOPPED_STATUS = 128 + signal.SIGINT  # an export process that a stop ended while it exported
INTERRUPTED = "interrupted"  # an export process's answer for an export that Ctrl-C stopped or kept from starting
# In an export process: "lines", the queue its progress lines go to; "stop", the event; "exporting", while an export runs
_process: dict[str, Any] = {}


def _start_process(lines: Any, stop: Any, threads: int, parent: int) -> None:
    _process["lines"], _process["stop"] = lines, stop  # SIGINT was ignored from the start (_in_processes) until:
    signal.signal(signal.SIGINT, _stop_now)
    # where it stands, asked of one that will not stop: its threads' stacks, to a file the first process reads (_stacks)
    _process["stacks"] = (Path(tempfile.gettempdir()) / f"stacks-{os.getpid()}.txt").open("w")
    faulthandler.register(signal.SIGUSR1, file=_process["stacks"], all_threads=True)
    # Killed with the first process, whatever kills it (SIGKILL, the OOM killer), instead of exporting on as an orphan
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before that was set
        os._exit(1)
    import torch

    torch.set_num_threads(threads)  # the cores shared out between the processes
    logging.getLogger("torch").setLevel(logging.ERROR)


def _stop_now(signum: int, frame: FrameType | None) -> None:
    """SIGINT in an export process (a terminal's Ctrl-C, or the first process's) while it exports: the process ends at
    once (a step can take minutes at paper size), its progress lines sent first. Not by raising an exception where the
    export stands: raised inside torch's tracing, torch took one for a failure of the model's and went on with the next
    (a stop taken for a failed export, the next failing too), or aborted the process ("c10::Error: trying to set the
    current FakeTensorMode, but one already exists") with C++ frames on stderr, in a few stops in a hundred
    (bench/RESULTS.md, "Ctrl-C anywhere in the export step"). What it was writing, and its temporary directory, the
    first process removes once it has ended (_remove_partials). One that comes while no export runs is ignored."""
    if _process.get("exporting"):
        lines = _process["lines"]
        lines.close()  # _said and _stopped defer SIGINT over the locks they take, so none is held here
        lines.join_thread()  # its lines sent, and its feeder thread out of the queue's lock, which the others share
        os._exit(STOPPED_STATUS)


def _said(line: str) -> None:
    """A progress line to the first process. The queue's put takes locks and may start its feeder thread: a process
    that ended in the middle of that would leave them held, so SIGINT waits until the line is queued."""
    with signals_deferred(signal.SIGINT):
        _process["lines"].put(line)


def _stopped() -> bool:
    """Whether the first process has stopped the exports. The event's lock is shared with the other processes, and a
    process that ended holding it would leave them waiting for it for ever: SIGINT waits until it is let go."""
    with signals_deferred(signal.SIGINT):
        return bool(_process["stop"].is_set())


def _in_process(prefix: str, request: ExportRequest) -> ExportResult | str:
    """One export in an export process: the result, or why it failed (said as it happens too), or INTERRUPTED."""
    from .pipeline import export_model

    try:
        _process["exporting"] = True
        result = export_model(request, _progress(prefix))
        _said(f"{prefix}: wrote {result.path} in {result.seconds:.1f}s")
        return result
    except ExportError as exc:
        _said(f"{prefix}: FAILED: {exc}")
        return str(exc)
    except Interrupted:
        return INTERRUPTED
    finally:
        _process.pop("exporting", None)


def _in_processes(
    work: list[tuple[str, ExportRequest]], jobs: int, threads: int, err: TextIO, grace_s: float = STOP_GRACE_S
) -> list[ExportResult | str]:
    """Each export in one of `jobs` processes; their progress printed as it comes. A process that dies (killed, out
    of memory) fails the exports it had not finished, with the reason.

    Ctrl-C: in an export process SIGINT ends the process where its export stands (`_stop_now`; while none runs, it
    is ignored: a KeyboardInterrupt in one waiting for work, or starting, would break the pool with a traceback); this
    one sends it to them too (SIGTERM reached only this one), tells them to take no more, cancels the exports not
    begun, waits for the processes' end (the pool ends the others once one has: they are stopping anyway), removes
    what they were writing, and goes on with the KeyboardInterrupt. A second Ctrl-C meanwhile kills them, and so does
    `grace_s` without their end (an export process that does not stop, whatever holds it, does not keep the command
    from ending). SIGTERM does as Ctrl-C (migserve's main), and the processes die with this one, whatever kills it."""
    context = mp.get_context("spawn")
    lines, stop = context.Queue(), context.Event()
    scratch = leftovers.scratch()  # the processes' TMPDIR: removed here, even if they are killed; else by the next export
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        cleanup.enter_context(leftovers.held(scratch))
        pool = cleanup.enter_context(
            ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_process, initargs=(lines, stop, threads, os.getpid()))
        )
        futures: list[Future[ExportResult | str]] = []
        try:
            with _as_the_processes_start(scratch):  # the pool starts them at the submits
                for prefix, request in work:  # one at a time: those submitted are known whenever a signal comes
                    futures.append(pool.submit(_in_process, prefix, request))
            while not all(f.done() for f in futures):
                _print_lines(lines, err, 0.1)
        except KeyboardInterrupt:
            stop.set()  # for the exports not begun that a process has already taken
            processes = _signal_exports(signal.SIGINT)  # those running stop where they are (a terminal's Ctrl-C too)
            print("interrupted: stopping the exports in progress (Ctrl-C again kills them)", file=err, flush=True)
            try:
                pool.shutdown(wait=False, cancel_futures=True)
                if not _ended(futures, processes, grace_s, lambda: _print_lines(lines, err, 0.1)):
                    print(f"export processes still running {grace_s:g} s after the stop (--stop-grace-s), where:", file=err, flush=True)
                    print(_stacks(scratch), file=err, flush=True)
                    print("killing them", file=err, flush=True)
                    _kill_exports()
            except KeyboardInterrupt:
                _kill_exports()
            finally:
                _remove_partials(work)
            raise
    _print_lines(lines, err, 0)  # what came after the last look
    outcomes: list[ExportResult | str] = []
    for (prefix, _), future in zip(work, futures, strict=True):
        try:
            outcomes.append(future.result())
        except BrokenProcessPool as exc:
            reason = f"its export process died ({exc}); try --jobs 1, or more memory"
            print(f"{prefix}: FAILED: {reason}", file=err, flush=True)
            outcomes.append(reason)
    return outcomes


def _stacks(scratch: Path) -> str:
    """The stacks of the export processes' threads (faulthandler's, on SIGUSR1), one process after another, for a
    report: where those that do not stop stand."""
    _signal_exports(signal.SIGUSR1)
    time.sleep(STACKS_S)
    stacks = {path.stem.removeprefix("stacks-"): path.read_text().rstrip() for path in sorted(scratch.glob("stacks-*.txt"))}
    said = [f"export process {pid}:\n{text}" for pid, text in stacks.items() if text]  # not those that have ended
    return "\n".join(said) or "(none said where it stands)"


def _print_lines(lines: Any, err: TextIO, timeout_s: float) -> None:
    """The export processes' progress lines that come within `timeout_s`, printed."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(queue.Empty):
        while True:
            print(lines.get(timeout=max(0.0, deadline - time.monotonic())), file=err, flush=True)


def _ended(futures: list[Future[ExportResult | str]], processes: list[BaseProcess], grace_s: float, meanwhile: Callable[[], None]) -> bool:
    """Whether every export begun has returned (or failed with its process) and every export process ended, within
    `grace_s` seconds, `meanwhile` called between looks: the lines they send are taken, so that none waits on a full
    pipe. (Their sentinels tell, not join(): the pool's own thread reaps them, and a process reaped elsewhere looks
    alive to join's waitpid.)"""
    deadline = time.monotonic() + grace_s
    pending = {process.sentinel for process in processes}
    while not all(f.done() for f in futures) or pending:
        if (left := deadline - time.monotonic()) <= 0:
            return False
        meanwhile()
        pending.difference_update(connection.wait(list(pending), timeout=min(left, 0.1)))
    return True


@contextlib.contextmanager
def _as_the_processes_start(scratch: Path) -> Iterator[None]:
    """SIGINT ignored and TMPDIR `scratch` in this process for the block, for the export processes started in it to
    inherit."""
    handler, tmpdir = signal.signal(signal.SIGINT, signal.SIG_IGN), os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if tmpdir is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = tmpdir


def _kill_exports() -> None:
    """SIGKILL the export processes."""
    for process in _signal_exports(signal.SIGKILL):
        process.join(5)


def _remove_partials(work: list[tuple[str, ExportRequest]]) -> None:
    """Remove the folders that stopped export processes were writing (not those another export of the same models is
    writing, which that one holds)."""
    for _, request in work:
        for partial in request.out.glob(f".{request.name}.*.tmp"):
            leftovers.remove_unheld(partial)


def _signal_exports(signum: int) -> list[BaseProcess]:
    """Send `signum` to the export processes; which they are."""
    processes = mp.active_children()
    for pid in (process.pid for process in processes):
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
    return processes


def _unwritable(out: Path) -> str | None:
    """Why nothing can be written into `out` (made if need be), or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def up_to_date(model_dir: Path, request: ExportRequest) -> Contract | None:
    """The contract of a complete export that the request would write again (same size, precision, and seed or
    checkpoint) and whose model.onnx still has the contract's sha256; None where the model must be exported. An
    export with --set is always redone: contracts do not record options; one whose contract has no memory estimate
    (made before contracts carried it) is made again once, for placement to have it."""
    try:
        contract = read_contract(model_dir)
        made = contract.provenance
        same = contract.size == request.size and made.fp16 == request.fp16 and not request.options and contract.memory is not None
        if request.checkpoint is None:
            same = same and made.weights == "random-init" and made.seed == request.seed
        else:
            same = same and made.weights == "checkpoint" and made.checkpoint_sha256 == sha256_file(request.checkpoint)
        return contract if same and sha256_file(model_dir / contract.model_file) == contract.model_sha256 else None
    except (OSError, ValueError):
        return None


def format_table(results: list[ExportResult], failures: list[tuple[str, str]]) -> str:
    rows = [("model", "parameters", "onnx MB", "export s", "parity rel err", "weights")]
    rows += [
        (r.name, f"{r.parameters:,}", f"{r.onnx_bytes / 1e6:.1f}", f"{r.seconds:.1f}", f"{r.parity_error:.1e}", r.weights) for r in results
    ]
    rows += [(name, "-", "-", "-", "-", "FAILED") for name, _ in failures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i in (0, 5) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pairs(items: list[str], flag: str, names: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise BadOption(f"{flag} {item!r}: expected NAME=VALUE")
        if key not in names:
            known(key)  # an unknown name gets the unknown-model message
            raise BadOption(f"{flag} {item!r}: model {key} is not being exported")
        pairs[key] = value
    return pairs


def _options(items: list[str], names: list[str]) -> dict[str, dict[str, str]]:
    """`NAME.KEY=VALUE`, where NAME is a model or a family prefix such as `grounding`."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot:
            raise BadOption(f"--set {item!r}: expected NAME.KEY=VALUE")
        matched = [n for n in names if n == name or n.startswith(name + "-")]
        if not matched:
            raise BadOption(f"--set {item!r}: no model being exported is named {name!r} or starts with {name + '-'!r}")
        for model in matched:
            options.setdefault(model, {})[key] = value
    return options


def _list_models(out: TextIO) -> None:
    from . import zoo

    for name, mdef in zoo.ZOO.items():
        cfg: Mapping[str, object] = vars(mdef.config("paper"))
        print(f"{name:20s} {mdef.description}", file=out)
        print(f"{'':20s} options: {', '.join(f'{k}={v}' for k, v in cfg.items())}", file=out)
