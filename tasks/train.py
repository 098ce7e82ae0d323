"""Training stage: one fusion variant on the prepared train split, resumable, logged to MLflow.

The loop reads like torchvision's classification reference: :func:`train_variant` is build, resume,
record, the epoch loop (:func:`train_one_epoch`, :func:`validate`) and finish; checkpoints are
tasks.checkpoint's, rank 0's MLflow record tasks.train_record's, a torchrun job tasks.distributed's.
Adam (constant or cosine-annealed rate), MSE on ab (optionally +L1 or
+colourfulness) or, with ``head=classification``, the rebalanced cross-entropy over quantized ab
(model.ab_bins), optional bf16 autocast, gradient clipping, channels_last; the last weights are kept, or
the epoch end's with the lowest validation MSE. Every ``checkpoint_every`` steps the model, optimizer,
step, data position and RNG state are written atomically to ``scratch/checkpoint.pt``; a killed run
resumes from there and, with the same seed, ends with the same weights as an uninterrupted run (the
data order is a pure function of seed and epoch, see storage.shards.ShardDataset). A non-finite loss
stops training with an error: nothing is cached, so a diverged model can never be evaluated or
registered. The step itself (eager, or replayed from a CUDA graph on a GPU) and the loss record read
only at the loop's boundaries are tasks.train_step's.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.data import DataLoader

from model import ab_bins, fusion, pretrained
from model.choices import HEADS
from model.colorizer import SPEC_FILE, Colorizer, ColorizerSpec, build, save_trained
from model.lab import lab_norm_to_rgb
from model.metrics import colorfulness_torch
from model.preview import grid, save_loss_curve, save_png
from model.samples import decode_sample, decode_sample16, first_batch
from storage.atomic import atomic_path, write_json
from storage.code_identity import code_version
from storage.errors import ConfigError
from storage.settings import Section, flow_setting
from storage.shards import ShardDataset, shard_paths
from storage.stage import SCRATCH, StageResult, make_plan, run_stage
from storage.tracking import flatten
from tasks import checkpoint, distributed
from tasks.distributed import World
from tasks.train_record import TrainRecord
from tasks.train_step import (
    Criterion,
    EagerStep,
    GraphSetting,
    LossLog,
    StepConfig,
    make_optimizer,
    make_step,
    set_lr,
    use_graphs,
)

log = logging.getLogger(__name__)
STAGE = "train"
WHAT = "training"  # the flow's word for it: "training failed for max"
BEST = "best.pt"  # under scratch: the weights of the best validation so far (train.keep=best)


class Settings(Section):
    """The train section. ``variants`` and ``concurrent`` are the flow's: which train stages to run and
    whether at once. Everything else is given to the stage and is in its key."""

    variants: list[str] = flow_setting(
        default_factory=lambda: list(fusion.names()), description="fusion variants to train (model.fusion.VARIANTS)"
    )
    concurrent: bool = flow_setting(False, description="train variants at the same time (off: they share cores)")
    seeds: list[int] | None = flow_setting(
        None, description="training seeds: one train stage per variant and seed (default: the run's seed)"
    )
    batch_size: int = Field(16, ge=2, le=65536, description="at least 2: BatchNorm needs two samples")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate over the run: constant, or cosine-annealed from lr to 0 at the last step"
    )
    keep: Literal["last", "best"] = Field(
        "last", description="weights to keep: the last step's, or the epoch end with the lowest validation MSE"
    )
    epochs: int = Field(6, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (across epochs)")
    head: Literal[HEADS] = Field(  # type: ignore[valid-type]
        "regression",
        description="regression: ab directly (train.loss); classification: a distribution over quantized ab "
        "(rebalanced cross-entropy), decoded at evaluate.temperature",
    )
    rebalance: float = Field(
        0.5, ge=0, le=1, description="classification head: the ab prior's mix with the uniform (1: no rebalancing)"
    )
    loss: Literal["mse", "l1", "mse+l1", "mse+colourfulness"] = Field(
        "mse", description="the regression head's loss on ab"
    )
    colour_weight: float = Field(
        0.5, ge=0, le=100, description="weight of the colourfulness term (loss=mse+colourfulness)"
    )
    hflip: bool = Field(True, description="random horizontal flips of training batches (seeded)")
    pretrained: bool = Field(True, description="use ImageNet weights when present or downloadable")
    freeze: Literal["none", "stems", "all"] = "none"
    decoder_width: int = Field(64, ge=8, le=4096, description="channels of the finest decoder block")
    lr_scaling: Literal["none", "sqrt", "linear"] = Field(
        "none", description="scale train.lr by batch_size / lr_batch: sqrt (Adam's rule), linear (SGD's) or none"
    )
    lr_batch: int = Field(16, ge=1, le=65536, description="the batch size train.lr is stated for (lr_scaling)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the rate over the first steps")
    bf16: bool = False
    channels_last: bool = True
    grad_clip: float | None = Field(1.0, gt=0)
    cuda_graphs: GraphSetting = Field(
        "auto", description="capture the step as a CUDA graph: auto (with one CUDA process), on, off"
    )
    loader_workers: int | None = Field(
        None, ge=0, le=64, description="DataLoader worker processes (default: none on a CPU, up to 8 with CUDA)"
    )
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(5, ge=1)
    preview_images: int = Field(8, ge=1, le=256, description="images in samples.png")
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads per training process")
    accelerator: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible")
    devices: int = Field(1, ge=1, le=1024, description="training processes per node (torchrun, DDP); GPUs with CUDA")
    nodes: int = Field(1, ge=1, le=4096, description=f"machines in the job; above 1 set {distributed.RDZV_ENV}")

    @field_validator("variants", "seeds", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool):
            return [v]
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("at least one seed is needed")
        if any(not 0 <= x < 2**32 for x in v):
            raise ValueError("seeds must be in [0, 2**32)")
        return list(dict.fromkeys(v))

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one variant is needed")
        for name in v:
            fusion.variant(name)  # an unknown name: one line naming the choices
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _head_loss(self) -> Settings:
        if self.head == "classification" and self.loss != "mse":
            raise ValueError(
                f"train.loss={self.loss} is the regression head's; the classification head's loss is the "
                "rebalanced cross-entropy (tune it with train.rebalance)"
            )
        return self

    @model_validator(mode="after")
    def _split_batch(self) -> Settings:
        """The global batch is kept whatever the process count: each rank takes batch / processes."""
        world = self.devices * self.nodes
        if self.batch_size % world:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly over {world} processes (devices x nodes); "
                f"choose a multiple of {world}"
            )
        if self.batch_size // world < 2:
            raise ValueError(
                f"batch_size {self.batch_size} over {world} processes leaves under 2 per process (BatchNorm)"
            )
        return self


def plan(s: Settings, seed: int, variant: str, prepared: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Whether ImageNet weights are on disk changes the result, so which were found is a fact in the key."""
    found = [pretrained.locate(n, allow_download=False) for n in ("resnet50", "densenet121")]
    facts = {
        "seed": seed,
        "variant": variant,
        "imagenet_weights": [f.path.name for f in found if f.available] if s.pretrained else [],
        "accelerator": distributed.resolve_accelerator(s.accelerator),
    }
    use_graphs(s.cuda_graphs, torch.device(facts["accelerator"]), _world_size(s))  # cuda_graphs=on on a CPU: refused
    if facts["accelerator"] == "cuda" and s.devices > torch.cuda.device_count():
        raise ConfigError(f"train.devices={s.devices} but {torch.cuda.device_count()} CUDA device(s) are visible")
    return make_plan(workdir, STAGE, {"prepared": prepared}, s.for_stage(), code_version(__name__), facts)


