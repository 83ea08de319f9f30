"""The HTTP server's own cost: CPU per request of a bare server that reads a request and answers `{}`.

Three bare servers, the same body as `bench/gateway_bench.py` sends (a face-pros binary
request, about 600 KB), the same load (wrk, concurrency 32). No decoding, no batching,
no model: what is left is the floor under the gateway's own CPU per request.
  read      an ASGI app under uvicorn (uvloop, httptools) that reads the body's chunks
  join      the same, joining the chunks into one bytes object
  buffered  an asyncio BufferedProtocol on uvloop that has the kernel write the body into one
            buffer: how the gateway's own connection code (service/api/connection.py) reads it

    .venv/bin/python -m bench.http_floor [--seconds 6]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench.gateway_bench import ROOT, bodies, closed_loop
from bench.ports import free_port

APP = """
import sys, uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    if sys.argv[2] == "join":
        b"".join(chunks)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

BUFFERED = """
import asyncio, sys, uvloop

class Connection(asyncio.BufferedProtocol):
    def __init__(self):
        self.scratch, self.pending, self.body, self.received = bytearray(4096), bytearray(), None, 0

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return memoryview(self.body)[self.received:] if self.body is not None else memoryview(self.scratch)

    def buffer_updated(self, n):
        if self.body is not None:
            self.received += n
        else:
            self.pending += self.scratch[:n]
            end = self.pending.find(b"\\r\\n\\r\\n")
            if end < 0:
                return
            lines = self.pending[:end].split(b"\\r\\n")
            length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
            self.body = bytearray(length)
            self.received = len(self.pending) - end - 4
            self.body[:self.received] = self.pending[end + 4:]
            self.pending = bytearray()
        if self.received == len(self.body):
            self.body = None
            self.transport.write(b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: 2\\r\\n\\r\\n{}")

async def main():
    server = await asyncio.get_running_loop().create_server(Connection, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

uvloop.run(main())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    body, headers = bodies(ROOT / "results" / "bench_repo", "face-pros", {})["binary"]
    print(f"body {len(body)} bytes, concurrency 32")
    for variant in ("read", "join", "buffered"):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", BUFFERED if variant == "buffered" else APP, str(port), variant])
        try:
            url = f"http://127.0.0.1:{port}/v2/models/face-pros/infer"
            for _ in range(100):
                try:
                    urllib.request.urlopen(url, data=b"{}", timeout=1).close()
                    break
                except (urllib.error.URLError, OSError):
                    time.sleep(0.1)
            result = closed_loop(url, body, headers, 32, args.seconds, server_pid=server.pid)
        finally:
            server.terminate()
            server.wait(10)
        what = {"read": "uvicorn, reads the body", "join": "uvicorn, reads and joins the body", "buffered": "BufferedProtocol, one buffer"}
        print(f"  {what[variant]}: {result['samples_per_s']:.0f} requests/s, {result['gateway_cpu_ms']:.3f} ms CPU per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
