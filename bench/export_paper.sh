#!/usr/bin/env bash
# Export every model at paper size into a scratch repository and print the closing
# table (parameters, ONNX size, export seconds, parity error). Figures: bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/paper_repo}
make --quiet env
.venv/bin/migserve export --all --size paper --out "$out"
