"""A stand-in for `nvidia-smi` on machines without NVIDIA GPUs: it replays captured real outputs.

FAKE_SMI_REPLIES is a JSON object mapping the joined arguments ("mig -i 0 -lgip") to
[fixture file name, exit code]; the fixture's text is printed from FAKE_SMI_DIR.
Every call is appended to FAKE_SMI_LOG, so tests can check what was (not) run. FAKE_SMI_SLOW maps
arguments to seconds the call takes before it answers, as a driver's slow call would; its end is logged
too ("ARGS (finished)").
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    args = " ".join(sys.argv[1:])
    with Path(os.environ["FAKE_SMI_LOG"]).open("a") as log:
        log.write(args + "\n")
    replies = json.loads(os.environ["FAKE_SMI_REPLIES"])
    if args not in replies:
        print(f"fake nvidia-smi: no captured output for {args!r}", file=sys.stderr)
        return 9
    name, code = replies[args]
    if seconds := json.loads(os.environ.get("FAKE_SMI_SLOW") or "{}").get(args):
        time.sleep(seconds)
        with Path(os.environ["FAKE_SMI_LOG"]).open("a") as log:
            log.write(f"{args} (finished)\n")
    sys.stdout.write((Path(os.environ["FAKE_SMI_DIR"]) / name).read_text() if name else "")
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
