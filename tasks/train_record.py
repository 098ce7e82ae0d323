"""Rank 0's record of one variant's training: its MLflow child run (parameters, per-step train loss,
per-epoch validation loss beside the grayscale baseline's, the preview and loss-curve artifacts), its
progress bar, and the progress the flow run's page shows. The training loop calls it at its boundaries;
the other ranks have none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from storage.progress import report
from storage.tracking import Tracker

log = logging.getLogger(__name__)


class TrainRecord:
    def __init__(self, workdir: Path, variant: str, total: int, step: int) -> None:
        self.tracker, self.variant, self.total = Tracker(workdir), variant, total
        self.bar = tqdm(total=total, initial=step, desc=f"train {variant}", unit="step", dynamic_ncols=True)
        self.run_id: str | None = None

    def start(
        self,
        run_id: str | None,
        parent_run_id: str | None,
        tags: dict[str, str],
        params: dict[str, Any],
        warning: str | None = None,
    ) -> str:
        """The MLflow run: ``run_id`` when resuming one, else a new child of ``parent_run_id`` with its
        parameters (and a warning tag, such as training from scratch)."""
        if run_id is None:
            run_id = self.tracker.start_run(f"train-{self.variant}", parent_run_id, tags)
            self.tracker.log_params(run_id, params)
            if warning:
                self.tracker.set_tags(run_id, {"warning": warning})
        self.run_id = run_id
        return run_id

    def step(self) -> None:
        self.bar.update(1)

    def losses(self, read: list[tuple[int, float]], step: int, log_every: int, images_per_second: float) -> None:
        """The train losses read at a boundary: every ``log_every``-th (and the last) to MLflow."""
        self.bar.set_postfix(loss=f"{read[-1][1]:.4f}", img_s=f"{images_per_second:.1f}")
        report(step, self.total, f"{self.variant}: step {step} of {self.total}, loss {read[-1][1]:.4f}")
        for at, value in read:
            if at % log_every == 0 or at == self.total:
                self.tracker.log_metrics(self.run_id, {"train_loss": value}, at)

    def validation(self, step: int, val: tuple[float, float], epoch: float) -> None:
        metrics = {"val_loss": val[0], "val_loss_gray_baseline": val[1], "epoch": epoch}
        self.tracker.log_metrics(self.run_id, metrics, step)
        log.info("%s step %d: val MSE %.5f (grayscale baseline %.5f)", self.variant, step, *val)

    def close(self) -> None:
        self.bar.close()

    def finish(self, artifacts: Iterable[Path]) -> None:
        for path in artifacts:
            self.tracker.log_artifact(self.run_id, path)
        self.tracker.end_run(self.run_id)
