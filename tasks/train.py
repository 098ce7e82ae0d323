"""Training stage: one fusion variant on the prepared train split, resumable, logged to MLflow.

This module is the stage as the flow sees it (flows/dag.py): its settings section (``Settings``, kept
torch-free in tasks.settings.train), its plans and keys (:func:`plan`, :func:`plans`), and
:func:`run`, which trains in this process or, when the settings ask for several processes, as a
torchrun job (:func:`train_variant`). The work is done below it, one job per module:

- tasks.train_loop: the epoch loop and one process's whole training (build, resume, loop, finish);
- tasks.train_step: the optimizer step (eager, or replayed from a CUDA graph) and the loss record;
- tasks.losses: the losses; tasks.train_schedule: the learning rate at each step;
- tasks.train_state: the built network, optimizer and data, the loop's position, and the checkpoint
  round trip (the file itself is tasks.checkpoint's);
- tasks.train_record: rank 0's MLflow run and the stage folder's files;
- tasks.train_ddp: the torchrun job (launched here, run by each rank; torchrun itself is
  tasks.distributed's).

Adam (constant or cosine-annealed rate), MSE on ab (optionally +L1 or +colourfulness) or, with
``head=classification``, the rebalanced cross-entropy over quantized ab (model.ab_bins), optional bf16
autocast, gradient clipping, channels_last; the last weights are kept, or the epoch end's with the
lowest validation MSE. Every ``checkpoint_every`` steps the model, optimizer, step, data position and
RNG state are written atomically to ``scratch/checkpoint.pt``; a killed run resumes from there and, with
the same seed, ends with the same weights as an uninterrupted run (the data order is a pure function of
seed and epoch, see storage.shards.ShardDataset). A non-finite loss stops training with an error:
nothing is cached, so a diverged model can never be evaluated or registered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from model import pretrained
from storage.code_identity import code_version
from storage.errors import ConfigError
from storage.stage import StageResult, make_plan, run_stage
from tasks import distributed
from tasks.distributed import World
from tasks.losses import loss_fn
from tasks.settings.train import Settings, world_size
from tasks.train_ddp import launch_training
from tasks.train_loop import train_in_process
from tasks.train_step import use_graphs

# The stage's names, and two it re-exports: Settings (flows/dag.py reads a stage module's Settings) and
# loss_fn (tests/test_study.py reads it from here; its home is tasks.losses).
__all__ = ["STAGE", "WHAT", "Settings", "loss_fn", "plan", "plans", "preflight", "run", "task_name", "train_variant"]

log = logging.getLogger(__name__)
STAGE = "train"
WHAT = "training"  # the flow's word for it: "training failed for max"


_UNUSED_WHY = {
    "rebalance": "it rebalances the classification head's loss, and this run trains the regression head",
    "colour_weight": "it weighs the colourfulness term, and this run's loss has none (train.loss=mse+colourfulness)",
}


def preflight(s: Settings) -> str:
    """The settings whose refusal depends only on this machine, checked when the run is configured (the
    flow's preflight, before download starts) and again by :func:`plan`: ``train.accelerator=cuda``,
    ``train.cuda_graphs=on`` or more ``train.devices`` than GPUs where none (or fewer) are visible. The
    accelerator the run will train on."""
    accelerator = distributed.resolve_accelerator(s.accelerator)
    use_graphs(s.cuda_graphs, torch.device(accelerator), world_size(s), s.hints != "off")  # on: refused on a CPU
    if accelerator == "cuda" and s.devices > torch.cuda.device_count():
        raise ConfigError(f"train.devices={s.devices} but {torch.cuda.device_count()} CUDA device(s) are visible")
    return accelerator


def plan(s: Settings, seed: int, variant: str, prepared: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Whether ImageNet weights are on disk changes the result, so which were found is a fact in the key."""
    found = [pretrained.locate(n, allow_download=False) for n in ("resnet50", "densenet121")]
    facts = {
        "seed": seed,
        "variant": variant,
        "imagenet_weights": [f.path.name for f in found if f.available] if s.pretrained else [],
        "accelerator": preflight(s),
    }
    return make_plan(workdir, STAGE, {"prepared": prepared}, s.for_stage(), code_version(__name__), facts)


def task_name(variant: str, seed: int, named: bool) -> str:
    """``train-max``, or ``train-max-seed1`` when the run trains several seeds (or another than its own)."""
    return f"{STAGE}-{variant}-seed{seed}" if named else f"{STAGE}-{variant}"


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan per variant and training seed (the run's seed unless
    ``train.seeds`` says otherwise; the data split keeps the run's seed)."""
    for name in s.unused():
        if getattr(s, name) != Settings.model_fields[name].default:
            log.warning("train.%s=%g is ignored: %s", name, getattr(s, name), _UNUSED_WHY[name])
    seeds = s.seeds or [seed]
    named = len(seeds) > 1 or seeds != [seed]
    return {task_name(v, x, named): plan(s, x, v, inputs["prepare"], workdir) for v in s.variants for x in seeds}


def train_variant(
    out: Path,
    plan: dict[str, Any],
    parent_run_id: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """One variant's training: in this process, or, when the settings ask for several processes, in a
    torchrun job this process launches and waits for (tasks.train_ddp). The plan's section is validated
    here, once for the run, and passed down; each rank of a job validates it once more from the job file,
    being a process of its own. Rank 0's manifest fields are returned."""
    s = Settings.model_validate(plan["config"])
    if world_size(s) > 1:
        return launch_training(out, plan, s, parent_run_id)
    world = World(device=torch.device("cuda" if plan["facts"]["accelerator"] == "cuda" else "cpu"))
    return train_in_process(out, plan, s, world, parent_run_id, on_step)


def run(
    plan: dict[str, Any],
    force: bool = False,
    parent_run_id: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> StageResult:
    """The stage: train the plan's variant unless its folder is already there (storage.stage.run_stage)."""
    return run_stage(plan, lambda out: train_variant(out, plan, parent_run_id, on_step), force=force)