def task_name(variant: str, seed: int, named: bool) -> str:
    """``train-max``, or ``train-max-seed1`` when the run trains several seeds (or another than its own)."""
    return f"{STAGE}-{variant}-seed{seed}" if named else f"{STAGE}-{variant}"


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan per variant and training seed (the run's seed unless
    ``train.seeds`` says otherwise; the data split keeps the run's seed)."""
    seeds = s.seeds or [seed]
    named = len(seeds) > 1 or seeds != [seed]
    return {task_name(v, x, named): plan(s, x, v, inputs["prepare"], workdir) for v in s.variants for x in seeds}


def peak_lr(s: Settings, batch: int) -> float:
    """The rate for this run's global batch: ``train.lr`` is stated for ``train.lr_batch`` images, and a
    larger batch averages away gradient noise, so it can take a larger step. ``sqrt``: lr x sqrt(batch /
    lr_batch), the rule derived for Adam (Malladi et al., NeurIPS 2022: the square-root scaling rule keeps
    Adam's SDE the same; Krizhevsky 2014 argued it first). ``linear``: lr x batch / lr_batch, the rule for
    SGD (Goyal et al. 2017), which needs its warm-up. Example: the demo's 3e-4 at 16 images is 1.2e-3 at
    256 with ``sqrt``."""
    ratio = batch / s.lr_batch
    return s.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[s.lr_scaling]


def lr_at(s: Settings, step: int, total: int, peak: float | None = None) -> float:
    """The learning rate for the step after ``step``: a pure function of the step, so a resumed run needs
    nothing saved beyond the optimizer. A linear warm-up to ``peak`` over ``warmup_steps`` (a large batch's
    scaled rate is unstable on the first, untrained steps: Goyal et al. 2017), then constant or
    cosine-annealed to 0 at ``total``. Cosine annealing ends near 0, where the weights stop moving:
    without it, the last epoch's noise (validation MSE moving by up to 41% from one epoch to the next on the
    photo corpus) decides which model is kept."""
    peak = s.lr if peak is None else peak
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return peak
    done, span = min(step, total) - s.warmup_steps, max(1, total - s.warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * done / span))


