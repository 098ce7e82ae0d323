"""The upscale stage's settings section (torch-free: see tasks/settings/__init__.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from model.choices import UPSCALE_BACKENDS
from storage.settings import Section


class Settings(Section):
    """The upscale section: which method (Real-ESRGAN, or bicubic to measure it against), which weights,
    which engine, how big a batch."""

    method: Literal["realesrgan", "bicubic"] = Field(
        "realesrgan", description="x4 upscaling of low-res images: Real-ESRGAN, or bicubic (the baseline)"
    )
    weights: str | None = Field(None, description="explicit RealESRGAN_x4plus .pth (else cache/download/ncnn)")
    backend: Literal[UPSCALE_BACKENDS] = Field(  # type: ignore[valid-type]
        "auto", description="auto: torch on a GPU, else ncnn (Winograd convolutions) when installed"
    )
    batch_size: int = Field(8, ge=1, le=4096)
    threads: int | None = Field(None, ge=1, le=1024)
    bf16: bool = Field(False, description="torch backend only")
    channels_last: bool = Field(True, description="torch backend only")
    shard_maxcount: int = Field(1000, ge=1)
