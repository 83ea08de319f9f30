"""`migserve bench ACTION`: profile (inference sweep), train (training steps), share (MIG vs MPS vs time-slicing)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from . import profile, share, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    profile.add_parser(actions)
    train.add_parser(actions)
    share.add_parser(actions)


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    action = {"profile": profile.run, "train": train.run, "share": share.run}[args.bench_command]
    return action(args, out, err)
