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
