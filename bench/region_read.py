"""Copying an input out of a client's shared memory region: through a mapping, or with pread (issue 3).

The gateway copies each input that a request names in a registered region (Triton's system shared memory) as it
decodes the request. It used to copy from a mapping of the client's object after checking the object's size; a
client that shrank the object between the check and the copy killed the gateway with SIGBUS. It now reads with
pread (service/regions.py), where a shrunk object gives a short read. This times both ways side by side, in
interleaved rounds, for tensors of a face-pros image to a CT volume, in one process on one core:

    .venv/bin/python -m bench.region_read
    .venv/bin/python -m bench.region_read --sizes 0.6 32 --rounds 9
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from pathlib import Path

import numpy as np

from service.regions import Regions

MB = 1 << 20


def _per_copy(copy: object, seconds: float) -> float:
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        copy()  # type: ignore[operator]
        runs += 1
    return elapsed / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.6, 4.0, 32.0], help="tensor sizes, MB (default: 0.6 4 32)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per size (default: 7)")
    parser.add_argument("--seconds", type=float, default=0.3, help="each way's time per round (default: 0.3)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    name = f"migserve-bench-{os.getpid()}"
    path = Path("/dev/shm") / name
    print("| MB | mapping, ms (median) | pread, ms (median) | pread / mapping (median of rounds) |")
    print("| ---: | ---: | ---: | ---: |")
    try:
        for size_mb in args.sizes:
            nbytes = int(size_mb * MB)
            path.write_bytes(np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes())
            regions = Regions()
            regions.register("r", f"/{name}", 0, nbytes)
            where = regions.slice_of({"shared_memory_region": "r", "shared_memory_byte_size": nbytes}, "input")
            assert where is not None
            fd = os.open(path, os.O_RDONLY)
            mapping = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)

            def mapped(fd: int = fd, mapping: mmap.mmap = mapping, nbytes: int = nbytes) -> object:
                if os.fstat(fd).st_size < nbytes:  # the old way: the size checked, then the copy
                    raise RuntimeError("shrank")
                return np.frombuffer(mapping, np.uint8, nbytes).copy()

            assert bytes(mapped()) == bytes(where.read("input"))  # type: ignore[call-overload]
            old, new, ratios = [], [], []
            for _ in range(args.rounds):
                old.append(_per_copy(mapped, args.seconds))
                new.append(_per_copy(lambda where=where: where.read("input"), args.seconds))
                ratios.append(new[-1] / old[-1])
            print(
                f"| {size_mb:g} | {statistics.median(old) * 1e3:.3f} | {statistics.median(new) * 1e3:.3f} | "
                f"{statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f}) |"
            )
            mapping.close()
            os.close(fd)
            regions.unregister()
    finally:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
