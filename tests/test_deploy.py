"""`prefect deploy` + `prefect deployment run` + a worker --run-once complete the tiny pipeline against a
Prefect server on 127.0.0.1 (scripts/deploy_proof.sh, also runnable by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_deployment_runs_the_tiny_pipeline_through_a_process_worker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["BIN"] = str(Path(sys.executable).parent)
    env["TORCH_HOME"] = os.environ.get("TORCH_HOME", str(tmp_path / "torch"))
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy_proof.sh")], capture_output=True, text=True, timeout=900, env=env
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "deploy proof: OK" in out.stdout and "COMPLETED" in out.stdout
