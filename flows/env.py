"""Point Prefect and MLflow at the work dir, before either is imported.

Prefect reads its settings (home, database, result storage) when first imported, so this must run
first: ``colorize`` keeps every piece of state inside the work dir, nothing in the home folder, and
turns telemetry off. A value the user already exported wins (a shared Prefect server). MLflow's store is
not set here but per call (storage.tracking), so one process can serve several work dirs.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure(workdir: Path) -> None:
    workdir = workdir.resolve()
    defaults = {
        "PREFECT_HOME": str(workdir / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Without a server configured, each run starts a temporary one; on a loaded 2-core machine, or with
        # two runs starting at once, that takes longer than Prefect's default 20 s.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DO_NOT_TRACK": "1",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ["COLORIZE_WORKDIR"] = str(workdir)
