"""The register stage's settings section (torch-free: see tasks/settings/__init__.py). The metrics a
champion can be chosen by are model.metrics' table's (:data:`model.metrics.RANKABLE`), which that module
keeps importable without torch for this."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from model.metrics import RANKABLE
from storage.settings import Section

Metric = Literal[RANKABLE]  # type: ignore[valid-type]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Settings(Section):
    """The register section: how the champion is chosen, and the registry names it is given."""

    metric: Metric = "rgb_mse"
    tie_breaker: Metric = "ssim"
    model_name: str = Field("colorizer", description="registered model name")
    alias: str = Field("champion", description="alias pointed at the chosen version")
    onnx: bool = Field(
        True,
        description="off registers the model for the torch engine only, skipping the export and its parity check",
    )

    @field_validator("model_name", "alias")
    @classmethod
    def _registry_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a usable registry name (letters, digits, '_', '-', '.'; no '/')")
        return v