def loader_workers(s: Settings, device: torch.device) -> int:
    """DataLoader worker processes: none on a CPU, where the step is compute-bound and workers would take
    its cores; on CUDA up to 8 (leaving one core to the training process), so reading and decoding the
    next batches overlaps the GPU's step. ``train.loader_workers`` overrides."""
    if s.loader_workers is not None:
        return s.loader_workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def criterion(s: Settings, prepared: Mapping[str, Any], bins: torch.Tensor | None) -> Criterion:
    """The run's loss: the regression head's (:func:`loss_fn`), or the classification head's rebalanced
    cross-entropy with the weights made from the train split's ab prior (recorded by prepare)."""
    if s.head == "regression" or bins is None:
        return loss_fn(s.loss, s.colour_weight)
    return ab_bins.RebalancedLoss(bins, torch.tensor(prepared["ab_prior"]["counts"]), s.rebalance)


def loss_fn(kind: str, colour_weight: float = 0.5) -> Criterion:
    """The training loss on normalized ab. ``mse+colourfulness`` adds the per-image gap between the
    prediction's and the truth's colourfulness (Hasler & Suesstrunk, on RGB rebuilt with the true L),
    in units of 100, times ``colour_weight``: plain MSE is minimized by the conditional mean of ab, which
    for an ambiguous object is a desaturated brown (the sepia look); the gap term charges exactly that.
    DDColor's colourfulness loss pushes colourfulness up without a target; with the truth at hand the
    gap is the supervised form of it, and cannot be lowered by over-saturating."""
    mse, l1 = torch.nn.functional.mse_loss, torch.nn.functional.l1_loss
    if kind == "mse+colourfulness":

        def mse_colour(pred: torch.Tensor, true: torch.Tensor, l_norm: torch.Tensor) -> torch.Tensor:
            l_norm = l_norm.float().contiguous()
            gap = colorfulness_torch(lab_norm_to_rgb(l_norm, pred)) - colorfulness_torch(lab_norm_to_rgb(l_norm, true))
            return mse(pred, true) + colour_weight * gap.abs().mean() / 100.0

        return mse_colour
    plain = {"mse": mse, "l1": l1, "mse+l1": lambda p, t: mse(p, t) + l1(p, t)}[kind]
    return lambda pred, true, _l: plain(pred, true)


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


@dataclass
class Progress:
    """The loop's position and record: what a checkpoint saves besides weights and optimizer."""

    step: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {"train": [], "val": []})
    run_id: str | None = None
    losses: LossLog = field(default_factory=LossLog)  # on the device until read (see read_losses)

    def read_losses(self, world: World, lr: float) -> list[tuple[int, float]]:
        """The losses since the last read, into the history; DivergedError at a non-finite one."""
        read = self.losses.read(world, lr)
        self.history["train"] += read
        return read


