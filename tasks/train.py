"""Training stage: one fusion variant on the prepared train split, resumable, logged to MLflow.

The loop reads like torchvision's classification reference: :func:`train_one_epoch`, :func:`validate`,
and checkpointing in a few lines. Adam, MSE on ab (optionally +L1), optional bf16 autocast, gradient
clipping, channels_last. Every ``checkpoint_every`` steps the model, optimizer, step, data position and
RNG state are written atomically to ``scratch/checkpoint.pt``; a killed run resumes from there and, with
the same seed, ends with the same weights as an uninterrupted run (the data order is a pure function of
seed and epoch, see storage.shards.ShardDataset). A non-finite loss stops training with an error:
nothing is cached, so a diverged model can never be evaluated or registered.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import pretrained
from model.colorizer import FUSIONS, SPEC_FILE, Colorizer, ColorizerSpec, Fusion, build, save_trained
from model.preview import grid, save_loss_curve, save_png
from model.samples import decode_sample, first_batch
from storage.atomic import atomic_path, write_json
from storage.code_identity import code_version
from storage.errors import ConfigError
from storage.settings import Section, flow_setting
from storage.shards import ShardDataset, shard_paths
from storage.stage import SCRATCH, StageResult, make_plan, run_stage
from storage.tracking import Tracker, flatten

log = logging.getLogger(__name__)
STAGE = "train"
CHECKPOINT = "checkpoint.pt"


class Settings(Section):
    """The train section. ``variants`` and ``concurrent`` are the flow's: which train stages to run and
    whether at once. Everything else is given to the stage and is in its key."""

    variants: list[Fusion] = flow_setting(default_factory=lambda: list(FUSIONS))
    concurrent: bool = flow_setting(False, description="train variants at the same time (off: they share cores)")
    batch_size: int = Field(16, ge=2, le=65536, description="at least 2: BatchNorm needs two samples")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(6, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (across epochs)")
    loss: Literal["mse", "l1", "mse+l1"] = "mse"
    hflip: bool = Field(True, description="random horizontal flips of training batches (seeded)")
    pretrained: bool = Field(True, description="use ImageNet weights when present or downloadable")
    freeze: Literal["none", "stems", "all"] = "none"
    decoder_width: int = Field(64, ge=8, le=4096, description="channels of the finest decoder block")
    bf16: bool = False
    channels_last: bool = True
    grad_clip: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(5, ge=1)
    preview_images: int = Field(8, ge=1, le=256, description="images in samples.png")
    threads: int | None = Field(None, ge=1, le=1024)

    @field_validator("variants", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one variant is needed")
        return list(dict.fromkeys(v))


def plan(s: Settings, seed: int, variant: str, prepared: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Whether ImageNet weights are on disk changes the result, so which were found is a fact in the key."""
    found = [pretrained.locate(n, allow_download=False) for n in ("resnet50", "densenet121")]
    facts = {
        "seed": seed,
        "variant": variant,
        "imagenet_weights": [f.path.name for f in found if f.available] if s.pretrained else [],
    }
    return make_plan(workdir, STAGE, {"prepared": prepared}, s.for_stage(), code_version(__name__), facts)


def make_optimizer(net: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam over the trainable parameters with the fused kernel: one pass per parameter tensor instead of
    a dozen elementwise kernels (~3% of a CPU step here; same update rule, same state dict layout)."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    mse, l1 = torch.nn.functional.mse_loss, torch.nn.functional.l1_loss
    return {"mse": mse, "l1": l1, "mse+l1": lambda p, t: mse(p, t) + l1(p, t)}[kind]


class DivergedError(ConfigError):
    """The loss became NaN or infinite: the settings (learning rate, loss) cannot train this model."""


@torch.no_grad()
def validate(net: Colorizer, shards: list[Path], batch_size: int, channels_last: bool) -> tuple[float, float] | None:
    """(MSE of the model's ab, MSE of the grayscale baseline ab = 0) on the validation split."""
    if not shards:
        return None
    net.eval()
    total, gray, n = 0.0, 0.0, 0
    loader = DataLoader(ShardDataset(shards, decode_sample), batch_size=batch_size)
    for l_norm, ab in loader:
        if channels_last:
            l_norm = l_norm.contiguous(memory_format=torch.channels_last)
        total += float(torch.nn.functional.mse_loss(net(l_norm), ab, reduction="sum"))
        gray += float(ab.square().sum())
        n += ab.numel()
    net.train()
    return (total / n, gray / n) if n else None


@dataclass
class Progress:
    """The loop's position and record: what a checkpoint saves besides weights and optimizer."""

    step: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {"train": [], "val": []})
    run_id: str | None = None


