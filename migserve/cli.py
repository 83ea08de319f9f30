"""The `migserve` command. Each subcommand imports its side lazily, so `migserve --help`
needs neither torch nor onnxruntime."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import bench.cli
import bench.mig
import exporters.cli
import service.cli

from . import __version__
from . import deploy as deploy_cli
from .interrupts import TERMINATED_STATUS, Terminated, sigterm_interrupts


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command(
        "export",
        "export models to ONNX and a Triton model repository (needs the export extra)",
        "Export zoo models to verified ONNX, a Triton config and a contract, one directory per model.",
        exporters.cli.add_arguments,
        exporters.cli.run,
    ),
    Command(
        "serve",
        "start the gateway: KServe v2 over HTTP, one worker per partition",
        "Serve the model repository: discover partitions, start a worker per partition, batch and dispatch requests.",
        service.cli.add_arguments,
        service.cli.run,
    ),
    Command(
        "deploy",
        "generate docker-compose files or Kubernetes manifests from a MIG topology",
        "Write deployment files for a topology of MIG instances: one Triton per instance, the gateway, monitoring.",
        deploy_cli.add_arguments,
        deploy_cli.run,
    ),
    Command(
        "mig",
        "list MIG state and profiles; apply or clear a layout (dry run unless --yes)",
        "Inspect and change MIG layouts through nvidia-smi. apply and clear only print their commands without --yes.",
        bench.mig.add_arguments,
        bench.mig.run,
    ),
    Command(
        "bench",
        "profile models on partitions: latency, throughput, resource use (MIGPerf-style)",
        "Profile inference (sweeps with CSV, JSON, plots, report), training steps, and MIG vs MPS vs time-slicing.",
        bench.cli.add_arguments,
        bench.cli.run,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migserve", description="Serve research vision models on MIG-partitioned GPUs.")
    parser.add_argument("--version", action="version", version=f"migserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_arguments(commands.add_parser(command.name, help=command.help, description=command.description))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with contextlib.nullcontext() if args.command == "serve" else sigterm_interrupts():
            return next(c.run for c in COMMANDS if c.name == args.command)(args)
    except Terminated:
        print(f"migserve {args.command}: terminated", file=sys.stderr)
        return TERMINATED_STATUS
    except KeyboardInterrupt:
        if args.command != "serve":  # a stopped gateway has said so in its log
            print(f"migserve {args.command}: interrupted", file=sys.stderr)
        sys.excepthook = _quiet_interrupt
        raise


def _quiet_interrupt(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    """Ctrl-C, once said: Python goes on to end the process by SIGINT after its clean-up (as a terminal's job that
    Ctrl-C stops should, so that a shell running it in a loop stops too), without a traceback."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)


if __name__ == "__main__":
    raise SystemExit(main())
