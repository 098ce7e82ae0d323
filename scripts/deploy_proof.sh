#!/usr/bin/env bash
# Proves the deployment path end to end on this machine: a Prefect server on 127.0.0.1, a process work
# pool, `prefect deploy` from prefect.yaml, `prefect deployment run` (tiny preset), and a worker started
# with --run-once that executes it. The first attempt meets a fault (a file where the train folder goes)
# and fails; the fault is removed and `prefect flow-run retry` reruns the same flow run through a second
# worker, which must reuse download/upscale/prepare from the cache, train, and register a champion.
# Exits 0 only if all of that is seen in the server's flow-run and task-run states.
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
"$BIN/python" - <<'PY'
import asyncio
from prefect.client.orchestration import get_client

async def schedules():
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("colorize-pipeline/retrain")
        return [(s.schedule.cron, s.active) for s in deployment.schedules]

found = asyncio.run(schedules())
assert found == [("0 3 * * 1", False)], found  # the weekly retrain, deployed inactive
PY
echo "== deployed colorize-pipeline/retrain (its weekly schedule inactive)"
mkdir -p "$TMP/work" && echo "a file where the train stage's folder goes" >"$TMP/work/train"
"$BIN/prefect" deployment run colorize-pipeline/retrain --param preset=tiny --param workdir="$TMP/work" >/dev/null
echo "== flow run scheduled (train/ blocked by a file); starting a worker (--run-once)"
"$BIN/prefect" worker start --pool colorize --run-once >"$TMP/worker1.log" 2>&1 || true

RUN_ID=$("$BIN/python" - <<'PY'
import asyncio
from prefect.client.orchestration import get_client

async def runs():
    async with get_client() as client:
        return await client.read_flow_runs()

runs = asyncio.run(runs())
assert len(runs) == 1 and runs[0].state.type.value == "FAILED", [(r.name, r.state.type.value) for r in runs]
print(runs[0].id)
PY
) || { tail -40 "$TMP/worker1.log"; exit 1; }
echo "== first attempt FAILED as expected; removing the fault, prefect flow-run retry $RUN_ID"
rm "$TMP/work/train"
"$BIN/prefect" flow-run retry "$RUN_ID" >/dev/null
"$BIN/prefect" worker start --pool colorize --run-once >"$TMP/worker2.log" 2>&1 || { tail -40 "$TMP/worker2.log"; exit 1; }

"$BIN/python" - "$TMP/work" "$RUN_ID" <<'PY'
import asyncio, glob, json, sys, time
from collections import defaultdict
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

async def states():
    """Each task's state names over both attempts, oldest first, from every task run's state history
    (a retried flow run may reuse a task run or create a new one; both are read)."""
    async with get_client() as client:
        flow_runs = await client.read_flow_runs()
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(sys.argv[2])])), limit=200
        )
        per_task = defaultdict(list)
        for t in tasks:
            for s in await client.read_task_run_states(t.id):
                per_task[t.name.rsplit("-", 1)[0]].append((s.timestamp, s.name))
        return flow_runs, {k: [n for _, n in sorted(v) if n in ("Completed", "Cached", "Failed")] for k, v in per_task.items()}


def settled(per_task):
    trains = [name for name in per_task if name.startswith("train-")]
    return (
        all(per_task.get(s, [""])[-1] == "Cached" for s in ("download", "upscale", "prepare"))
        and len(trains) == 3
        and all("Failed" in per_task[n] and per_task[n][-1] == "Completed" for n in trains)
        and per_task.get("register", [""])[-1] == "Completed"
    )


# The server records task states from the engine's events asynchronously: give it a moment to settle.
for _ in range(60):
    flow_runs, per_task = asyncio.run(states())
    if settled(per_task):
        break
    time.sleep(1)
print("flow runs:", [(r.name, r.state.type.value, r.run_count) for r in flow_runs])
assert len(flow_runs) == 1 and str(flow_runs[0].id) == sys.argv[2], "the retry must rerun the same flow run"
assert flow_runs[0].state.type.value == "COMPLETED" and flow_runs[0].run_count == 2, flow_runs[0]
print("task states:", per_task)
for stage in ("download", "upscale", "prepare"):
    assert per_task[stage][0] == "Completed" and per_task[stage][-1] == "Cached", f"{stage} not reused: {per_task[stage]}"
trains = [name for name in per_task if name.startswith("train-")]
assert len(trains) == 3 and all(per_task[n][0] == "Failed" and per_task[n][-1] == "Completed" for n in trains), per_task
assert per_task["register"][-1] == "Completed", per_task["register"]
reg = glob.glob(f"{sys.argv[1]}/register/*/manifest.json")
assert reg, "no register stage output"
print("registered:", {k: json.load(open(reg[0]))[k] for k in ("model_name", "alias", "version", "variant")})

from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

async def page():
    """What the flow run's page shows besides states: its artifacts and its log lines."""
    async with get_client() as client:
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(sys.argv[2])]))
        artifacts = await client.read_artifacts(flow_run_filter=run_filter, limit=200)
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(sys.argv[2])])))
        return artifacts, logs

for _ in range(30):  # logs are shipped in batches: give the last one a moment
    artifacts, logs = asyncio.run(page())
    if any(log.name.startswith("tasks.") for log in logs):
        break
    time.sleep(1)
keys = {a.key for a in artifacts}
assert {"colorize-evaluation", "colorize-champion"} <= keys, keys
table = next(a for a in artifacts if a.key == "colorize-evaluation").data
assert "| grayscale baseline |" in table, table
assert any(a.type == "progress" and float(a.data) == 100.0 for a in artifacts), [(a.type, a.data) for a in artifacts]
stage_lines = [log.message for log in logs if log.name.startswith("tasks.")]
assert stage_lines, sorted({log.name for log in logs})
print(f"run page: artifacts {sorted(k for k in keys if k)} and {sum(a.type == 'progress' for a in artifacts)} progress;",
      f"{len(stage_lines)} stage log lines, e.g. {stage_lines[-1][:80]!r}")
PY
echo "deploy proof: OK"
