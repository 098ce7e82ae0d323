"""Rank 0's record of one variant's training: its MLflow child run (parameters, per-step train loss,
per-epoch validation loss beside the grayscale baseline's, the preview and loss-curve artifacts), its
progress bar, the progress the flow run's page shows, and at the end the stage folder's files (the kept
weights, history, preview, loss curve) and the manifest fields. The training loop calls it at its
boundaries; the other ranks have none. A module of its own, below the loop and the stage, because the
same record is written whether the loop runs in the stage's process or in rank 0 of a torchrun job
(tasks.train_ddp), which must not import the stage module (tasks.train) that launches it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.colorizer import SPEC_FILE, Colorizer, save_trained
from model.preview import grid, save_loss_curve, save_png
from model.samples import first_batch
from storage.atomic import write_json
from storage.progress import report
from storage.shards import shard_paths
from storage.tracking import Tracker, flatten
from tasks.settings.train import Settings
from tasks.train_state import BEST, Progress, Setup

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


def start_record(t: Setup, progress: Progress, parent_run_id: str | None) -> TrainRecord | None:
    """Rank 0's MLflow run (a new child of the pipeline's run, or the checkpoint's), None elsewhere."""
    if not t.world.main:
        return None
    record = TrainRecord(Path(t.plan["workdir"]), t.variant, t.total, progress.step)
    facts = t.plan["facts"]
    params = {
        **flatten("train", t.s.model_dump()),
        **{"seed": facts["seed"], "variant": t.variant, "image_size": t.spec.image_size},
        **{
            "prepared_key": t.plan["inputs"]["prepared"]["key"],
            "n_train": t.plan["inputs"]["prepared"]["counts"]["train"],
        },
        **{"pretrained_weights": t.weights.detail, "world_size": t.world.size, "accelerator": facts["accelerator"]},
        **{"lr_peak": t.peak, "cuda_graphs_used": t.graphs},
    }
    tags = {"stage": t.plan["stage"], "variant": t.variant, "pretrained": str(t.weights.used)}
    warning = None if t.weights.used else f"trained from scratch: {t.weights.detail}"
    progress.run_id = record.start(progress.run_id, parent_run_id, tags, params, warning)
    return record


def finish(t: Setup, progress: Progress, record: TrainRecord, images_per_second: float | None) -> dict[str, Any]:
    """Rank 0 after the last step: keep the chosen weights, save the trained model, its history, preview
    and loss curve into the stage folder and MLflow, and return the stage's manifest fields."""
    history, out, variant = progress.history, t.out, t.variant
    net = t.net.cpu()
    kept = _keep(net, t.s, history, t.scratch / BEST, variant)
    save_trained(net, out)
    write_json(out / "history.json", history)
    net.eval()
    l_norm, ab = first_batch(t.val_shards or shard_paths(t.plan["inputs"]["prepared"], "train"), t.s.preview_images)
    with torch.no_grad():
        pred = net(l_norm)
    save_png(grid(l_norm, [pred, ab]), out / "samples.png")
    save_loss_curve(history["train"], history["val"], out / "loss_curve.png", f"{variant} fusion")
    record.finish(out / name for name in ("samples.png", "loss_curve.png", SPEC_FILE))
    return {
        "variant": variant,
        "steps": progress.step,
        "spec": t.spec.as_dict(),
        "mlflow_run_id": progress.run_id,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "val_loss": kept[1] if kept else None,
        "kept_step": kept[0] if kept else None,
        "val_loss_gray_baseline": history.get("val_gray"),
        "pretrained": {"used": t.weights.used, "detail": t.weights.detail},
        "images_per_second": round(images_per_second, 2) if images_per_second else None,
        "seed": t.plan["facts"]["seed"],
        "batch_size": t.bs,  # the global batch trained on (train.batch_size, unless the split is smaller)
        "world_size": t.world.size,
        "accelerator": t.plan["facts"]["accelerator"],
    }


def _keep(net: Colorizer, s: Settings, history: dict[str, Any], best: Path, variant: str) -> tuple[int, float] | None:
    """Load the kept weights into ``net`` and return their (step, validation MSE), or None without a
    validation split. ``keep=best`` is early stopping on the validation split: the test split, which
    evaluate scores, has no say in it."""
    if s.keep == "best" and "best" in history:
        net.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
        step, val = history["best"]
        log.info("%s: keeping the weights of step %d (val MSE %.5f, the lowest)", variant, step, val)
        return step, val
    if s.keep == "best":
        log.warning("%s: train.keep=best without a validation split keeps the last weights", variant)
    return tuple(history["val"][-1]) if history["val"] else None
