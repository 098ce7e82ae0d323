#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on the GPU machine (Python 3.12, torch and torchvision there,
# no internet), fetched here into .whl/ (ignored by git). The machine already has numpy, pillow, scipy,
# scikit-image, pandas, matplotlib, tqdm, pyyaml, fsspec, onnxruntime and opencv; it lacks pydantic and
# webdataset (every stage), PyAV (colorize video), MLflow's client and sqlite store (the train and
# evaluate stages' tracking) and spandrel (the upscaler's network). Everything that travels, code included,
# must stay under 64 MiB: the script prints the total.
#
#   bash scripts/gpu_wheels.sh        (then: the device tool's carry names .whl)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DEST=$ROOT/.whl
grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
mkdir -p "$DEST"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PINNED=(pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand av mlflow-skinny
  sqlalchemy alembic mako cachetools importlib-metadata opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-semantic-conventions sqlparse python-dotenv gitpython gitdb smmap databricks-sdk google-auth
  fastapi starlette uvicorn graphql-core spandrel safetensors einops)
SPECS=()
for name in "${PINNED[@]}"; do
  if v=$(version "$name" 2>/dev/null); then SPECS+=("$name==$v"); else SPECS+=("$name"); fi
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${SPECS[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
du -ch "$DEST"/*.whl | tail -1
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 du -cb) | tail -1 | awk '{printf "code: %.1f MiB\n", $1/1048576}'
