"""Connections that send nothing, more than the gateway has open files for: this checkout against an older git
revision (A and B in turn).

    .venv/bin/python -m bench.conn_flood --a-revision cceeb39 --rounds 2

Each round starts the gateway (crowd-csrnet on one CPU slice) under `prlimit --nofile=1024:1024`, connects a client
that sends an inference request, and will send one every 0.5 s, then opens --flood connections (default 2000) that send nothing
(a slowloris), SIGKILLs the worker 1 s later and watches for --seconds (default 15):
- every 0.5 s a new client asks GET /v2/health/ready: answered (its status; "503 connections" where the answer names
  --max-connections, a plain 503 where the model is not ready) or dropped (reset, closed without an answer, or no
  answer within 2 s);
- the client connected before the flood: its answers' statuses;
- the worker: seconds from the kill until the gateway logs it ready again;
- the flood's connections the gateway had closed by the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

from bench.gateway_bench import ROOT, Server, bodies, export
from tests.helpers import read_response

FILES = 1024
PROBE = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _status(sock: socket.socket) -> str:
    """The status an answer begins with ("503 connections" where it names --max-connections), or why there was none."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        if not data:
            return "no answer in 2 s"
    except OSError:
        if not data:
            return "reset"
    if not data.startswith(b"HTTP/1.1 "):
        return "closed unanswered"
    return data.split(b" ", 2)[1].decode() + (" connections" if b"--max-connections" in data else "")


def _closed(sock: socket.socket) -> bool:
    """Whether the gateway has ended the connection (what it sent first, an answer, read and dropped)."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 16):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset
    return True


def probe(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(PROBE)
            return _status(sock)
    except TimeoutError:
        return "no answer in 2 s"
    except OSError:
        return "reset"


def _request(repo: Path) -> bytes:
    """A binary crowd-csrnet request (a 16x16 image), head and body."""
    body, headers = bodies(repo, "crowd-csrnet", {"height": 16, "width": 16})["binary"]
    head = f"POST /v2/models/crowd-csrnet/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    return (head + "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n").encode() + body


def _answered(reader: BinaryIO, sock: socket.socket, request: bytes) -> str:
    """One request on the kept connection: its answer's status (the answer read whole), or "lost"."""
    try:
        sock.sendall(request)
        return str(read_response(reader)[0])
    except (OSError, AssertionError, ValueError, IndexError):  # reset, closed before an answer, not HTTP
        return "lost"


def flood_round(repo: Path, revision: str | None, flood: int, seconds: float, log: Path) -> dict[str, Any]:
    server = Server(
        repo,
        "--models",
        "crowd-csrnet",
        "--cpu-slices",
        "1",
        "--log-level",
        "info",
        revision=revision,
        log=log,
        prefix=("prlimit", f"--nofile={FILES}:{FILES}"),
    )
    held: list[socket.socket] = []
    try:
        (worker,) = [p["pid"] for p in server.partitions()]
        request = _request(repo)
        kept = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        reader = kept.makefile("rb")
        kept_answers: Counter[str] = Counter([_answered(reader, kept, request)])  # a client served before the flood
        for _ in range(flood):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
        probes: Counter[str] = Counter()
        killed_at = back_after = None
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            if killed_at is None and now - start >= 1:
                os.kill(worker, signal.SIGKILL)
                killed_at = now
            if killed_at is not None and back_after is None and log.read_text().count("worker cpu-0 ready") >= 2:
                back_after = now - killed_at
            probes[probe(server.port)] += 1
            kept_answers[_answered(reader, kept, request)] += 1
            time.sleep(max(0.0, 0.5 - (time.monotonic() - now)))
        closed = sum(_closed(sock) for sock in held)
        reader.close()
        kept.close()
        return {"probes": dict(probes), "kept": dict(kept_answers), "back_after": back_after, "closed": closed, "opened": len(held)}
    finally:
        for sock in held:
            sock.close()
        server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-revision", required=True, help="run A as this git revision had the service")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flood", type=int, default=2000, help="connections that send nothing (default: 2000)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, "crowd-csrnet")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for label, revision in (("A", args.a_revision), ("B", None)):
                result = flood_round(args.repo, revision, args.flood, args.seconds, Path(tmp) / f"{label}{round_}.log")
                rows.append((label, round_, result))
                print(f"{label} round {round_}: {result}", file=sys.stderr, flush=True)
    print(f"\n{args.flood} connections sending nothing, under {FILES} open files; A at {args.a_revision}, B this checkout\n")
    columns = ["side", "round", "new clients' answers (every 0.5 s)", "the kept client's answers", "worker back after", "flood closed"]
    print("| " + " | ".join(columns) + " |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for label, round_, r in rows:
        answers, kept = (", ".join(f"{k}: {v}" for k, v in sorted(r[key].items())) for key in ("probes", "kept"))
        back = "not within the run" if r["back_after"] is None else f"{r['back_after']:.1f} s"
        print(f"| {label} | {round_} | {answers} | {kept} | {back} | {r['closed']} of {r['opened']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
