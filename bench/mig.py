"""`migserve mig`: list MIG state, read the GPU's profiles, and apply or clear a layout.

Everything goes through `nvidia-smi` (MIGSERVE_NVIDIA_SMI names another binary, as
the tests do with a replay of captured outputs). Profiles are parsed from
`nvidia-smi mig -lgip` at run time, never taken from a table. `apply` and `clear`
print the commands they would run and change nothing unless given `--yes`; `apply`
refuses a GPU that already has GPU instances, since someone may rely on them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

from migserve.interrupts import signals_deferred

from .smi import EventKind, GpuInstanceProfile, parse_compute_instances, parse_devices, parse_events, parse_gpu_instances, parse_profiles


class MigError(Exception):
    """What went wrong, said so that the user knows what to do."""


@dataclass(frozen=True)
class Smi:
    binary: str

    @classmethod
    def from_env(cls) -> Smi:
        return cls(os.environ.get("MIGSERVE_NVIDIA_SMI", "nvidia-smi"))

    def run(self, *args: str, check: bool = True, own_session: bool = False) -> subprocess.CompletedProcess[str]:
        """`own_session`: in a session of its own, so that a terminal's Ctrl-C does not reach it."""
        try:
            done = subprocess.run(
                [self.binary, *args], capture_output=True, text=True, check=False, timeout=120, start_new_session=own_session
            )
        except FileNotFoundError:
            raise MigError(f"{self.binary} not found: MIG needs an NVIDIA driver (set MIGSERVE_NVIDIA_SMI to another path)") from None
        if check and done.returncode != 0:
            raise MigError(f"{self.binary} {' '.join(args)} failed ({done.returncode}): {(done.stdout + done.stderr).strip()[:500]}")
        return done


def parse_layout(layout: str) -> list[str]:
    """'3g.40gb,2g.20gb,2g.20gb' or '7x1g.10gb' or '2x3g.40gb,1g.10gb' -> profile names."""
    names = []
    for part in filter(None, (p.strip() for p in layout.split(","))):
        match = re.fullmatch(r"(?:(\d+)x)?(\d+g\.\d+gb(?:\+\w+)?)", part)
        if match is None:
            raise MigError(f"layout part {part!r}: expected a profile like 3g.40gb, or COUNTx1g.10gb")
        names += [match[2]] * int(match[1] or 1)
    if not names:
        raise MigError("empty layout")
    return names


def plan_apply(names: list[str], profiles: list[GpuInstanceProfile], gpu: int) -> list[str]:
    """The nvidia-smi command that creates the layout's GPU and compute instances, checked against the profiles."""
    by_name = {p.name: p for p in profiles}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise MigError(f"profiles {sorted(set(unknown))} are not offered by GPU {gpu}; it offers: {', '.join(by_name)}")
    for name, count in Counter(names).items():
        if count > by_name[name].free:
            raise MigError(f"{count} x {name} asked, GPU {gpu} has {by_name[name].free} of {by_name[name].total} free")
    capacity = max(p.slices for p in profiles)
    if (used := sum(by_name[n].slices for n in names)) > capacity:
        raise MigError(f"the layout needs {used} compute slices; GPU {gpu} has {capacity}")
    ids = ",".join(str(by_name[n].id) for n in names)
    return [f"mig -i {gpu} -cgi {ids} -C"]


def plan_clear(gpu: int) -> list[str]:
    return [f"mig -i {gpu} -dci", f"mig -i {gpu} -dgi"]


def execute(smi: Smi, commands: list[str], out: TextIO) -> None:
    """Run `commands`, each to its end: Ctrl-C or SIGTERM meanwhile lets the running one finish (killed half-way, it
    could leave instances half-made) and is taken after it, the rest not run."""
    for i, command in enumerate(commands):
        try:
            with signals_deferred(signal.SIGINT, signal.SIGTERM):
                _report(smi, command, smi.run(*shlex.split(command), check=False, own_session=True), out)
        except KeyboardInterrupt:
            not_run = "; ".join(commands[i + 1 :]) or "none"
            print(f"stopped once {smi.binary} {command} had finished; not run: {not_run}", file=out, flush=True)
            raise


