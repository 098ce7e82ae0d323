"""The train stage as a torchrun job: what the stage process does when ``train.devices`` x
``train.nodes`` asks for several processes (:func:`launch_training`: fetch the ImageNet weights once,
launch, wait, re-raise a rank's failure in one line), and what each rank runs (:func:`worker_main`:
join the process group, train, report). torchrun itself, the job file and the ranks' error reports
are tasks.distributed's, which knows no stage.

A module of its own so that the import graph has no circle: the stage (tasks.train) imports this
module to launch the job, and the ranks run the loop of tasks.train_loop directly, so nothing here
imports the stage back (the ranks' entry point is tasks.train_worker, started by module name).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from model import pretrained
from storage.atomic import write_json
from storage.errors import UserFacingError
from storage.stage import SCRATCH
from tasks import checkpoint
from tasks.distributed import Launch, RankFailed, join, launch, leave, report_errors
from tasks.settings.train import Settings
from tasks.train_loop import train_in_process
from tasks.train_step import DivergedError

JOB_DIR = "ddp"  # under the stage's scratch folder: the job file, rank 0's result and the ranks' error reports
RESULT = "result.json"


def launch_training(out: Path, plan: dict[str, Any], s: Settings, parent_run_id: str | None) -> dict[str, Any]:
    """Run one train stage (a fusion variant) as a torchrun job of ``train.devices`` x ``train.nodes``
    ranks (:func:`worker_main` each) and return rank 0's result. ``s`` is the plan's section, already
    validated by the stage. A rank's failure is re-raised in one line, saying from which step a rerun
    resumes."""
    if s.pretrained:  # fetch once here, not once per rank
        for name in ("resnet50", "densenet121"):
            pretrained.locate(name, allow_download=True)
    job = out / SCRATCH / JOB_DIR / "job.json"
    (job.parent / RESULT).unlink(missing_ok=True)
    spec = Launch(nproc_per_node=s.devices, nnodes=s.nodes, rdzv_id=plan["key"][:32])
    info = {"plan": plan, "out": str(out), "parent_run_id": parent_run_id}
    try:
        launch(spec, job, info, f"train {plan['facts']['variant']}", {"DivergedError": DivergedError})
    except RankFailed as exc:
        step = checkpoint.step_of(out / SCRATCH / checkpoint.CHECKPOINT)
        then = f"a rerun resumes from step {step}" if step else "no checkpoint yet: a rerun starts over"
        raise RankFailed(f"{exc} ({then})") from None
    return json.loads((job.parent / RESULT).read_text())


def worker_main(argv: list[str]) -> int:
    """A rank's entry point (``python -m tasks.train_worker JOB``, started by torchrun)."""
    job = Path(argv[0])
    info = json.loads(job.read_text())
    # A rank is a process of its own: the validated section cannot be handed to it, only the plan's JSON
    # in the job file, so it is validated here, once per rank, and passed down from here.
    s = Settings.model_validate(info["plan"]["config"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    world = join(info["plan"]["facts"]["accelerator"])
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        with report_errors(job, world.rank):
            if s.threads is None and world.device.type == "cpu":
                # torchrun sets one thread per process; share this node's cores between its ranks instead
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.devices))
            out, parent_run_id = Path(info["out"]), info["parent_run_id"]
            result = train_in_process(out, info["plan"], s, world, parent_run_id, job_info=info)
            if result is not None:
                write_json(job.parent / RESULT, result)
    except Exception as exc:  # noqa: BLE001 - recorded with its traceback for the stage, which reports it
        return exc.exit_code if isinstance(exc, UserFacingError) else 1  # in one line; nothing printed here
    finally:
        leave()
    return 0
