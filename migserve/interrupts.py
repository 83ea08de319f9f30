"""SIGTERM taken as Ctrl-C, for the commands whose clean-up matters (an export's processes and temporary folders).

By default SIGTERM (a supervisor's stop, `timeout`, `kill`) ends a Python process at once, running no `finally`:
an export's processes would be left running as orphans, and its temporary folders behind. Within
`sigterm_interrupts()` it raises `Terminated` instead, a KeyboardInterrupt, so the command's Ctrl-C path runs;
`migserve`'s main then exits with 143 (128 + SIGTERM), as a shell reports a process that SIGTERM ended.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

TERMINATED_STATUS = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    was = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, was)