def train_one_epoch(
    net: Colorizer,
    opt: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: DataLoader,
    s: Settings,
    flips: torch.Generator,
    progress: Progress,
    last_step: int,
    after_step: Callable[[float], None],
) -> None:
    """Steps until the loader is exhausted (end of epoch) or ``last_step``; ``after_step(loss)`` runs after
    each (logging, validation at epoch end, checkpoints)."""
    for l_norm, ab in loader:
        if s.hflip:
            flip = torch.rand(len(ab), generator=flips) < 0.5
            l_norm, ab = l_norm.clone(), ab.clone()
            l_norm[flip], ab[flip] = l_norm[flip].flip(-1), ab[flip].flip(-1)
        if s.channels_last:
            l_norm = l_norm.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):
            pred = net(l_norm)
        loss = criterion(pred.float(), ab)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise DivergedError(
                f"training diverged at step {progress.step + 1}: the loss is {loss_value} "
                f"(train.lr={s.lr}); lower train.lr or set train.grad_clip"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), s.grad_clip)
        opt.step()
        progress.step += 1
        progress.history["train"].append((progress.step, loss_value))
        after_step(loss_value)
        if progress.step >= last_step:
            return


_CHECKPOINT_KEYS = {"model", "optimizer", "step", "torch_rng", "flip_rng", "history"}


