"""The prepare stage's settings section (torch-free: see tasks/settings/__init__.py)."""

from __future__ import annotations

from pydantic import Field, field_validator

from model.choices import side_problem
from storage.settings import Section


class Settings(Section):
    """The prepare section: the model's input size (a multiple of 32: five stride-2 stages)."""

    image_size: int = Field(64, description="model input side; a multiple of 32 up to 2048 (model.choices)")
    shard_maxcount: int = Field(1000, ge=1)

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if problem := side_problem(v):
            raise ValueError(f"image_size {problem}")
        return v
