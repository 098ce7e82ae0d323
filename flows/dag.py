"""The pipeline's stages, in order, declared once: each stage's name and the module that implements it
(``STAGE``, ``Settings``, ``plans()``, ``run()``), the torch-free module that declares its settings, and
what it takes from which earlier stages. The flow's wiring (flows.pipeline), the configuration's sections
(flows.config), the CLI's stage choices and the contract tests read this list; a test holds
pyproject.toml's import-linter independence contract to it.

Light on purpose: nothing here imports a stage (``colorize --help`` lists the names without torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class StageSpec:
    """``name``: the stage (its settings section, its tasks' names); ``module``: its code, which gives
    ``plans(settings, seed, inputs, workdir) -> {task name: plan}`` (none: skipped; several: one task
    each); ``inputs``: the stages whose results its plans take (a manifest, a list of them for a stage of
    several tasks, or None for a skipped one); ``uses``: what the flow gives it: ``network`` (retries on a
    network failure), ``shards`` (where shard jobs run and meet), ``parent_run`` (the pipeline's MLflow
    run, passed to its ``run``)."""

    name: str
    module: str
    inputs: tuple[str, ...] = ()
    uses: frozenset[str] = frozenset()
    settings: str = ""  # the torch-free module whose ``Settings`` is the section (default: ``module``)

    def settings_class(self) -> type:
        """The stage's settings section, imported without importing the stage (nor torch)."""
        return importlib.import_module(self.settings or self.module).Settings

    def load(self) -> ModuleType:
        """The stage's module, imported (torch and all)."""
        return importlib.import_module(self.module)


SPECS: tuple[StageSpec, ...] = (
    StageSpec("download", "tasks.download", uses=frozenset({"network"})),
    StageSpec("upscale", "tasks.upscale", ("download",), frozenset({"shards"}), "tasks.settings.upscale"),
    StageSpec("prepare", "tasks.prepare", ("download", "upscale"), frozenset({"shards"}), "tasks.settings.prepare"),
    StageSpec("train", "tasks.train", ("prepare",), frozenset({"parent_run"}), "tasks.settings.train"),
    StageSpec("evaluate", "tasks.evaluate", ("prepare", "train"), frozenset({"parent_run"}), "tasks.settings.evaluate"),
    StageSpec("register", "tasks.register", ("evaluate", "train"), settings="tasks.settings.register"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in SPECS)


def stage_modules() -> tuple[ModuleType, ...]:
    """The stages' modules, imported (torch and all), in pipeline order."""
    return tuple(s.load() for s in SPECS)


def spec(name: str) -> StageSpec:
    """The stage called ``name``."""
    return SPECS[STAGES.index(name)]
