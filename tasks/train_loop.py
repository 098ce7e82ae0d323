"""The train stage's loop: the epochs of one variant from where its state stands (:func:`run_epochs`,
:func:`train_one_epoch`), with rank 0's validation at epoch ends (:func:`validate`) and the
checkpoints, logging and parent check at the loop's boundaries; and :func:`train_in_process`, the
whole training of one process (this one, or one rank of a torchrun job): read the checkpoint, build,
resume, record, loop, finish. A module of its own because the stage process (tasks.train) and every
rank (tasks.train_ddp) run this same loop, and neither may import the other.

The step itself (eager, or replayed from a CUDA graph on a GPU) and the loss record read only at the
loop's boundaries are tasks.train_step's; the rate at each step tasks.train_schedule's; the state a
checkpoint holds tasks.train_state's; rank 0's MLflow record and stage folder tasks.train_record's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from model import hints as hinting
from model.colorizer import Colorizer
from model.samples import decode_sample
from storage.atomic import atomic_path
from storage.shards import ShardDataset
from storage.stage import SCRATCH
from tasks import checkpoint, distributed
from tasks.distributed import World
from tasks.losses import criterion
from tasks.settings.train import Settings
from tasks.train_record import TrainRecord, finish, start_record
from tasks.train_schedule import lr_at
from tasks.train_state import BEST, Progress, Setup, build_setup, resume, save_checkpoint
from tasks.train_step import EagerStep, StepConfig, make_step, set_lr

log = logging.getLogger(__name__)


def train_in_process(
    out: Path,
    plan: dict[str, Any],
    s: Settings,
    world: World,
    parent_run_id: str | None = None,
    on_step: Callable[[int], None] | None = None,
    job_info: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """One variant's training in this process, as the whole job (``world`` of one) or as one of its
    ranks; ``s`` is the plan's section, validated once in this process by the caller.

    Every rank runs the same steps; rank 0 alone validates, logs to MLflow and writes checkpoints and
    the stage folder's files, and returns the manifest fields (the others return None). Exact resume
    under DDP: the checkpoint holds every rank's RNG state (gathered), rank 0's weights and BatchNorm
    buffers (DDP's ``forward_sync_buffers`` copies them to the others at each forward), the optimizer
    (identical on all ranks: the gradients are all-reduced), and the step, from which each rank finds
    its place in the global sample order."""
    if s.threads:
        torch.set_num_threads(s.threads)
    if world.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes: each convolution's fastest kernel, found once
    (out / SCRATCH).mkdir(parents=True, exist_ok=True)
    # Read before building: a damaged checkpoint means a fresh start.
    state = checkpoint.read(out / SCRATCH / checkpoint.CHECKPOINT, plan["facts"]["variant"], world.size)
    t = build_setup(out, plan, s, world, state["step"] if state is not None else 0)
    progress = resume(t, state)
    record = start_record(t, progress, parent_run_id)
    images_per_second = run_epochs(t, progress, record, on_step, job_info)
    if record is None:
        return None
    record.close()
    return finish(t, progress, record, images_per_second)


def loader_workers(s: Settings, device: torch.device) -> int:
    """DataLoader worker processes: none on a CPU, where the step is compute-bound and workers would take
    its cores; on CUDA up to 8 (leaving one core to the training process), so reading and decoding the
    next batches overlaps the GPU's step. ``train.loader_workers`` overrides."""
    if s.loader_workers is not None:
        return s.loader_workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


@torch.no_grad()
def validate(
    net: Colorizer, shards: list[Path], batch_size: int, channels_last: bool, device: torch.device | None = None
) -> tuple[float, float] | None:
    """(MSE of the model's ab, MSE of the grayscale baseline ab = 0) on the validation split."""
    if not shards:
        return None
    net.eval()
    total, gray, n = 0.0, 0.0, 0
    loader = DataLoader(ShardDataset(shards, decode_sample), batch_size=batch_size)
    for l_norm, ab in loader:
        l_norm, ab = _to(l_norm, device, channels_last), _to(ab, device)
        total += float(torch.nn.functional.mse_loss(net(l_norm), ab, reduction="sum"))
        gray += float(ab.square().sum())
        n += ab.numel()
    net.train()
    return (total / n, gray / n) if n else None


def _to(x: torch.Tensor, device: torch.device | None, channels_last: bool = False) -> torch.Tensor:
    """To the validation device, channels_last for the network."""
    if device is not None and x.device != device:
        x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_one_epoch(
    step: EagerStep,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    s: Settings,
    flips: torch.Generator,
    progress: Progress,
    last_step: int,
    after_step: Callable[[], None],
    world: World | None = None,
    hint_gen: torch.Generator | None = None,
) -> None:
    """Steps until the loader is exhausted (end of epoch) or ``last_step``; ``after_step()`` runs after
    each (reading the losses at the loop's boundaries, logging, validation at epoch end, checkpoints).
    Under DDP each rank holds batch / world samples of the global batch (see storage.shards.iter_samples):
    flips are drawn for the whole global batch from the same generator on every rank, each rank takes
    its samples' draws, and the loss recorded is the mean over ranks, so a run's record and its flips do
    not depend on the process count. A hinted model (``train.hints``) gets a simulated user's hints for
    each sample from ``hint_gen``, this rank's own generator (saved in the checkpoint per rank)."""
    world = world or World()
    for l_norm, ab in loader:
        flip = None
        if s.hflip:
            flip = (torch.rand(len(ab) * world.size, generator=flips) < 0.5)[world.rank :: world.size]
        given = None if hint_gen is None else hinting.simulate(ab.float(), s.hints, hint_gen)
        progress.step += 1
        progress.losses.add(progress.step, step(l_norm, ab, flip, given))
        after_step()
        if progress.step >= last_step:
            return


def run_epochs(
    t: Setup,
    progress: Progress,
    record: TrainRecord | None,
    on_step: Callable[[int], None] | None,
    job_info: dict[str, Any] | None,
) -> float | None:
    """The epoch loop from ``progress.step`` to the end; returns its images per second. At each
    boundary (``log_every``, checkpoints, epoch ends) the losses are read in one sync, rank 0 validates
    at epoch ends (keeping the best weights with ``keep=best``), and a checkpoint is written."""
    s, world, model = t.s, t.world, t.net
    if world.size > 1:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        # forward_sync_buffers: rank 0's BatchNorm running statistics are copied to every rank at each
        # forward, so rank 0's buffers (the ones checkpointed and saved) are the job's.
        model = torch.nn.parallel.DistributedDataParallel(t.net, device_ids=device_ids, forward_sync_buffers=True)
    # No rate to set here: build_setup made the optimizer at the schedule's rate for progress.step.
    t_start, images = time.perf_counter(), 0
    loss = criterion(s, t.plan["inputs"]["prepared"], t.net.bins if t.net.classifies else None)
    step_fn = make_step(model, t.opt, loss, StepConfig(s.bf16, s.channels_last, s.grad_clip), t.graphs)

    def after_step() -> None:
        nonlocal images
        step, images = progress.step, images + t.bs
        set_lr(t.opt, lr_at(s, step, t.total, t.peak))
        if job_info is not None:
            distributed.check_parent(job_info)
        end_of_epoch = step % t.per_epoch == 0 or step == t.total
        checkpoint_now = step % s.checkpoint_every == 0 or end_of_epoch
        if record is not None:
            record.step()
        if checkpoint_now or step % s.log_every == 0:
            read = progress.read_losses(world, s.lr)  # every rank, at the same steps: the one sync
            if record is not None:
                record.losses(read, step, s.log_every, images / (time.perf_counter() - t_start))
                if end_of_epoch:
                    _validated(t, progress, record, step)
            if checkpoint_now:
                save_checkpoint(t, progress)
        if on_step is not None:
            on_step(step)

    workers, cuda = loader_workers(s, world.device), world.device.type == "cuda"
    while progress.step < t.total:
        epoch = progress.step // t.per_epoch
        t.dataset.set_epoch(epoch, skip=(progress.step % t.per_epoch) * t.bs)
        loader = DataLoader(
            t.dataset,
            batch_size=t.bs // world.size,
            drop_last=True,  # every step the same shape: what a captured graph needs
            generator=t.loader_gen,
            pin_memory=cuda,
            num_workers=workers,
        )
        train_one_epoch(
            step_fn,
            loader,
            s,
            t.flips,
            progress,
            min(t.total, (epoch + 1) * t.per_epoch),
            after_step,
            world,
            t.hint_gen,
        )
    return images / (time.perf_counter() - t_start) if images else None


def _validated(t: Setup, progress: Progress, record: TrainRecord, step: int) -> None:
    """Rank 0 at an epoch end: the validation loss into the record and MLflow, and with ``keep=best``
    the weights when they are the best so far (written before the checkpoint that records it)."""
    val = validate(t.net, t.val_shards, t.bs, t.s.channels_last, t.world.device)
    if val is None:
        return
    progress.history["val"].append((step, val[0]))
    progress.history["val_gray"] = val[1]
    record.validation(step, val, step / t.per_epoch)
    if t.s.keep == "best" and val[0] < progress.history.get("best", (0, math.inf))[1]:
        with atomic_path(t.scratch / BEST) as tmp:
            torch.save(t.net.state_dict(), tmp)
        progress.history["best"] = (step, val[0])
