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
        refs = arena.write(_batch(320, 0))  # 80 MiB: over SHRINK_ABOVE
        assert arena.segment is not None
        large = arena.segment.name
        assert arena.segment.size >= 80 << 20 and (shm.SHM_DIR / large).exists()
        for i in range(2 * shm.SHRINK_AFTER):  # the watch that saw the large one, then one of small ones alone
            batch = _batch(1, i)
            refs = arena.write(batch)
            np.testing.assert_array_equal(reader.view(refs["x"]), batch["x"][0])  # the reader follows each new name
        assert arena.segment.size == shm.MIN_ARENA, "twice the largest of the last writes, at least MIN_ARENA"
        assert not (shm.SHM_DIR / large).exists(), "the large one is unlinked"
    finally:
        reader.close()
        arena.close()


def test_an_arena_its_batches_still_use_or_one_of_up_to_64_mb_keeps_its_size() -> None:
    for large, small in ((320, 80), (128, 1)):  # 80 MiB used by a quarter now and then; 32 MiB, under SHRINK_ABOVE
        arena = shm.Arena()
        try:
            arena.write(_batch(large, 0))
            assert arena.segment is not None
            name = arena.segment.name
            for i in range(2 * shm.SHRINK_AFTER):
                arena.write(_batch(large if small > 1 and i % shm.SHRINK_AFTER == 7 else small, i))
            assert arena.segment.name == name
        finally:
            arena.close()
