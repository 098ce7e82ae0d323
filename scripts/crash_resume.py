"""Crash anywhere, resume, same result: SIGKILL `colorize run --preset tiny` inside each stage, rerun it,
and compare with an uninterrupted run of the same seed.

For each stage: start the pipeline, wait until that stage's work is in progress (its ``.partial`` folder
appears), wait a random moment, SIGKILL the whole process group, rerun the same command to completion.
Then: every stage's files (sha256) equal the reference run's, the trained weights are identical, the
metrics table is identical, and no temp, partial or trash file is left anywhere in the work dir.

    .venv/bin/python scripts/crash_resume.py [--stages download,upscale,...] [--seed 1]   (~10-15 min)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.config import STAGES

BIN = Path(sys.executable).parent


def command(workdir: Path) -> list[str]:
    return [str(BIN / "colorize"), "run", "--dataset", "sample", "--preset", "tiny", "--workdir", str(workdir)]


def run(workdir: Path, env: dict[str, str]) -> None:
    out = subprocess.run(command(workdir), env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pipeline failed in {workdir}:\n{out.stderr[-3000:]}")


def kill_inside(stage: str, workdir: Path, env: dict[str, str], rng: random.Random) -> str:
    proc = subprocess.Popen(
        command(workdir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if list((workdir / stage).glob("*.partial")):
            time.sleep(rng.uniform(0, 0.5))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed inside the stage"
        time.sleep(0.02)
    proc.wait()
    return "stage finished before the kill could land (the run completed)"


def fingerprint(workdir: Path) -> dict[str, object]:
    """Each finished stage's file digests (register's registry bookkeeping aside)."""
    out: dict[str, object] = {}
    for stage in STAGES:
        for manifest in sorted((workdir / stage).glob("*/manifest.json")):
            m = json.loads(manifest.read_text())
            files = {k: v["sha256"] for k, v in m["files"].items()}
            out[f"{stage}/{m.get('variant', '')}"] = files
    return out


def leftovers(workdir: Path) -> list[str]:
    return [
        str(p.relative_to(workdir))
        for p in workdir.rglob("*")
        if ".tmp-" in p.name or p.name.endswith(".partial") or ".trash-" in p.name
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="crash-resume-"))
    env = {**os.environ, "TORCH_HOME": os.environ.get("TORCH_HOME", str(Path.home() / ".cache" / "torch"))}
    failures = []
    try:
        print("reference run...", flush=True)
        run(tmp / "reference", env)
        reference = fingerprint(tmp / "reference")
        for stage in args.stages.split(","):
            wd = tmp / f"kill-{stage}"
            what = kill_inside(stage, wd, env, rng)
            run(wd, env)
            same = fingerprint(wd) == reference
            left = leftovers(wd)
            ok = same and not left
            failures += [] if ok else [stage]
            print(f"{stage:<9} {what}; rerun identical to reference: {same}; leftovers: {left or 'none'}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("crash/resume:", "OK" if not failures else f"FAILED for {', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
