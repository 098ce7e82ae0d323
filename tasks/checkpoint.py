"""A training run's checkpoint: what a killed run resumes from, exactly.

``scratch/checkpoint.pt`` holds the weights, the optimizer, the step, every rank's RNG state (gathered),
the flip generator's state, the loss and validation history and the MLflow run id; it is written
atomically and read back only when whole and written by the same number of processes. Anything else
(truncated, corrupt, foreign) is reported and the variant starts over: never trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from storage.atomic import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"  # under the stage's scratch folder
_KEYS = {"model", "optimizer", "step", "torch_rng", "flip_rng", "history", "world"}


def read(path: Path, variant: str, world: int) -> dict[str, Any] | None:
    """The resumable state, or None: absent, or unreadable (then reported and redone, never trusted)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not state.keys() >= _KEYS:
            raise ValueError("missing fields")
        if state["world"] != world or len(state["torch_rng"]) != world:
            raise ValueError(f"written by {state['world']} processes, not {world}")  # a keyed setting: defensive
        return state
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or foreign: all mean "start over"
        log.warning("%s: checkpoint %s is unreadable (%s); starting this variant over", variant, path, exc)
        return None


def write(path: Path, state: dict[str, Any]) -> None:
    """``state`` (the fields :func:`read` requires, and any others) to ``path``, atomically."""
    missing = _KEYS - state.keys()
    if missing:
        raise ValueError(f"a checkpoint needs {sorted(missing)}")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def step_of(path: Path) -> int | None:
    """The step a checkpoint holds, read without loading its tensors (memory-mapped); None when absent
    or damaged (the rerun reports it and starts over)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001
        return None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG state (and its GPU's), as a checkpoint records it per rank."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
