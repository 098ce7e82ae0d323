"""The evaluate stage's settings section (torch-free: see tasks/settings/__init__.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from model.choices import DEFAULT_VIVIDNESS, DEVICES, vividness_problem
from storage.settings import Section


class Settings(Section):
    """The evaluate section: which metrics, how many images in the grid, the scoring batch size."""

    lpips: bool = True
    grid_images: int = Field(8, ge=1, le=256)
    batch_size: int = Field(16, ge=1, le=4096)
    device: Literal[DEVICES] = Field(  # type: ignore[valid-type]
        "auto", description="where the networks predict: auto (a GPU when visible), cpu or cuda"
    )
    temperature: float = Field(
        DEFAULT_VIVIDNESS,
        description="the annealed-mean temperature classification-head models are decoded at (1: the mean, "
        "lower: more vivid); the registered model's default vividness",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        problem = vividness_problem(v)
        if problem:
            raise ValueError(problem)
        return v
