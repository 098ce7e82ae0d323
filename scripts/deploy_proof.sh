#!/usr/bin/env bash
# Proves the deployment path end to end on this machine: a Prefect server on 127.0.0.1, a process work
# pool, `prefect deploy` from prefect.yaml, `prefect deployment run` (tiny preset), and a worker started
# with --run-once that executes it. Exits 0 only if the flow run completed and registered a champion.
#
#   bash scripts/deploy_proof.sh            (uses .venv/bin; about 2-3 minutes)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/.venv/bin}
TMP=$(mktemp -d)
export PREFECT_HOME=$TMP/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export MLFLOW_DISABLE_TELEMETRY=true PREFECT_LOGGING_LEVEL=WARNING COLORIZE_REPO=$ROOT
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL=http://127.0.0.1:$PORT/api

"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$TMP/server.log" 2>&1 &
SERVER=$!
cleanup() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
for _ in $(seq 1 240); do
  "$BIN/python" -c "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { echo "prefect server died:"; tail -20 "$TMP/server.log"; exit 1; }
  sleep 0.5
done
echo "== server up on 127.0.0.1:$PORT"

"$BIN/prefect" work-pool create colorize --type process >/dev/null
cd "$ROOT"
"$BIN/prefect" --no-prompt deploy --name retrain >/dev/null
echo "== deployed colorize-pipeline/retrain"
"$BIN/prefect" deployment run colorize-pipeline/retrain --param preset=tiny --param workdir="$TMP/work" >/dev/null
echo "== flow run scheduled; starting a worker (--run-once)"
"$BIN/prefect" worker start --pool colorize --run-once >"$TMP/worker.log" 2>&1 || { tail -40 "$TMP/worker.log"; exit 1; }

"$BIN/python" - "$TMP/work" <<'PY'
import asyncio, glob, json, sys
from prefect.client.orchestration import get_client

async def states():
    async with get_client() as client:
        return [(r.name, r.state.type.value) for r in await client.read_flow_runs()]

runs = asyncio.run(states())
print("flow runs:", runs)
assert runs and all(state == "COMPLETED" for _, state in runs), runs
reg = glob.glob(f"{sys.argv[1]}/register/*/manifest.json")
assert reg, "no register stage output"
print("registered:", {k: json.load(open(reg[0]))[k] for k in ("model_name", "alias", "version", "variant")})
PY
echo "deploy proof: OK"
