"""The `migserve` command. Each subcommand imports its side lazily, so `migserve --help`
needs neither torch nor onnxruntime."""

from __future__ import annotations

import argparse

import bench.cli
import bench.mig
import exporters.cli
import service.cli

from . import __version__
from . import deploy as deploy_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migserve", description="Serve research vision models on MIG-partitioned GPUs.")
    parser.add_argument("--version", action="version", version=f"migserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export",
        help="export models to ONNX and a Triton model repository (needs the export extra)",
        description="Export zoo models to verified ONNX, a Triton config and a contract, one directory per model.",
    )
    exporters.cli.add_arguments(export)
    serve = commands.add_parser(
        "serve",
        help="start the gateway: KServe v2 over HTTP, one worker per partition",
        description="Serve the model repository: discover partitions, start a worker per partition, batch and dispatch requests.",
    )
    service.cli.add_arguments(serve)
    deploy = commands.add_parser(
        "deploy",
        help="generate docker-compose files or Kubernetes manifests from a MIG topology",
        description="Write deployment files for a topology of MIG instances: one Triton per instance, the gateway, monitoring.",
    )
    deploy_cli.add_arguments(deploy)
    mig = commands.add_parser(
        "mig",
        help="list MIG state and profiles; apply or clear a layout (dry run unless --yes)",
        description="Inspect and change MIG layouts through nvidia-smi. apply and clear only print their commands without --yes.",
    )
    bench.mig.add_arguments(mig)
    bench_parser = commands.add_parser(
        "bench",
        help="profile models on partitions: latency, throughput, resource use (MIGPerf-style)",
        description="Profile inference (sweeps with CSV, JSON, plots, report), training steps, and MIG vs MPS vs time-slicing.",
    )
    bench.cli.add_arguments(bench_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        return exporters.cli.run(args)
    if args.command == "serve":
        return service.cli.run(args)
    if args.command == "deploy":
        return deploy_cli.run(args)
    if args.command == "mig":
        return bench.mig.run(args)
    if args.command == "bench":
        return bench.cli.run(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
