#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on the GPU machine (Python 3.12, torch and torchvision there,
# no internet), fetched here into .whl/ (ignored by git). The machine already has numpy, pillow, scipy,
# scikit-image, pandas, matplotlib, tqdm, pyyaml, fsspec, onnxruntime and opencv (scripts/gpu_machine.txt
# lists what it has that the lock also holds; scripts/gpu_sim.sh builds it here); it lacks pydantic and
# webdataset (every stage), PyAV (colorize video), MLflow's client and sqlite store (the train and
# evaluate stages' tracking; the store imports cryptography) and spandrel (the upscaler's network).
# Everything that travels, code included, must stay under 64 MiB: the script prints both sizes.
#
#   bash scripts/gpu_wheels.sh        (then: the device tool's carry names .whl)
#   WHL_DIR=DIR PY_VERSION=3.11 bash scripts/gpu_wheels.sh     (elsewhere, for another Python: gpu_sim.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}  # any Python with pip: the project's .venv is not needed
"$PY" -m pip --version >/dev/null 2>&1 || { echo "error: scripts/gpu_wheels.sh needs $PY with pip (or PY=/path/to/python)"; exit 2; }
LOCK=$ROOT/requirements.lock
DEST=${WHL_DIR:-$ROOT/.whl}
PY_VERSION=${PY_VERSION:-3.12}  # the GPU machine's
if [ -z "${WHL_DIR:-}" ] && [ -d "$ROOT/.git/info" ]; then
  grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
fi
mkdir -p "$DEST"
# each at the version requirements.lock pins (typing-extensions too: the locked pydantic needs the locked
# one, newer than the machine's); cryptography, cffi and pycparser are what MLflow's sqlite store imports
PINNED=(pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand av
  mlflow-skinny sqlalchemy alembic mako cachetools importlib-metadata opentelemetry-api opentelemetry-sdk
  opentelemetry-proto opentelemetry-semantic-conventions sqlparse python-dotenv gitpython gitdb smmap
  databricks-sdk google-auth fastapi starlette uvicorn graphql-core spandrel safetensors einops
  cryptography cffi pycparser)
SPECS=()
for name in "${PINNED[@]}"; do
  v=$(sed -n "s/^$name==\([^ ]*\).*/\1/p" "$LOCK" | head -1)
  [ -n "$v" ] || { echo "error: $name is not pinned in requirements.lock"; exit 2; }
  SPECS+=("$name==$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${SPECS[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
du -ch "$DEST"/*.whl | tail -1
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 du -cb) | tail -1 | awk '{printf "code: %.1f MiB\n", $1/1048576}'
fi
