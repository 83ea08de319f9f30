"""Helpers shared by the test folders: running the CLI as a user does."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def migserve(*args: str | Path, cwd: Path = ROOT, timeout: float = 600) -> CliRun:
    """Run the CLI in a fresh interpreter, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "migserve", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    return CliRun(proc.returncode, proc.stdout, proc.stderr)


@dataclass(frozen=True)
class ExportedRepo:
    root: Path
    run: CliRun