def train_one_epoch(
    step: EagerStep,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    s: Settings,
    flips: torch.Generator,
    progress: Progress,
    last_step: int,
    after_step: Callable[[], None],
    world: World | None = None,
) -> None:
    """Steps until the loader is exhausted (end of epoch) or ``last_step``; ``after_step()`` runs after
    each (reading the losses at the loop's boundaries, logging, validation at epoch end, checkpoints).
    Under DDP each rank holds batch / world samples of the global batch (see storage.shards.iter_samples):
    flips are drawn for the whole global batch from the same generator on every rank, each rank takes
    its samples' draws, and the loss recorded is the mean over ranks, so a run's record and its flips do
    not depend on the process count."""
    world = world or World()
    for l_norm, ab in loader:
        flip = None
        if s.hflip:
            flip = (torch.rand(len(ab) * world.size, generator=flips) < 0.5)[world.rank :: world.size]
        progress.step += 1
        progress.losses.add(progress.step, step(l_norm, ab, flip))
        after_step()
        if progress.step >= last_step:
            return


def _world_size(s: Settings) -> int:
    return s.devices * s.nodes


@dataclass
class Setup:
    """One variant's training, built: the network and its optimizer, the data, the step counts and the
    generators whose states a checkpoint records."""

    s: Settings
    plan: dict[str, Any]
    out: Path
    world: World
    spec: ColorizerSpec
    net: Colorizer
    weights: Any  # model.colorizer.build's report on the pretrained encoders
    opt: torch.optim.Optimizer
    graphs: bool  # the step is captured as a CUDA graph
    bs: int  # the global batch
    per_epoch: int
    total: int
    peak: float  # the rate after warm-up
    dataset: ShardDataset
    val_shards: list[Path]
    flips: torch.Generator
    loader_gen: torch.Generator

    @property
    def variant(self) -> str:
        return self.plan["facts"]["variant"]

    @property
    def scratch(self) -> Path:
        return self.out / SCRATCH


def build_setup(out: Path, plan: dict[str, Any], world: World) -> Setup:
    """Seed, build the network (pretrained encoders where available), its optimizer and the sharded
    train set of this rank; refuse a train split too small for a batch."""
    s = Settings.model_validate(plan["config"])
    seed, prepared = plan["facts"]["seed"], plan["inputs"]["prepared"]
    torch.manual_seed(seed)
    random.seed(seed)
    bins = ab_bins.bins() if s.head == "classification" else None
    if bins is not None and prepared.get("ab_prior", {}).get("bins") != len(bins):
        raise ConfigError(f"the prepared data has no ab prior over these {len(bins)} bins: rerun the prepare stage")
    spec = ColorizerSpec(
        fusion=plan["facts"]["variant"],
        decoder_width=s.decoder_width,
        image_size=prepared["image_size"],
        head=s.head,
        classes=0 if bins is None else len(bins),
    )
    # Ranks never download: the launching process fetched what was fetchable (see tasks.distributed).
    net, weights = build(spec, s.pretrained, allow_download=world.size == 1)
    if bins is not None:  # the head starts from the train split's colours (model.ab_bins.prior_logits)
        with torch.no_grad():
            net.head.bias.copy_(ab_bins.prior_logits(torch.tensor(prepared["ab_prior"]["counts"])))
    net.freeze(s.freeze)
    net = net.to(world.device, memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)
    net.train()
    graphs = use_graphs(s.cuda_graphs, world.device, world.size)
    opt = make_optimizer(net, s.lr, s.weight_decay, capturable=graphs)
    n_train = prepared["counts"]["train"]
    bs = min(s.batch_size, n_train) // world.size * world.size
    if bs < 2 * world.size:
        raise ConfigError(
            f"the train split holds {n_train} image(s); training needs at least 2 per batch and process "
            "(BatchNorm): add photos, or lower download.test_fraction / download.val_fraction"
        )
    per_epoch = n_train // bs
    total = s.epochs * per_epoch if s.max_steps is None else min(s.epochs * per_epoch, s.max_steps)
    dataset = ShardDataset(
        shard_paths(prepared, "train"),
        decode_sample16,
        seed=seed,
        buffer=max(256, 4 * bs),
        rank=world.rank,
        world=world.size,
        batch=bs // world.size,
    )
    # Own generators: flips are drawn from `flips` (saved in the checkpoint); the DataLoader gets its own
    # generator because every new iterator draws a seed, and a resumed run creates one more iterator.
    flips, loader_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    return Setup(
        s, plan, out, world, spec, net, weights, opt, graphs, bs, per_epoch, total, peak_lr(s, bs), dataset,
        shard_paths(prepared, "val"), flips, loader_gen,
    )  # fmt: skip