def _read_checkpoint(path: Path, variant: str) -> dict[str, Any] | None:
    """The resumable state, or None: absent, or unreadable (then reported and redone, never trusted)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not state.keys() >= _CHECKPOINT_KEYS:
            raise ValueError("missing fields")
        return state
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or foreign: all mean "start over"
        log.warning("%s: checkpoint %s is unreadable (%s); starting this variant over", variant, path, exc)
        return None


def train_variant(
    out: Path, plan: dict[str, Any], parent_run_id: str | None = None, on_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    s = Settings.model_validate(plan["config"])
    seed, variant = plan["facts"]["seed"], plan["facts"]["variant"]
    prepared = plan["inputs"]["prepared"]
    if s.threads:
        torch.set_num_threads(s.threads)
    scratch = out / SCRATCH
    scratch.mkdir(parents=True, exist_ok=True)
    ckpt = scratch / CHECKPOINT
    state = _read_checkpoint(ckpt, variant)  # before building: a damaged one means a fresh start
    torch.manual_seed(seed)
    random.seed(seed)
    spec = ColorizerSpec(fusion=variant, decoder_width=s.decoder_width, image_size=prepared["image_size"])
    net, weights = build(spec, s.pretrained, allow_download=True)
    net.freeze(s.freeze)
    net = net.to(memory_format=torch.channels_last if s.channels_last else torch.contiguous_format).train()
    opt = make_optimizer(net, s.lr, s.weight_decay)
    criterion = loss_fn(s.loss)

    n_train = prepared["counts"]["train"]
    bs = min(s.batch_size, n_train)
    if bs < 2:
        raise ConfigError(
            f"the train split holds {n_train} image(s); training needs at least 2 per batch (BatchNorm): "
            "add photos, or lower download.test_fraction / download.val_fraction"
        )
    per_epoch = n_train // bs
    total = s.epochs * per_epoch if s.max_steps is None else min(s.epochs * per_epoch, s.max_steps)
    dataset = ShardDataset(shard_paths(prepared, "train"), decode_sample, seed=seed, buffer=max(256, 4 * bs))
    val_shards = shard_paths(prepared, "val")

    # Own generators: flips are drawn from `flips` (saved in the checkpoint); the DataLoader gets its own
    # generator because every new iterator draws a seed, and a resumed run creates one more iterator.
    flips = torch.Generator().manual_seed(seed)
    loader_gen = torch.Generator().manual_seed(seed)
    progress = Progress()
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        flips.set_state(state["flip_rng"])
        progress = Progress(state["step"], state["history"], state.get("mlflow_run_id"))
        log.info("%s: resuming from step %d of %d", variant, progress.step, total)

    tracker = Tracker(Path(plan["workdir"]))
    if progress.run_id is None:
        tags = {"stage": STAGE, "variant": variant, "pretrained": str(weights.used)}
        progress.run_id = tracker.start_run(f"train-{variant}", parent_run_id, tags)
        params = {
            **flatten("train", s.model_dump()),
            "seed": seed,
            "variant": variant,
            "image_size": spec.image_size,
            "prepared_key": prepared["key"],
            "n_train": n_train,
            "pretrained_weights": weights.detail,
        }
        tracker.log_params(progress.run_id, params)
        if not weights.used:
            tracker.set_tags(progress.run_id, {"warning": f"trained from scratch: {weights.detail}"})
    run_id = progress.run_id

    def save_checkpoint() -> None:
        with atomic_path(ckpt) as tmp:
            torch.save(
                {
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": progress.step,
                    "epoch": progress.step // per_epoch,
                    "torch_rng": torch.get_rng_state(),
                    "flip_rng": flips.get_state(),
                    "history": progress.history,
                    "mlflow_run_id": run_id,
                },
                tmp,
            )

    bar = tqdm(total=total, initial=progress.step, desc=f"train {variant}", unit="step", dynamic_ncols=True)
    t_start, images = time.perf_counter(), 0

    def after_step(loss_value: float) -> None:
        nonlocal images
        step = progress.step
        images += bs
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images / (time.perf_counter() - t_start):.1f}")
        if step % s.log_every == 0 or step == total:
            tracker.log_metrics(run_id, {"train_loss": loss_value}, step)
        end_of_epoch = step % per_epoch == 0 or step == total
        if end_of_epoch:
            val = validate(net, val_shards, bs, s.channels_last)
            if val is not None:
                progress.history["val"].append((step, val[0]))
                progress.history["val_gray"] = val[1]
                metrics = {"val_loss": val[0], "val_loss_gray_baseline": val[1], "epoch": step / per_epoch}
                tracker.log_metrics(run_id, metrics, step)
                log.info("%s step %d: val MSE %.5f (grayscale baseline %.5f)", variant, step, *val)
        if step % s.checkpoint_every == 0 or end_of_epoch:
            save_checkpoint()
        if on_step is not None:
            on_step(step)

    while progress.step < total:
        epoch = progress.step // per_epoch
        dataset.set_epoch(epoch, skip=(progress.step % per_epoch) * bs)
        loader = DataLoader(dataset, batch_size=bs, drop_last=True, generator=loader_gen)
        epoch_end = min(total, (epoch + 1) * per_epoch)
        train_one_epoch(net, opt, criterion, loader, s, flips, progress, epoch_end, after_step)
    bar.close()
    ips = images / (time.perf_counter() - t_start) if images else None

    history = progress.history
    save_trained(net, out)
    write_json(out / "history.json", history)
    net.eval()
    l_norm, ab = first_batch(val_shards or shard_paths(prepared, "train"), s.preview_images)
    with torch.no_grad():
        pred = net(l_norm)
    save_png(grid(l_norm, [pred, ab]), out / "samples.png")
    save_loss_curve(history["train"], history["val"], out / "loss_curve.png", f"{variant} fusion")
    for name in ("samples.png", "loss_curve.png", SPEC_FILE):
        tracker.log_artifact(run_id, out / name)
    tracker.end_run(run_id)
    return {
        "variant": variant,
        "steps": progress.step,
        "spec": spec.as_dict(),
        "mlflow_run_id": run_id,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "val_loss": history["val"][-1][1] if history["val"] else None,
        "val_loss_gray_baseline": history.get("val_gray"),
        "pretrained": {"used": weights.used, "detail": weights.detail},
        "images_per_second": round(ips, 2) if ips else None,
        "seed": seed,
    }


def run(
    plan: dict[str, Any],
    force: bool = False,
    parent_run_id: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> StageResult:
    return run_stage(plan, lambda out: train_variant(out, plan, parent_run_id, on_step), force=force)
