"""Batch arenas in real shared memory (/dev/shm): they grow to a batch and shrink back once batches stay small."""

from __future__ import annotations

import numpy as np

from migserve.types import Array
from service.workers import shm


def _batch(rows: int, seed: int) -> dict[str, list[Array]]:
    return {"x": [np.random.default_rng(seed).random((rows, 256, 256), dtype=np.float32)]}  # 256 KiB a row


def test_an_arena_grown_by_one_large_batch_shrinks_once_batches_stay_small() -> None:
    arena, reader = shm.Arena(), shm.Attachments()
    try:
        refs = arena.write(_batch(32, 0))  # 8 MiB
        assert arena.segment is not None
        large = arena.segment.name
        assert arena.segment.size >= 8 << 20 and (shm.SHM_DIR / large).exists()
        for i in range(2 * shm.SHRINK_AFTER):  # the watch that saw the large one, then one of small ones alone
            batch = _batch(1, i)
            refs = arena.write(batch)
            np.testing.assert_array_equal(reader.view(refs["x"]), batch["x"][0])  # the reader follows each new name
        assert arena.segment.size == shm.MIN_ARENA, "twice the largest of the last writes, at least MIN_ARENA"
        assert not (shm.SHM_DIR / large).exists(), "the large one is unlinked"
    finally:
        reader.close()
        arena.close()


def test_an_arena_its_batches_still_use_keeps_its_size() -> None:
    arena = shm.Arena()
    try:
        arena.write(_batch(32, 0))
        assert arena.segment is not None
        name = arena.segment.name
        for i in range(2 * shm.SHRINK_AFTER):
            arena.write(_batch(32 if i % shm.SHRINK_AFTER == 7 else 8, i))  # a quarter of the size, and now and then all of it
        assert arena.segment.name == name
    finally:
        arena.close()
