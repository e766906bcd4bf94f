#!/usr/bin/env bash
# GPU check of the CRCKD step: JAX float32 and bfloat16 against torch float32 and AMP.
#
#   benchmarks/gpu_check.sh OUT_DIR            (from anywhere; about 5-8 minutes)
#
# For a GPU machine without network access that has jax[cuda], flax, optax, torch and
# torchvision preinstalled (see docs/performance.md). Writes under OUT_DIR:
#   env.txt                  GPU, driver, package versions
#   step_fp32.{log,json}     JAX float32 vs torch float32, DenseNet-121 224 px, batch 32,
#                            with a jax.profiler trace (trace_fp32/) and its top ops
#   step_bf16.{log,json}     JAX bfloat16 backbone vs torch AMP (float16 autocast + GradScaler)
#   step_b8_fp32.{log,json}  the CPU table's setting (batch 8) on the GPU
#   summary.txt              the RESULT lines
# Each part has its own time limit, so one failure does not eat the others' time.
# Override the interpreter with PYTHON=/path/to/python.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Both sides share the GPU: JAX takes at most half of its memory (torch's allocator grows
# into the rest); compiled executables are cached so that the second run compiles less.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"
START=$(date +%s)

{
  date -u
  nvidia-smi || true
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # report and go on
        print(name, "MISSING", e)
import jax
print("jax devices", jax.devices())
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run() {  # name timeout_s args...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(( $(date +%s) - START )) s elapsed)"
  timeout "$limit" "$PY" benchmarks/step_time.py --json "$OUT/$name.json" "$@" \
    2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && echo "$name: exit $rc" | tee -a "$OUT/$name.log"
  grep '^RESULT' "$OUT/$name.log" | sed "s/^/$name /" >> "$OUT/summary.txt" || true
}

: > "$OUT/summary.txt"
COMMON=(--model densenet121 --image-size 224 --memory bank --compare-torch --warmup 3)
run step_fp32 180 "${COMMON[@]}" --batch-size 32 --dtype float32 --steps 10 --rounds 3 \
  --profile "$OUT/trace_fp32"
run step_bf16 150 "${COMMON[@]}" --batch-size 32 --dtype bfloat16 --torch-amp --steps 10 \
  --rounds 3
run step_b8_fp32 120 "${COMMON[@]}" --batch-size 8 --dtype float32 --steps 10 --rounds 3

# ---------------------------------------------------------------------------------------
# DEMO EPOCHS: a few epochs of the demo in bfloat16. The trainer needs grain,
# tensorflow-datasets and ml-collections, which GPU images may lack: bring their wheels in
# a folder named by $WHEELS (pip download --no-deps grain tensorflow-datasets ml-collections
# array-record ... on a machine with network) and they are installed from there.
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl >"$OUT/wheels.log" 2>&1 || true
fi
if "$PY" -c "import grain, tensorflow_datasets, ml_collections" 2>/dev/null; then
  timeout 180 "$PY" launch.py --config configs/demo.py --workdir "$OUT/demo" \
    --config.train.epochs=5 --config.train.dtype=bfloat16 2>&1 | tee "$OUT/demo.log" || true
else
  echo "demo skipped: grain / tensorflow-datasets / ml-collections not importable" \
    | tee "$OUT/demo.log"
fi
# ---------------------------------------------------------------------------------------

echo "== done in $(( $(date +%s) - START )) s"
cat "$OUT/summary.txt"
