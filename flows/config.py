"""The pipeline's configuration: the stages' own settings sections composed into one, named presets and
``--set section.key=value`` overrides.

Each stage declares its section (``Settings``, in the torch-free module its StageSpec names: reading or
validating a setting loads no network); this module only puts them together under the stage's name, so
a stage's settings have one owner and ``--set train.lr=...`` reaches exactly the train stage. Unknown
keys are errors (``extra="forbid"``): a typo in ``--set`` fails before any work starts instead of being
silently ignored.

A run's config is one value, built once by :func:`build_config` and handed down (to the flow, then each
stage its own section). Where it is stored outside the work dir (the flow run's parameters in Prefect's
database), it is written in its redacted form: JSON serialization masks every secret in it.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any

from pydantic import (
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    create_model,
    model_serializer,
)

from flows import dag
from storage import shard_runner, stage_store
from storage.errors import ConfigError
from storage.redact import MASK, redact_config, redact_text
from storage.settings import Section


class _Config(Section):
    """The whole config's base: its JSON form (what Prefect stores as a flow parameter) is redacted, the
    Python form (what the run uses) is not."""

    @model_serializer(mode="wrap")
    def _redacted_json(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        if not info.mode_is_json():
            return data
        store = data.get("store") or {}
        if store.get("options"):  # client options are a library's: only their names are ever stored
            store["options"] = masked_options(store["options"])
        return redact_config(data)


def masked_options(options: Any) -> dict[str, str] | str:
    """``store.options`` as it may be stored or shown: its names, every value ``***`` (a JSON text is
    read first; anything else is masked whole)."""
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError:
            return MASK
    return {str(name): MASK for name in options} if isinstance(options, dict) else MASK


with warnings.catch_warnings():
    # pydantic notes that the field `register` shadows ABCMeta.register; harmless, and the section name
    # is part of the user-facing --set syntax.
    warnings.simplefilter("ignore", UserWarning)
    # One section per stage of flows/dag.py, under the stage's name, then the flow's own sections.
    PipelineConfig = create_model(
        "PipelineConfig",
        __base__=_Config,
        seed=(int, Field(0, ge=0, lt=2**32, description="seeds the data split, crops and training")),
        **{
            spec.name: (section, Field(default_factory=section))
            for spec, section in ((spec, spec.settings_class()) for spec in dag.SPECS)
        },
        runner=(shard_runner.Settings, Field(default_factory=shard_runner.Settings)),
        store=(stage_store.Settings, Field(default_factory=stage_store.Settings)),
    )


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
            "preview_images": 4,
        },
        "evaluate": {"grid_images": 4, "batch_size": 8},
    },
    # The fusion study on the photo corpus (scripts/corpus/build.sh; --dataset folder --path CORPUS): every
    # variant x three training seeds, sized from measured throughput (~15 img/s at 64 px, batch 16, on 2
    # cores: 6-7 minutes per training; the first run took 66 min, its results are in the README).
    "study": {
        "download": {"folder_crops_per_photo": 8, "folder_photo_side": 256, "highres_size": 128},
        "prepare": {"image_size": 64},
        # Cosine annealing and early stopping on the validation split: the first study, at a constant
        # rate, kept whichever weights the last epoch's noise left (validation MSE moved by up to 41%
        # between epochs). Measured since (README): neither protocol is significantly better on the test
        # photos (max: paired interval of the difference [-0.0020, +0.0004] in RGB MSE).
        "train": {"seeds": [0, 1, 2], "epochs": 3, "schedule": "cosine", "keep": "best"},
    },
    "paper": {
        "prepare": {"image_size": 224},
        "train": {"batch_size": 8, "lr": 0.01, "epochs": 3, "max_steps": None, "grad_clip": None},
    },
    # The paper's images and epochs at a batch that fills a GPU: the demo's rate (stated for 16 images)
    # scaled by sqrt(256 / 16) = 4 for Adam (train.peak_lr), reached by a linear warm-up, then
    # cosine-annealed; bf16, a captured CUDA graph and loader workers on a GPU. Not a CPU preset.
    "gpu": {
        "prepare": {"image_size": 224},
        "train": {
            "batch_size": 256,
            "lr_scaling": "sqrt",
            "lr_batch": 16,
            "warmup_steps": 50,
            "schedule": "cosine",
            "epochs": 3,
            "max_steps": None,
            "bf16": True,
        },
        "evaluate": {"batch_size": 256},
    },
}


def parse_value(raw: str, key: str = "") -> Any:
    """``--set`` values are JSON where they parse (numbers, true, null, lists), else plain strings;
    a bare comma list (``concat,max``) becomes a list. A value that opens a JSON object (``{``) must be
    one: its error says where it stops parsing, not that a dictionary was expected."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        if raw.lstrip().startswith("{"):
            pos = getattr(exc, "pos", None)
            raise ConfigError(f"{key}: not valid JSON ({getattr(exc, 'msg', exc)} at character {pos})") from None
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
    try:
        for item in overrides or []:
            _apply(data, item)
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(redact_text(_one_line(exc))) from None
    except ConfigError as exc:  # every message that quotes a user's setting is redacted
        raise ConfigError(redact_text(str(exc))) from None


def _apply(data: dict[str, Any], item: str) -> None:
    """One ``--set key=value`` into the nested ``data``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"--set {key}: unknown setting (settings are section.name, e.g. train.lr)")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: unknown setting")
    node[parts[-1]] = parse_value(raw, key)
