"""What a flow run's page in Prefect shows beside the states: the stages' progress, the evaluation table
the hint curve and the champion, as Prefect artifacts (the stage logs reach the same page through Prefect's extra
loggers, set in ``flows.env`` and in ``prefect.yaml``'s job variables).

Artifacts are a view: a failure to write one is logged and never fails the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)

EVALUATION_KEY = "colorize-evaluation"
CHAMPION_KEY = "colorize-champion"
HINT_CURVE_KEY = "colorize-hint-curve"
EMBEDDED_PNG_LIMIT = 512 * 1024  # a picture larger than this is linked to MLflow, not embedded
PROGRESS_EVERY_S = 2.0  # at most one progress update per stage this often, and always the last


STAGE_LOGGERS = ("flows", "tasks", "model", "storage")  # PREFECT_LOGGING_EXTRA_LOGGERS names the same


def stage_logs_at_info() -> None:
    """The stage loggers at INFO unless set otherwise: under a Prefect worker nothing configures them and
    they would inherit the root's WARNING, so the run page would miss the stages' progress lines."""
    for name in STAGE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


class ProgressArtifact:
    """A :mod:`storage.progress` listener: one Prefect progress artifact per stage task, created at the
    first report and updated at most every ``PROGRESS_EVERY_S`` seconds (and at 100%)."""

    def __init__(self, stage: str) -> None:
        self.stage, self.id, self.last, self.broken = stage, None, 0.0, False

    def __call__(self, fraction: float, what: str) -> None:
        now = time.monotonic()
        if self.broken or (self.id is not None and fraction < 1.0 and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            description = f"{self.stage}: {what}" if what else self.stage
            if self.id is None:
                self.id = _uuid(create_progress_artifact(100 * fraction, description=description))
            else:
                update_progress_artifact(self.id, 100 * fraction, description=description)
        except Exception as exc:  # noqa: BLE001 - a view only: the stage goes on, without it
            self.broken = True
            log.debug("progress artifact for %s not written: %s", self.stage, exc)


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def evaluation(manifest: Mapping[str, Any]) -> None:
    """The evaluate stage's table (its ``metrics.md``) as the run's markdown artifact."""
    description = "Test-split metrics of every variant and the grayscale baseline"
    _markdown(EVALUATION_KEY, lambda: (Path(manifest["folder"]) / "metrics.md").read_text(), description)
    if "hint_curve" in manifest:
        what = "What hints from the truth do to the models trained to take them (hints.md, hints.png)"
        _markdown(HINT_CURVE_KEY, lambda: _hint_curve_md(Path(manifest["folder"])), what)


def _hint_curve_md(folder: Path) -> str:
    """hints.md with hints.png embedded (a data URI: the page needs no server to show it)."""
    import base64

    png = (folder / "hints.png").read_bytes()
    if len(png) > EMBEDDED_PNG_LIMIT:
        picture = "The curve's picture is the `evaluation/hints.png` artifact of the run in MLflow."
    else:
        picture = f"![hint curve](data:image/png;base64,{base64.b64encode(png).decode()})"
    return "# Hint curve\n\n" + picture + "\n\n" + (folder / "hints.md").read_text()


def champion(registered: Mapping[str, Any]) -> None:
    """The registered champion as a markdown artifact: which model, where to load it from, and why."""
    _markdown(CHAMPION_KEY, lambda: _champion_md(registered), "The model this run registered under the champion alias")


def _champion_md(registered: Mapping[str, Any]) -> str:
    name, version = registered["model_name"], registered["version"]
    uri = f"models:/{name}@{registered['alias']}"
    sure = {True: "yes", False: "no"}.get(registered.get("beats_baseline_95ci"), "not tested")
    lines = [
        f"# Champion: {name} version {version}",
        "",
        "| | |",
        "| --- | --- |",
        f"| load | `{uri}` (while it is the champion), `models:/{name}/{version}` (always) |",
        f"| variant | {registered['variant']} (seed {registered['seed']}, {registered['n_seeds']} seed(s)) |",
        f"| {registered['metric']} | {registered['value']:.5f} |",
        f"| beats the grayscale baseline | {'yes' if registered['beats_baseline'] else 'no'} |",
        f"| ... with 95% confidence | {sure} |",
        f"| ONNX export | {'attached' if registered.get('onnx_export') else 'not attached'} |",
        "",
        f"Colorize with it: `colorize image photo.jpg --model {uri}`",
    ]
    return "\n".join(lines)


def _markdown(key: str, markdown: Callable[[], str], description: str) -> None:
    """Publish ``markdown()`` under ``key``; any failure, composing it included, is a warning."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown(), key=key, description=description)
    except Exception as exc:  # noqa: BLE001 - a view only: the run's outcome does not depend on it
        log.warning("could not publish the %s artifact to Prefect: %s", key, exc)
