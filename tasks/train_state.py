"""One variant's training state: built (:class:`Setup`: the network, its optimizer, the data, the step
counts, the generators), its position (:class:`Progress`), and the round trip through the checkpoint
(:func:`resume`, :func:`save_checkpoint`). A module of its own because the loop (tasks.train_loop) and
rank 0's record (tasks.train_record) both read this state, and neither should import the other to get
it; what the checkpoint file holds and how it is read is tasks.checkpoint's.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import ab_bins
from model.colorizer import Colorizer, ColorizerSpec, build
from model.samples import decode_sample16
from storage.errors import ConfigError
from storage.shards import ShardDataset, shard_paths
from storage.stage import SCRATCH
from tasks import checkpoint
from tasks.distributed import World
from tasks.settings.train import Settings
from tasks.train_schedule import lr_at, peak_lr, plan_warnings
from tasks.train_step import LossLog, make_optimizer, use_graphs

log = logging.getLogger(__name__)
HINT_SEED = 0x48494E54  # "HINT": the simulated user's stream, apart from the run's seed-derived others
BEST = "best.pt"  # under scratch: the weights of the best validation so far (train.keep=best)


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
    hint_gen: torch.Generator | None = None  # this rank's simulated user (train.hints), None without hints

    @property
    def variant(self) -> str:
        return self.plan["facts"]["variant"]

    @property
    def scratch(self) -> Path:
        return self.out / SCRATCH


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


def build_setup(out: Path, plan: dict[str, Any], s: Settings, world: World, step: int = 0) -> Setup:
    """Seed, build the network (pretrained encoders where available), its optimizer and the sharded
    train set of this rank; refuse a train split too small for a batch. ``s`` is the plan's section,
    validated once by the caller; ``step`` is where the loop starts (0, or the checkpoint's step)."""
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
        hints=s.hints,
    )
    # Ranks never download: the launching process fetched what was fetchable (see tasks.train_ddp).
    net, weights = build(spec, s.pretrained, allow_download=world.size == 1)
    if bins is not None:  # the head starts from the train split's colours (model.ab_bins.prior_logits)
        with torch.no_grad():
            net.head.bias.copy_(ab_bins.prior_logits(torch.tensor(prepared["ab_prior"]["counts"])))
    net.freeze(s.freeze)
    net = net.to(world.device, memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)
    net.train()
    graphs = use_graphs(s.cuda_graphs, world.device, world.size, hinted=s.hints != "off")
    n_train = prepared["counts"]["train"]
    bs = min(s.batch_size, n_train) // world.size * world.size
    if bs < 2 * world.size:
        raise ConfigError(
            f"the train split holds {n_train} image(s); training needs at least 2 per batch and process "
            "(BatchNorm): add photos, or lower download.test_fraction / download.val_fraction"
        )
    per_epoch = n_train // bs
    total = s.epochs * per_epoch if s.max_steps is None else min(s.epochs * per_epoch, s.max_steps)
    peak = peak_lr(s, bs)
    if world.main:
        for note in plan_warnings(s, n_train, bs, total):
            log.warning(note)
    # Adam made at the schedule's rate for the first step the loop takes: step 0's, or on resume the
    # checkpoint's step (whose saved optimizer, loaded over this one by resume(), holds that same rate:
    # the loop sets the next step's rate before each checkpoint). Adam reads its rate only when it
    # steps, so making it at this rate and setting the rate just before the first step are the same.
    opt = make_optimizer(
        net, lr_at(s, step, total, peak), s.weight_decay, capturable=graphs, hint_lr_scale=s.hint_lr_scale
    )
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
    # The simulated user's own generator per rank (its samples' truths are the rank's), seeded apart
    # from the run's other streams so that turning hints on changes no flip and no data order.
    flips, loader_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    hint_gen = None if s.hints == "off" else torch.Generator().manual_seed(HINT_SEED + seed * 65_537 + world.rank)
    return Setup(
        s, plan, out, world, spec, net, weights, opt, graphs, bs, per_epoch, total, peak, dataset,
        shard_paths(prepared, "val"), flips, loader_gen, hint_gen,
    )  # fmt: skip


def resume(t: Setup, state: dict[str, Any] | None) -> Progress:
    """Where the loop starts: step 0, or the checkpoint's weights, optimizer, RNG states and record."""
    if state is None:
        return Progress()
    t.net.load_state_dict(state["model"])
    t.opt.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["torch_rng"][t.world.rank], t.world.device)
    t.flips.set_state(state["flip_rng"])
    if t.hint_gen is not None:
        t.hint_gen.set_state(state["hint_rng"][t.world.rank])
    if t.world.main:
        log.info("%s: resuming from step %d of %d", t.variant, state["step"], t.total)
    return Progress(state["step"], state["history"], state.get("mlflow_run_id"))


def save_checkpoint(t: Setup, progress: Progress) -> None:
    """Every rank's RNG state gathered (a collective: all take part), then rank 0 writes the checkpoint."""
    rng = t.world.gather(checkpoint.rng_state(t.world.device))
    hint_rng = None if t.hint_gen is None else t.world.gather(t.hint_gen.get_state())
    if t.world.main:
        checkpoint.write(
            t.scratch / checkpoint.CHECKPOINT,
            {
                **{"model": t.net.state_dict(), "optimizer": t.opt.state_dict(), "step": progress.step},
                **{"epoch": progress.step // t.per_epoch, "world": t.world.size, "torch_rng": rng},
                **{"flip_rng": t.flips.get_state(), "history": progress.history, "mlflow_run_id": progress.run_id},
                **({} if hint_rng is None else {"hint_rng": hint_rng}),
            },
        )
