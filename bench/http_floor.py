"""The HTTP server's own cost: CPU per request of a bare uvicorn app that reads a request and answers `{}`.

The same server stack as the gateway (uvicorn, uvloop, httptools), the same body as
`bench/gateway_bench.py` sends (a face-pros binary request, about 600 KB), the same
load (wrk, concurrency 32). No decoding, no batching, no model: what is left is the
floor under the gateway's own CPU per request on this machine.

    .venv/bin/python -m bench.http_floor [--seconds 6]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench.gateway_bench import ROOT, bodies, closed_loop

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    body, headers = bodies(ROOT / "results" / "bench_repo", "face-pros", {})["binary"]
    print(f"body {len(body)} bytes, concurrency 32")
    for variant in ("read", "join"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-c", APP, str(port), variant])
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
        what = "reads the body" if variant == "read" else "reads and joins the body"
        print(f"  server that {what}: {result['samples_per_s']:.0f} requests/s, {result['gateway_cpu_ms']:.3f} ms CPU per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
