"""One typed configuration, a section per stage, named presets and ``--set key=value`` overrides.

Each stage's key hashes only its own section (plus the seed), so changing a training setting reruns
training onward and nothing upstream. Unknown keys are errors (``extra="forbid"``): a typo in
``--set`` fails before any work starts instead of being silently ignored.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASETS = ("sample", "folder", "cifar10", "div2k")
STAGES = ("download", "upscale", "prepare", "train", "evaluate", "register")
VARIANTS = ("concat", "average", "max")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DIV2K_TRAIN_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip"
DIV2K_VALID_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip"


class ConfigError(ValueError):
    """A configuration the user gave is invalid; the message is one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DownloadConfig(Section):
    lowres_size: int = Field(32, ge=8, description="side of the low-res (CIFAR-like) crops")
    lowres_crops_per_photo: int = Field(12, ge=0)
    lowres_crop_fraction: tuple[float, float] = (0.15, 0.5)
    highres_size: int = Field(192, ge=32, description="side of the high-res (DIV2K-like) sample crops")
    highres_crops_per_photo: int = Field(16, ge=0)
    test_photos: int = Field(2, ge=1, description="sample: scenes held out for the test split")
    val_photos: int = Field(1, ge=1, description="sample: scenes held out for validation")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="cifar10/div2k/folder: share of train for val")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="folder: share of photos for test")
    lowres_threshold: int = Field(64, ge=1, description="folder: photos with a shorter side are low-res")
    limit: int | None = Field(None, ge=1, description="cifar10/div2k: at most this many images per split")
    max_pixels: int = Field(80_000_000, ge=1)
    cifar10_url: str = CIFAR10_URL
    cifar10_md5: str = CIFAR10_MD5
    div2k_train_url: str = DIV2K_TRAIN_URL
    div2k_valid_url: str = DIV2K_VALID_URL
    retries: int = Field(3, ge=0)
    timeout: float = Field(60.0, gt=0, description="seconds without data before a download is abandoned")
    shard_maxcount: int = Field(1000, ge=1)


class UpscaleConfig(Section):
    weights: str | None = Field(None, description="explicit RealESRGAN_x4plus .pth (else cache/download/ncnn)")
    backend: Literal["auto", "torch", "ncnn"] = Field(
        "auto", description="auto: torch on a GPU, else ncnn (Winograd convolutions) when installed"
    )
    batch_size: int = Field(8, ge=1)
    threads: int | None = Field(None, ge=1)
    bf16: bool = Field(False, description="torch backend only")
    channels_last: bool = Field(True, description="torch backend only")
    shard_maxcount: int = Field(1000, ge=1)


class PrepareConfig(Section):
    image_size: int = Field(64, description="model input side; a multiple of 32")
    shard_maxcount: int = Field(1000, ge=1)

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v < 32 or v % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {v}")
        return v


class TrainConfig(Section):
    variants: list[Literal["concat", "average", "max"]] = Field(default_factory=lambda: list(VARIANTS))
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(6, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (across epochs)")
    loss: Literal["mse", "l1", "mse+l1"] = "mse"
    hflip: bool = Field(True, description="random horizontal flips of training batches (seeded)")
    pretrained: bool = Field(True, description="use ImageNet weights when present or downloadable")
    freeze: Literal["none", "stems", "all"] = "none"
    decoder_width: int = Field(64, ge=8, description="channels of the finest decoder block")
    bf16: bool = False
    channels_last: bool = True
    grad_clip: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(5, ge=1)
    threads: int | None = Field(None, ge=1)
    concurrent: bool = Field(False, description="train variants at the same time (off: they share cores)")

    @field_validator("variants", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one variant is needed")
        return list(dict.fromkeys(v))


class EvaluateConfig(Section):
    lpips: bool = True
    grid_images: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)


class RegisterConfig(Section):
    metric: Literal["rgb_mse", "ab_mse", "psnr", "ssim", "lpips", "colorfulness_gap"] = "rgb_mse"
    tie_breaker: Literal["rgb_mse", "ab_mse", "psnr", "ssim", "lpips", "colorfulness_gap"] = "ssim"
    model_name: str = "colorizer"
    alias: str = "champion"


with warnings.catch_warnings():
    # pydantic notes that the field `register` shadows ABCMeta.register; harmless, and the section name
    # is part of the user-facing --set syntax.
    warnings.simplefilter("ignore", UserWarning)

    class PipelineConfig(Section):
        seed: int = 0
        download: DownloadConfig = Field(default_factory=DownloadConfig)
        upscale: UpscaleConfig = Field(default_factory=UpscaleConfig)
        prepare: PrepareConfig = Field(default_factory=PrepareConfig)
        train: TrainConfig = Field(default_factory=TrainConfig)
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)

        @model_validator(mode="after")
        def _grid_fits(self) -> PipelineConfig:
            if self.download.lowres_crop_fraction[0] > self.download.lowres_crop_fraction[1]:
                raise ValueError("download.lowres_crop_fraction must be (low, high) with low <= high")
            return self


# Presets are overrides on top of the defaults (which are the `demo` preset's values).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "tiny": {
        "download": {"lowres_crops_per_photo": 2, "highres_crops_per_photo": 2, "highres_size": 64, "limit": 40},
        "upscale": {"batch_size": 8},
        "prepare": {"image_size": 32},
        "train": {
            "batch_size": 4,
            "epochs": 1,
            "max_steps": 3,
            "checkpoint_every": 2,
            "log_every": 1,
            "decoder_width": 16,
            "lr": 1e-3,
        },
        "evaluate": {"grid_images": 4, "batch_size": 8},
    },
    "paper": {
        "prepare": {"image_size": 224},
        "train": {"batch_size": 8, "lr": 0.01, "epochs": 3, "max_steps": None, "grad_clip": None},
    },
}


def parse_value(raw: str) -> Any:
    """``--set`` values are JSON where they parse (numbers, true, null, lists), else plain strings;
    a bare comma list (``concat,max``) becomes a list."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.split(",") if "," in raw else raw


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown setting"
    return f"{where}: {msg}"


def build_config(preset: str = "demo", overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults + preset + ``key=value`` overrides, validated; any problem is a one-line ConfigError."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[preset])  # overrides below must never edit the shared preset
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: unknown setting")
        node[parts[-1]] = parse_value(raw)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
