"""The evaluate stage's settings section (torch-free: see tasks/settings/__init__.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from model.choices import DEFAULT_VIVIDNESS, DEVICES, HINT_CURVE, MAX_POINTS, vividness_problem
from storage.settings import Section


class Settings(Section):
    """The evaluate section: which metrics, how many images in the grid, the scoring batch size, the hint
    curve's points."""

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

    hint_points: list[int] = Field(
        list(HINT_CURVE),
        description="the hint curve's numbers of points from the truth, scored on models trained with hints "
        "(0, the automatic output, always; the truth's global hint too when the model takes one)",
    )
    hint_seed: int = Field(0, ge=0, description="seeds where the hint curve's points fall (the same for every model)")

    @field_validator("hint_points")
    @classmethod
    def _hint_points(cls, v: list[int]) -> list[int]:
        if any(n < 0 or n > MAX_POINTS for n in v):
            raise ValueError(f"each number of points must be between 0 and {MAX_POINTS}")
        return sorted({0, *v})

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        problem = vividness_problem(v)
        if problem:
            raise ValueError(problem)
        return v
