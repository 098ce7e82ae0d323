"""The pipeline's stages, in order, declared once: each stage's name and the module that implements it
(``STAGE``, ``Settings``, ``plan()``, ``run()``). The configuration's sections (flows.config), the CLI's
stage choices and the contract tests read this list; a test holds pyproject.toml's import-linter
independence contract to it. The flow's wiring (which manifests each plan takes) is flows.pipeline's.

Light on purpose: nothing here imports a stage (``colorize --help`` lists the names without torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str


SPECS: tuple[StageSpec, ...] = (
    StageSpec("download", "tasks.download"),
    StageSpec("upscale", "tasks.upscale"),
    StageSpec("prepare", "tasks.prepare"),
    StageSpec("train", "tasks.train"),
    StageSpec("evaluate", "tasks.evaluate"),
    StageSpec("register", "tasks.register"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in SPECS)


def stage_modules() -> tuple[ModuleType, ...]:
    """The stages' modules, imported (torch and all), in pipeline order."""
    return tuple(importlib.import_module(s.module) for s in SPECS)
