"""What a killed export leaves behind, and the next export's clean-up of it.

An export writes each model into a hidden folder beside it (`.NAME.KEY.tmp`), then renames it into place; a re-export
first moves the earlier folder aside (`.NAME.KEY.old`, the same KEY) and removes it once the new one is in. The
export's processes get a TMPDIR of their own (`migserve-export-*` in the temporary directory). Ctrl-C and SIGTERM
remove all of these on the way out; a SIGKILL or the OOM killer cannot, and with nothing else they would stay.

So each is held while its writer lives: the writer keeps an exclusive `flock` on the folder (on a re-export the lock
moves with the new folder into place), and the kernel lets go of it when the writer dies, whatever kills it, and in
whatever PID namespace it ran. The next export takes what nobody holds: a `.tmp` or TMPDIR it removes; a `.old` it
puts back where the model's folder should be if that is missing (the writer died between the two renames, and the
earlier model is whole), else removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SCRATCH_PREFIX = "migserve-export-"
UNLOCKED_FOR_S = 60.0  # a writer locks its folder just after making it: a younger unlocked folder may be one of those
HIDDEN = re.compile(r"\.(?P<name>[^./]+)\.(?P<key>[^./]+)\.(?P<kind>tmp|old)")


@contextlib.contextmanager
def held(folder: Path) -> Iterator[None]:
    """This process holds `folder` over the block (and, after a rename, under its new name), until it dies at the
    latest."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _if_unheld(folder: Path) -> Iterator[bool]:
    """Whether nobody holds `folder` (a folder that is not there: nobody); if so, this process holds it over the
    block."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield True
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def scratch() -> Path:
    """A new TMPDIR for an export's processes."""
    return Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))


def sweep(out: Path) -> list[str]:
    """Clean up what killed exports left in the model repository `out` and in the temporary directory; what was done,
    a line each."""
    done: list[str] = []
    found = [match for entry in sorted(_entries(out)) if (match := HIDDEN.fullmatch(entry))]
    for match in (m for m in found if m["kind"] == "old"):  # first: a .tmp beside a .old tells whether it is held
        done += _take_back(out, out / match.string, match["name"])
    for folder in (out / m.string for m in found if m["kind"] == "tmp"):
        if folder.is_dir() and _old_enough(folder) and remove_unheld(folder):
            done.append(f"removed {folder}: the unfinished folder of an export that was killed")
    temporary = Path(tempfile.gettempdir())
    for folder in sorted(temporary.glob(f"{SCRATCH_PREFIX}*")):
        if folder.is_dir() and _old_enough(folder) and remove_unheld(folder):
            done.append(f"removed {folder}: the temporary directory of an export that was killed")
    return done


def _take_back(out: Path, old: Path, name: str) -> list[str]:
    """A model folder moved aside for a re-export: while its re-export's new folder (`.tmp`, or once renamed, the
    model's own) is held, left alone; after, put back if the model has no folder, else removed."""
    final, tmp = out / name, old.with_suffix(".tmp")
    writer = tmp if tmp.exists() else final
    with _if_unheld(writer) as unheld:
        if not unheld:
            return []
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            return [f"removed {old}: an earlier {name} moved aside by an export that was killed"]
        old.rename(final)
    return [f"put back {final}: an export killed while replacing it had moved it aside as {old.name}"]


def remove_unheld(folder: Path) -> bool:
    """Remove `folder` if nobody holds it; whether it was."""
    with _if_unheld(folder) as unheld:
        if unheld:
            shutil.rmtree(folder, ignore_errors=True)
    return unheld


def _old_enough(folder: Path) -> bool:
    try:
        return time.time() - folder.stat().st_mtime >= UNLOCKED_FOR_S
    except FileNotFoundError:
        return False


def _entries(out: Path) -> list[str]:
    try:
        return [entry.name for entry in out.iterdir()]
    except FileNotFoundError:
        return []
