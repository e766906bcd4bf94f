#!/usr/bin/env bash
# GPU check of crckd-jax in one call (see benchmarks/gpu_check.py and docs/performance.md):
#
#   benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine; at most ~8 minutes
#   benchmarks/gpu_check.sh OUT_DIR --tiny     # CPU dry run with tiny settings
#
# From the repository root or anywhere. Installs the wheels of .whl/ (made on a machine
# with network by benchmarks/fetch_gpu_wheels.sh) that the interpreter lacks, then runs the
# parts (environment, step benchmark against torch at batch 64 and 32, trainer at 224 px,
# one demo epoch), each with its own time limit, and writes OUT_DIR/summary.json and
# OUT_DIR/summary.txt. PYTHON=/path/to/python picks the interpreter (default python3).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
