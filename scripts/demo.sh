#!/usr/bin/env bash
# Set up (if needed) and run the full compression pipeline on Fashion-MNIST.
# Extra arguments go to `torchslim demo` (e.g. --out DIR, --set key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/torchslim demo "$@"