def resume(t: Setup, state: dict[str, Any] | None) -> Progress:
    """Where the loop starts: step 0, or the checkpoint's weights, optimizer, RNG states and record."""
    if state is None:
        return Progress()
    t.net.load_state_dict(state["model"])
    t.opt.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["torch_rng"][t.world.rank], t.world.device)
    t.flips.set_state(state["flip_rng"])
    if t.world.main:
        log.info("%s: resuming from step %d of %d", t.variant, state["step"], t.total)
    return Progress(state["step"], state["history"], state.get("mlflow_run_id"))


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
    tags = {"stage": STAGE, "variant": t.variant, "pretrained": str(t.weights.used)}
    warning = None if t.weights.used else f"trained from scratch: {t.weights.detail}"
    progress.run_id = record.start(progress.run_id, parent_run_id, tags, params, warning)
    return record


def save_checkpoint(t: Setup, progress: Progress) -> None:
    """Every rank's RNG state gathered (a collective: all take part), then rank 0 writes the checkpoint."""
    rng = t.world.gather(checkpoint.rng_state(t.world.device))
    if t.world.main:
        checkpoint.write(
            t.scratch / checkpoint.CHECKPOINT,
            {
                **{"model": t.net.state_dict(), "optimizer": t.opt.state_dict(), "step": progress.step},
                **{"epoch": progress.step // t.per_epoch, "world": t.world.size, "torch_rng": rng},
                **{"flip_rng": t.flips.get_state(), "history": progress.history, "mlflow_run_id": progress.run_id},
            },
        )


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
    t_start, images = time.perf_counter(), 0
    set_lr(t.opt, lr_at(s, progress.step, t.total, t.peak))
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
            step_fn, loader, s, t.flips, progress, min(t.total, (epoch + 1) * t.per_epoch), after_step, world
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
        "world_size": t.world.size,
        "accelerator": t.plan["facts"]["accelerator"],
    }


def train_variant(
    out: Path,
    plan: dict[str, Any],
    parent_run_id: str | None = None,
    on_step: Callable[[int], None] | None = None,
    world: World | None = None,
    job_info: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """One variant's training, in this process (``world`` given or a single process) or, when the
    settings ask for several processes, in a torchrun job this process launches and waits for.

    Every rank runs the same steps; rank 0 alone validates, logs to MLflow and writes checkpoints and
    the stage folder's files (the others return None). Exact resume under DDP: the checkpoint holds
    every rank's RNG state (gathered), rank 0's weights and BatchNorm buffers (DDP's
    ``forward_sync_buffers`` copies them to the others at each forward), the optimizer (identical on
    all ranks: the gradients are all-reduced), and the step, from which each rank finds its place in
    the global sample order."""
    s = Settings.model_validate(plan["config"])
    if world is None and _world_size(s) > 1:
        return distributed.launch_training(out, plan, parent_run_id)
    world = world or World(device=torch.device("cuda" if plan["facts"]["accelerator"] == "cuda" else "cpu"))
    if s.threads:
        torch.set_num_threads(s.threads)
    if world.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes: each convolution's fastest kernel, found once
    (out / SCRATCH).mkdir(parents=True, exist_ok=True)
    # Read before building: a damaged checkpoint means a fresh start.
    state = checkpoint.read(out / SCRATCH / checkpoint.CHECKPOINT, plan["facts"]["variant"], world.size)
    t = build_setup(out, plan, world)
    progress = resume(t, state)
    record = start_record(t, progress, parent_run_id)
    images_per_second = run_epochs(t, progress, record, on_step, job_info)
    if record is None:
        return None
    record.close()
    return finish(t, progress, record, images_per_second)


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


def run(
    plan: dict[str, Any],
    force: bool = False,
    parent_run_id: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> StageResult:
    return run_stage(plan, lambda out: train_variant(out, plan, parent_run_id, on_step), force=force)
