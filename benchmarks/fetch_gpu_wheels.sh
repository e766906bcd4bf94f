#!/usr/bin/env bash
# Downloads, on a machine with network access, the wheels that the GPU machines lack, into
# .whl/ at the repository root (ignored by git), for benchmarks/gpu_check.sh to install
# there without network:
#
#   benchmarks/fetch_gpu_wheels.sh            # -> .whl/*.whl, about 7 MB
#
# The GPU machines (Python 3.12, x86_64) have jax 0.11.2 with the CUDA 13 plugin, flax,
# optax, orbax-checkpoint, chex, torch, torchvision, numpy, scikit-learn, matplotlib,
# pillow, pyarrow, tensorboard, absl-py and etils with their dependencies, but not the data
# stack of crckd_jax: grain, tensorflow-datasets, array-record, ml-collections, tensorboardX,
# tqdm, safetensors, and the small packages these need that none of the installed ones
# brings. The list below is that closure, found by reading each wheel's METADATA
# (Requires-Dist) and checked by installing it with --no-deps into a fresh Python 3.12
# environment holding only the GPU machine's packages (docs/performance.md, "GPU check").
# Versions: those of requirements.txt where it pins the package, else the ones the
# project's environment resolved. Nothing large: no jax, no pyarrow (tfds lists it, the
# array_record read path does not use it, and the GPU machines have it anyway).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PY=${PYTHON:-python3}
REQ="$ROOT/requirements.txt"

# The version requirements.txt pins for $1, else $2.
pinned() {
  local v
  v=$(grep -iE "^$1==" "$REQ" | head -1 | cut -d= -f3 || true)
  echo "${v:-$2}"
}

PACKAGES=(
  # crckd_jax's own requirements missing there (requirements.txt pins them)
  "grain==$(pinned grain 0.2.18)"
  "tensorflow-datasets==$(pinned tensorflow-datasets 4.9.10)"
  "array-record==$(pinned array-record 0.8.6)"
  "ml-collections==$(pinned ml-collections 1.1.0)"
  "tensorboardX==$(pinned tensorboardX 2.6.5)"
  "tqdm==$(pinned tqdm 4.70.1)"
  "safetensors==$(pinned safetensors 0.8.0)"
  # grain: portpicker (array-record, cloudpickle, etils, protobuf, absl, numpy are there)
  "portpicker==1.6.0"
  # tensorflow-datasets: dm-tree, immutabledict, promise, simple_parsing, tensorflow-metadata,
  # termcolor, toml, wrapt, requests (psutil, protobuf, pyarrow, tqdm, etils are there or
  # above)
  "dm-tree==0.1.10"
  "immutabledict==4.3.1"
  "simple-parsing==0.1.9"
  "tensorflow-metadata==1.21.0"
  "termcolor==3.3.0"
  "toml==0.10.2"
  "wrapt==2.5.2"
  "requests==2.34.2"
  # their dependencies: promise -> six; dm-tree -> attrs; simple_parsing ->
  # docstring-parser; tensorflow-metadata -> googleapis-common-protos; requests -> urllib3,
  # idna, certifi, charset-normalizer
  "six==1.17.0"
  "attrs==26.1.0"
  "docstring-parser==0.18.0"
  "googleapis-common-protos==1.76.0"
  "urllib3==2.8.0"
  "idna==3.20"
  "certifi==2026.10.19.post1"
  "charset-normalizer==3.5.3"
)
# promise (a tensorflow-datasets requirement) is published as a source archive only: built
# here into a pure-Python wheel.
SOURCE_ONLY=("promise==2.3")

mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
"$PY" -m pip wheel --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
