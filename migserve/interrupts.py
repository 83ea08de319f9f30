"""SIGTERM taken as Ctrl-C, so that a command's clean-up runs (an export's processes and temporary folders, a bench's
child processes and the points that finished); and both held back over a few steps that must not be cut in two.

By default SIGTERM (a supervisor's stop, `timeout`, `kill`) ends a Python process at once, running no `finally`:
an export's or a bench's processes would be left running as orphans, its temporary folders behind. Within
`sigterm_interrupts()` (`migserve`'s main, around every command but `serve`, whose server stops on it in order) it
raises `Terminated` instead, a KeyboardInterrupt, so the command's Ctrl-C path runs; `migserve`'s main then exits
with 143 (128 + SIGTERM), as a shell reports a process that SIGTERM ended.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TextIO

TERMINATED_STATUS = 128 + signal.SIGTERM
INTERRUPTED_STATUS = 128 + signal.SIGINT
Handler = Callable[[int, FrameType | None], Any] | int | None  # what signal.signal returns


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be."""


class Stop:
    """What stopped a command that keeps its finished work, if anything did: Ctrl-C, or SIGTERM's Terminated."""

    __slots__ = ("by",)

    def __init__(self) -> None:
        self.by: KeyboardInterrupt | None = None

    def status(self, otherwise: int) -> int:
        """The command's exit status: Ctrl-C's or SIGTERM's if it was stopped (whatever it kept), else `otherwise`."""
        if self.by is None:
            return otherwise
        return TERMINATED_STATUS if isinstance(self.by, Terminated) else INTERRUPTED_STATUS


@contextlib.contextmanager
def keeping_what_finished(err: TextIO, what: str) -> Iterator[Stop]:
    """Ctrl-C or SIGTERM in the block ends it, says "interrupted (or terminated): keeping the `what` that finished",
    and is recorded in the Stop yielded, for the command to report what finished and exit with `Stop.status`."""
    stop = Stop()
    try:
        yield stop
    except KeyboardInterrupt as exc:
        stop.by = exc
        print(f"\n{'terminated' if isinstance(exc, Terminated) else 'interrupted'}: keeping the {what} that finished", file=err)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    was = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        _restore(signal.SIGTERM, was)


@contextlib.contextmanager
def signals_deferred(*signums: int) -> Iterator[None]:
    """The signals that come during the block are taken at its end, as they would have been. (Blocking them with
    pthread_sigmask is not enough: the kernel gives a process's signal to another of its threads, and Python runs
    the handler in the main thread at once.) Python runs handlers in the main thread only, so elsewhere this defers
    nothing and needs nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {signum: signal.signal(signum, lambda got, frame: came.append(got)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            _restore(signum, handler)
        for signum in came:
            signal.raise_signal(signum)


def _restore(signum: int, handler: Handler) -> None:
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: one not set from Python
