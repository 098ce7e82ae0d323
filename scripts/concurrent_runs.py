"""Two runs at once on one work dir: both finish, no stage folder is corrupted, the registry ends with one
consistent champion, and work finished by one run is not redone by the other.

    .venv/bin/python scripts/concurrent_runs.py        (~3-5 min)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="concurrent-"))
    wd = tmp / "work"
    cmd = [str(BIN / "colorize"), "run", "--dataset", "sample", "--preset", "tiny", "--workdir", str(wd)]
    env = dict(os.environ)
    try:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
        time.sleep(3)  # the second starts while the first is working
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate()[0] for p in procs]
        codes = [p.returncode for p in procs]
        for i, out in enumerate(outputs):
            shown = out.splitlines() if codes[i] else out.splitlines()[-14:]  # a failure in full
            print(f"--- run {i + 1} (exit {codes[i]}):\n" + "\n".join(shown))
        ok = codes == [0, 0]

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from flows.config import STAGES
        from storage import tracking
        from storage.stage import verify

        folders = [
            p
            for stage in STAGES
            for p in (wd / stage).glob("*")
            if p.is_dir() and not p.name.endswith(".partial") and not p.name.startswith(".")
        ]
        broken = [str(p) for p in folders if verify(p)[0] is None]
        client = tracking.Tracker(wd).client
        champion = client.get_model_version_by_alias("colorizer", "champion")
        versions = client.search_model_versions("name='colorizer'")
        regs = [json.loads(m.read_text()) for m in wd.glob("register/*/manifest.json")]
        ran = {
            i: [
                line.split()[0]
                for line in out.splitlines()
                if line.strip().endswith(tuple("0123456789abcdef")) and " ran " in line
            ]
            for i, out in enumerate(outputs)
        }
        print(f"stage folders: {len(folders)}, corrupted: {broken or 'none'}")
        print(
            f"registry: {len(versions)} version(s); champion = version {champion.version}; "
            f"register manifests: {[r['version'] for r in regs]}"
        )
        print(f"stages that ran in run 1: {ran[0]}; in run 2: {ran[1]}")
        ok &= not broken and len(regs) == 1 and int(champion.version) == regs[0]["version"]
        ok &= not set(ran[0]) & set(ran[1])  # nothing was done twice
        print("concurrent runs:", "OK" if ok else "FAILED")
        sys.exit(0 if ok else 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
