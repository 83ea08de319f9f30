"""Messages larger than a socket's buffer between processes whose ends are watched by uvloop."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading

import uvloop

from service.workers.protocol import watch

BIG = b"x" * (4 << 20)  # far past a socketpair's buffer: written and read in many system calls


def test_a_watched_connection_reads_and_writes_whole_messages_larger_than_its_buffer() -> None:
    """uvloop makes a watched descriptor non-blocking; a Connection then failed halfway through a large message
    with BlockingIOError (a front-end's metrics for ten models stopped arriving after a few scrapes)."""
    ours, theirs = mp.Pipe()
    received: list[object] = []

    def peer() -> None:  # the other process: answers each message with a large one
        for _ in range(3):
            theirs.recv()
            theirs.send(BIG)

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        def on_message() -> None:
            received.append(ours.recv())
            if len(received) < 3:
                ours.send(BIG)  # a large message out through the watched end, too
            elif not done.done():
                done.set_result(None)

        watch(ours, on_message)
        ours.send(BIG)
        await asyncio.wait_for(done, 30)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    uvloop.run(main())
    thread.join(5)
    assert received == [BIG, BIG, BIG]
