"""The train stage's settings section (torch-free: see tasks/settings/__init__.py), and the two names of
the training code that its fields use: the CUDA-graph choice (:data:`GraphSetting`, taken by
tasks.train_step.use_graphs) and the variable naming a multi-node job's rendezvous (:data:`RDZV_ENV`,
read by tasks.distributed.launch). They live here rather than beside that code because it imports torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from model import fusion
from model.choices import HEADS, HINT_MODES
from storage.settings import Section, flow_setting

GraphSetting = Literal["auto", "on", "off"]  # train.cuda_graphs: capture the step as a CUDA graph or not
RDZV_ENV = "COLORIZE_RDZV_ENDPOINT"  # host:port of the c10d rendezvous when train.nodes > 1


class Settings(Section):
    """The train section. ``variants`` and ``concurrent`` are the flow's: which train stages to run and
    whether at once. Everything else is given to the stage and is in its key."""

    variants: list[str] = flow_setting(
        default_factory=lambda: list(fusion.names()), description="fusion variants to train (model.fusion.VARIANTS)"
    )
    concurrent: bool = flow_setting(False, description="train variants at the same time (off: they share cores)")
    seeds: list[int] | None = flow_setting(
        None, description="training seeds: one train stage per variant and seed (default: the run's seed)"
    )
    batch_size: int = Field(16, ge=2, le=65536, description="at least 2: BatchNorm needs two samples")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate over the run: constant, or cosine-annealed from lr to 0 at the last step"
    )
    keep: Literal["last", "best"] = Field(
        "last", description="weights to keep: the last step's, or the epoch end with the lowest validation MSE"
    )
    epochs: int = Field(6, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (across epochs)")
    head: Literal[HEADS] = Field(  # type: ignore[valid-type]
        "regression",
        description="regression: ab directly (train.loss); classification: a distribution over quantized ab "
        "(rebalanced cross-entropy), decoded at evaluate.temperature",
    )
    hints: Literal[HINT_MODES] = Field(  # type: ignore[valid-type]
        "off",
        description="what the model learns to take besides L: off; local (clicked colour points, simulated "
        "in training as Zhang et al. 2017 do); local+global (also a reference photo's palette)",
    )
    hint_lr_scale: float = Field(
        10.0,
        gt=0,
        le=1000,
        description="the hint layers' learning rate as a multiple of train.lr (they start at zero and see "
        "sparse inputs; train.hints other than off; docs/hints.md measured 1, 10 and 100)",
    )
    rebalance: float = Field(
        0.5, ge=0, le=1, description="classification head: the ab prior's mix with the uniform (1: no rebalancing)"
    )
    loss: Literal["mse", "l1", "mse+l1", "mse+colourfulness"] = Field(
        "mse", description="the regression head's loss on ab"
    )
    colour_weight: float = Field(
        0.5, ge=0, le=100, description="weight of the colourfulness term (loss=mse+colourfulness)"
    )
    hflip: bool = Field(True, description="random horizontal flips of training batches (seeded)")
    pretrained: bool = Field(True, description="use ImageNet weights when present or downloadable")
    freeze: Literal["none", "stems", "all"] = "none"
    decoder_width: int = Field(64, ge=8, le=4096, description="channels of the finest decoder block")
    lr_scaling: Literal["none", "sqrt", "linear"] = Field(
        "none", description="scale train.lr by batch_size / lr_batch: sqrt (Adam's rule), linear (SGD's) or none"
    )
    lr_batch: int = Field(16, ge=1, le=65536, description="the batch size train.lr is stated for (lr_scaling)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the rate over the first steps")
    bf16: bool = False
    channels_last: bool = True
    grad_clip: float | None = Field(1.0, gt=0)
    cuda_graphs: GraphSetting = Field(
        "auto", description="capture the step as a CUDA graph: auto (with one CUDA process), on, off"
    )
    loader_workers: int | None = Field(
        None, ge=0, le=64, description="DataLoader worker processes (default: none on a CPU, up to 8 with CUDA)"
    )
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(5, ge=1)
    preview_images: int = Field(8, ge=1, le=256, description="images in samples.png")
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads per training process")
    accelerator: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible")
    devices: int = Field(1, ge=1, le=1024, description="training processes per node (torchrun, DDP); GPUs with CUDA")
    nodes: int = Field(1, ge=1, le=4096, description=f"machines in the job; above 1 set {RDZV_ENV}")

    @field_validator("variants", "seeds", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool):
            return [v]
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("at least one seed is needed")
        if any(not 0 <= x < 2**32 for x in v):
            raise ValueError("seeds must be in [0, 2**32)")
        return list(dict.fromkeys(v))

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one variant is needed")
        for name in v:
            fusion.variant(name)  # an unknown name: one line naming the choices
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _head_loss(self) -> Settings:
        if self.head == "classification" and self.loss != "mse":
            raise ValueError(
                f"train.loss={self.loss} is the regression head's; the classification head's loss is the "
                "rebalanced cross-entropy (tune it with train.rebalance)"
            )
        return self

    @model_validator(mode="after")
    def _split_batch(self) -> Settings:
        """The global batch is kept whatever the process count: each rank takes batch / processes."""
        world = self.devices * self.nodes
        if self.batch_size % world:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly over {world} processes (devices x nodes); "
                f"choose a multiple of {world}"
            )
        if self.batch_size // world < 2:
            raise ValueError(
                f"batch_size {self.batch_size} over {world} processes leaves under 2 per process (BatchNorm)"
            )
        return self

    def unused(self) -> list[str]:
        """The fields that cannot change this run's result: the classification head's ``rebalance`` for a
        regression head, the hint layers' ``hint_lr_scale`` without hints, the colourfulness term's
        ``colour_weight`` for a loss without that term."""
        names = [] if self.head == "classification" else ["rebalance"]
        if self.hints == "off":
            names.append("hint_lr_scale")
        if self.head != "regression" or self.loss != "mse+colourfulness":
            names.append("colour_weight")
        return names

    def for_stage(self) -> dict[str, Any]:
        """What the stage receives and its key covers, less :meth:`unused` (a regression run with
        ``rebalance`` set would otherwise retrain to bitwise the same weights under a new key, and
        evaluate and register would follow)."""
        given = super().for_stage()
        for name in self.unused():
            given.pop(name)
        return given


def world_size(s: Settings) -> int:
    """The job's training processes: ``train.devices`` on each of ``train.nodes`` machines."""
    return s.devices * s.nodes