def _report(smi: Smi, command: str, done: subprocess.CompletedProcess[str], out: TextIO) -> None:
    """What the driver said of `command`, a line each; MigError if it refused any of it."""
    events = parse_events(done.stdout + done.stderr)
    for event in events:
        print(f"  {event.text}", file=out)
    errors = [e for e in events if e.kind is EventKind.ERROR]
    if errors or done.returncode != 0:
        reason = errors[0].reason if errors else (done.stdout + done.stderr).strip()[:300]
        hint = " (stop the processes using the GPU first)" if reason and "In use" in reason else ""
        raise MigError(f"{smi.binary} {command}: {reason}{hint}")


def list_state(smi: Smi, out: TextIO) -> None:
    devices = parse_devices(smi.run("-L").stdout)
    for device in devices:
        indent = "    " if device.mig_index is not None else ""
        label = f"MIG {device.name} device {device.mig_index}" if device.mig_index is not None else f"GPU {device.gpu}: {device.name}"
        print(f"{indent}{label}  {device.uuid}", file=out)
    gis = smi.run("mig", "-lgi", check=False)
    if gis.returncode != 0:
        print("no GPU instances (MIG mode off, or none created)", file=out)
        return
    print("GPU instances:", file=out)
    for gi in parse_gpu_instances(gis.stdout):
        print(f"  GPU {gi.gpu}  GI {gi.instance_id:>2}  {gi.name:<12} profile {gi.profile_id:>2}  placement {gi.start}:{gi.size}", file=out)
    cis = smi.run("mig", "-lci", check=False)
    if cis.returncode == 0:
        print("compute instances:", file=out)
        for ci in parse_compute_instances(cis.stdout):
            print(
                f"  GPU {ci.gpu}  GI {ci.gpu_instance_id:>2}  CI {ci.instance_id}  {ci.name:<12} placement {ci.start}:{ci.size}", file=out
            )


def show_profiles(smi: Smi, gpu: int | None, out: TextIO) -> list[GpuInstanceProfile]:
    profiles = parse_profiles(smi.run("mig", *(["-i", str(gpu)] if gpu is not None else []), "-lgip").stdout)
    print(f"{'GPU':>3}  {'profile':<14} {'ID':>3}  {'free/total':>10}  {'GiB':>6}  {'SMs':>4}  {'slices':>6}", file=out)
    for p in profiles:
        print(f"{p.gpu:>3}  {p.name:<14} {p.id:>3}  {p.free:>4}/{p.total:<5}  {p.memory_gib:>6.2f}  {p.sm:>4}  {p.slices:>6}", file=out)
    return profiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="mig_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="GPUs, MIG devices with UUIDs, GPU and compute instances")
    profiles = actions.add_parser("profiles", help="the GPU instance profiles the driver offers (nvidia-smi mig -lgip)")
    profiles.add_argument("--gpu", type=int, help="one GPU (default: all)")
    apply = actions.add_parser("apply", help="create a layout of GPU instances (dry run unless --yes)")
    apply.add_argument("layout", help="profiles, e.g. 3g.40gb,2g.20gb,2g.20gb or 7x1g.10gb")
    clear = actions.add_parser("clear", help="destroy every compute and GPU instance of a GPU (dry run unless --yes)")
    for action in (apply, clear):
        action.add_argument("--gpu", type=int, default=0, help="GPU index (default: 0)")
        action.add_argument("--yes", action="store_true", help="run the commands; without it they are only printed")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    smi = Smi.from_env()
    try:
        if args.mig_command == "list":
            list_state(smi, out)
        elif args.mig_command == "profiles":
            show_profiles(smi, args.gpu, out)
        else:
            commands = _plan(smi, args)
            for command in commands:
                print(f"{'running' if args.yes else 'would run'}: {smi.binary} {command}", file=out)
            if not args.yes:
                print("dry run: nothing changed; add --yes to run these", file=out)
                return 0
            execute(smi, commands, out)
    except (MigError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return 1
    return 0


def _plan(smi: Smi, args: argparse.Namespace) -> list[str]:
    if args.mig_command == "clear":
        return plan_clear(args.gpu)
    names = parse_layout(args.layout)
    existing = smi.run("mig", "-i", str(args.gpu), "-lgi", check=False)
    if existing.returncode == 0 and (instances := parse_gpu_instances(existing.stdout)):
        held = ", ".join(f"GI {g.instance_id} {g.name}" for g in instances)
        raise MigError(f"GPU {args.gpu} already has GPU instances ({held}); if no one relies on them: migserve mig clear --gpu {args.gpu}")
    profiles = parse_profiles(smi.run("mig", "-i", str(args.gpu), "-lgip").stdout)
    return plan_apply(names, profiles, args.gpu)
