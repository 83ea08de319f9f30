"""Shared memory regions against a real, small /dev/shm: writing into a client's sparse object that /dev/shm
cannot back is an error, not a SIGBUS that kills the gateway."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, small_dev_shm

SCRIPT = """
import os
import numpy as np
from service.api.kserve import write_to_region
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
