"""Shared memory regions against a real, small /dev/shm: writing into a client's sparse object that /dev/shm
cannot back is an error, not a SIGBUS that kills the gateway."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, small_dev_shm

SCRIPT = """
import os
import numpy as np
from service.api.tensors import write_to_region
from service.errors import InferenceFailed
from service.regions import Regions, Slice

fd = os.open("/dev/shm/client_out", os.O_RDWR | os.O_CREAT)
os.ftruncate(fd, 8 << 20)  # sparse, as a client's SharedMemory(create=True) is: 8 MB on a 4 MB /dev/shm
regions = Regions()
regions.register("out", "/client_out", 0, 8 << 20)
where = regions.slice_of({"shared_memory_region": "out", "shared_memory_byte_size": 8 << 20}, "output x")
write_to_region("small", np.ones(1024, np.float32), Slice(where.region, 0, 4096))
try:
    write_to_region("x", np.ones(2 << 20, np.float32), where)
except InferenceFailed as exc:
    print("refused:", exc)
regions.unregister()
"""


def test_an_output_region_that_dev_shm_cannot_back_is_refused() -> None:
    prefix = small_dev_shm("4m")
    if prefix is None:
        pytest.skip("needs root, unshare and mount to give the test a small /dev/shm")
    run = subprocess.run([*prefix, sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: output x: no room in /dev/shm for its 8388608 bytes in region 'out'" in run.stdout


READER = """
import sys, time
from service.errors import BadRequest
from service.regions import Regions

regions = Regions()
regions.register("in", sys.argv[1], 0, 8 << 20)
where = regions.slice_of({"shared_memory_region": "in", "shared_memory_byte_size": 8 << 20}, "input x")
print("registered", flush=True)
read = refused = 0
end = time.monotonic() + 30
while time.monotonic() < end and (read < 20 or refused < 20):  # both, however busy the host is
    try:
        where.read("input x")
        read += 1
    except BadRequest as exc:
        assert "shrank to" in str(exc), exc
        refused += 1
print(read, refused)
"""


def test_a_region_the_client_shrinks_while_it_is_read_never_kills_the_reader() -> None:
    """The client may truncate its object at any moment, also between a size check and the copy that follows it:
    a read through a mapping then faults (SIGBUS, the gateway gone). Reads that come up short are refused instead."""
    name = f"migserve-test-{os.getpid()}"
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8 << 20)
        os.pwrite(fd, b"\x01" * (8 << 20), 0)
        reader = subprocess.Popen([sys.executable, "-c", READER, f"/{name}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert reader.stdout is not None
        assert reader.stdout.readline() == b"registered\n"
        # shrink and grow it back, over and over, until the reader is done (or dead): whole for 0.5 ms, shorter than an
        # 8 MB read on a busy host (so reads come up short), then for 5 ms (so some are whole)
        for whole in itertools.cycle((0.0005, 0.005)):
            if reader.poll() is not None:
                break
            os.ftruncate(fd, 4096)
            time.sleep(0.0005)
            os.ftruncate(fd, 8 << 20)
            time.sleep(whole)
        out, err = reader.communicate()
    finally:
        os.close(fd)
        Path(f"/dev/shm/{name}").unlink()
    assert reader.returncode == 0, f"reader ended with {reader.returncode}: {err.decode()[-2000:]}"
    read, refused = (int(n) for n in out.split())
    assert read > 0 and refused > 0, (read, refused)
