#!/usr/bin/env bash
# scripts/gpu_check.sh --device cpu --quick, run here as the GPU machine would run it, so that a module the
# carried wheels miss is found on this CPU and not on a card lent for minutes. It builds (once, cached) a
# fresh venv of Python 3.12 with only what the GPU machine has (scripts/gpu_machine.txt: PyPI's torch 2.11
# and torchvision 0.26 and the rest), fetches the carried wheels (scripts/gpu_wheels.sh), copies the
# working tree as the device tool carries it (tracked and untracked files, no .venv, the wheels as .whl/)
# and runs the check there with that venv's python3 first on PATH, nothing else on PYTHONPATH, no user
# site and an empty torch cache. Exit 0 only when every part is ok (DDP may be skipped: one CPU process).
#
#   bash scripts/gpu_sim.sh [--parts train_tiny,pipeline]   (extra arguments go to scripts/gpu_check.py)
#   OUT=DIR bash scripts/gpu_sim.sh     (the report there; otherwise a temporary folder it prints)
#   GPU_SIM_CACHE=DIR (default ~/.cache/colorize-gpu-sim: about 3 GB of wheels and a 5.6 GB venv)
#   GPU_SIM_PYTHON=/path/to/python3.12 (default: python3.12 on PATH, then pyenv's)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${GPU_SIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/colorize-gpu-sim}
say() { echo "gpu_sim: $*"; }

PY=
# the first that runs as 3.12 (a pyenv shim on PATH may exist and refuse)
for cand in ${GPU_SIM_PYTHON:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  PY=$(command -v python3.11 || command -v python3)
  say "no Python 3.12 here: using $("$PY" -V) (what 3.12 alone would break stays unproven; docs/gpu.md)"
fi
VER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
KEY=$( (cat "$ROOT/scripts/gpu_machine.txt"; "$PY" -VV) | sha256sum | cut -c1-12)
VENV=$CACHE/venv-$VER-$KEY
if [ ! -f "$VENV/.complete" ]; then
  say "building $VENV from scripts/gpu_machine.txt (first run: about 3 GB from PyPI)"
  rm -rf "$VENV"
  mkdir -p "$CACHE/wheels-$VER"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip download -q -d "$CACHE/wheels-$VER" -r "$ROOT/scripts/gpu_machine.txt" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  "$VENV/bin/python" -m pip install -q --no-index --find-links "$CACHE/wheels-$VER" -r "$ROOT/scripts/gpu_machine.txt" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  touch "$VENV/.complete"
fi
say "$("$VENV/bin/python" -c 'import sys, torch, torchvision; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}")')"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-sim-XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
TREE=$SCRATCH/tree
mkdir -p "$TREE"
# what the device tool carries: tracked and untracked-but-not-ignored files, and the carried .whl/
git -C "$ROOT" ls-files -co --exclude-standard -z | (cd "$ROOT" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
  | tar -xf - -C "$TREE"
WHL_DIR=$CACHE/whl-$VER PY_VERSION=$VER PY=$VENV/bin/python bash "$ROOT/scripts/gpu_wheels.sh" | sed 's/^/gpu_sim: carried wheels: /'
mkdir -p "$TREE/.whl"
cp "$CACHE/whl-$VER"/*.whl "$TREE/.whl/"

REPORT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-sim-report-XXXXXX")}
set +e
env -i HOME="$HOME" PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 PYTHONNOUSERSITE=1 \
  TMPDIR="$SCRATCH" GPU_CHECK_SITE="$SCRATCH/site" OUT="$REPORT" \
  bash "$TREE/scripts/gpu_check.sh" --device cpu --quick "$@"
rc=$?
set -e
[ -f "$REPORT/report.json" ] || { say "FAILED: the check wrote no report (exit $rc)"; exit 1; }
# every part ok, but DDP (it needs two GPUs); what was asked for with --parts only
"$VENV/bin/python" - "$REPORT/report.json" "$rc" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
bad = [p for p in report["parts"] if p["status"] != "ok" and not (p["name"] == "ddp" and p["status"] == "skipped")]
for p in report["parts"]:
    print(f"gpu_sim: {p['name']:22} {p['status']:8} {p['seconds']:7.1f} s  {p['summary'][:90]}")
if bad or sys.argv[2] != "0":
    print(f"gpu_sim: FAILED: {', '.join(p['name'] + ' ' + p['status'] for p in bad) or 'exit ' + sys.argv[2]}")
    sys.exit(1)
print("gpu_sim: every part ok")
PY
say "report: $REPORT/report.md"
