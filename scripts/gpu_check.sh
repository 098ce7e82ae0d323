#!/usr/bin/env bash
# One prepared check of the product on a GPU machine (scripts/gpu_check.py says what it runs), in under
# 8 minutes on an H200. Installs the wheels in .whl/ (scripts/gpu_wheels.sh) when they are there, then
# writes report.md and report.json to $OUT (the device tool's folder) or a temporary folder it prints,
# after every part.
#
#   bash scripts/gpu_check.sh [--device cpu --quick]     (arguments go to scripts/gpu_check.py)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Here, the project's venv; on the GPU machine (no venv travels), its python3 plus the carried wheels.
if [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
  SITE=${GPU_CHECK_SITE:-/tmp/site}  # gpu_sim.sh gives its own
  if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONUNBUFFERED=1
# SIGTERM at 470 s (the check's own budget is 440 s): it writes its report and exits; KILL 20 s later.
exec timeout -k 20 470 "$PY" "$ROOT/scripts/gpu_check.py" ${OUT:+--out "$OUT"} "$@"
