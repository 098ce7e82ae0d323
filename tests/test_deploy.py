"""`prefect deploy` + `prefect deployment run` + a worker --run-once against a Prefect server on 127.0.0.1;
the first attempt meets a fault and fails, `prefect flow-run retry` then completes the same flow run,
reusing the finished stages from the cache (scripts/deploy_proof.sh, also runnable by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_deployment_runs_and_a_failed_run_is_retried_from_the_cache(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["BIN"] = str(Path(sys.executable).parent)
    env["TORCH_HOME"] = os.environ.get("TORCH_HOME", str(tmp_path / "torch"))
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy_proof.sh")], capture_output=True, text=True, timeout=900, env=env
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "deploy proof: OK" in out.stdout
    assert "first attempt FAILED as expected" in out.stdout and "'COMPLETED', 2)" in out.stdout


def test_every_deployment_sends_the_stage_logs_to_its_run_page() -> None:
    """prefect.yaml gives each deployment's flow-run process the same logging settings `colorize run`
    sets for itself (flows/env.py): the stage loggers named once, in flows/run_page.py."""
    import yaml

    from flows.run_page import STAGE_LOGGERS

    expected = {
        "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(STAGE_LOGGERS),
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert [d["work_pool"]["job_variables"]["env"] for d in deployments] == [expected] * len(deployments)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    code = "import os; from flows.env import configure; configure(__import__('pathlib').Path('w')); " + (
        "print(os.environ['PREFECT_LOGGING_EXTRA_LOGGERS'], os.environ['PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == list(expected.values()), out.stderr
