"""One optimizer step of the train stage (forward, loss, backward, clip, Adam), eager or replayed from a
CUDA graph, and the loss record read without a host sync at every step.

Why graphs: the colorizer's step is about 2,500 small kernels. On a GPU each pays the host's launch cost,
so an eager step takes the same 80-90 ms at batch 8 as at batch 64 (launch-bound). A CUDA graph
records the whole step once and replays it with one launch (PyTorch's "whole network capture": static
input buffers, a capturable fused Adam whose learning rate is a device tensor, BatchNorm's running
statistics updated in place). A graph needs static shapes: the loader drops the last partial batch, so
every step of a run has the same shape. It needs one process too (DDP's all-reduce hooks are not
captured here), so under DDP the step stays eager.

Why no sync: ``loss.item()`` at every step makes the host wait for the GPU, which then idles while the
host prepares the next step. The losses stay on the device in :class:`LossLog` and are read in one
transfer at the loop's boundaries (logging, checkpoint, epoch end); a non-finite loss found there stops
the run with :class:`DivergedError` before anything is written, so no checkpoint or stage folder ever
holds diverged weights.

Horizontal flips are drawn on the host (from the run's seeded generator, saved in checkpoints) and
applied on the device with ``torch.where``: the same values as flipping on the host, but no host copy of
the batch. Samples arrive as float16 (the prepared shards' own precision) and become float32 on the
device: half the bytes through pinned memory, the same numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from storage.errors import ConfigError
from tasks.distributed import World
from tasks.losses import Criterion
from tasks.settings.train import GraphSetting

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps on a side stream before capture (PyTorch's recipe: lets cuDNN pick kernels)


class DivergedError(ConfigError):
    """The loss became NaN or infinite: the settings (learning rate, loss) cannot train this model."""


def use_graphs(setting: GraphSetting, device: torch.device, world_size: int, hinted: bool = False) -> bool:
    """Graph or eager: ``auto`` captures on CUDA with one process; ``on`` insists (a mistake on a CPU or
    under DDP, said in one line); ``off`` never captures. A hinted model's step takes simulated hint
    maps whose patches differ per batch, which a captured graph's static inputs do not hold: eager."""
    if setting == "off":
        return False
    if hinted:
        if setting == "on":
            raise ConfigError(
                "train.cuda_graphs=on captures a step without hint inputs; with train.hints use auto or off"
            )
        return False
    possible = device.type == "cuda" and world_size == 1
    if setting == "on" and not possible:
        where = "a CPU" if device.type != "cuda" else f"{world_size} processes (DDP)"
        raise ConfigError(f"train.cuda_graphs=on needs one CUDA process, not {where}; use auto or off")
    return possible


@dataclass(frozen=True)
class StepConfig:
    """What one step does besides the network and the optimizer (from the train section)."""

    bf16: bool = False
    channels_last: bool = True
    grad_clip: float | None = 1.0


HINT_LAYERS = ("hint_local.", "hint_global.")  # model.colorizer's hint projections (train.hint_lr_scale)


def make_optimizer(
    net: torch.nn.Module, lr: float, weight_decay: float = 0.0, capturable: bool = False, hint_lr_scale: float = 1.0
) -> torch.optim.Adam:
    """Adam over the trainable parameters with the fused kernel: one pass per parameter tensor instead of
    a dozen elementwise kernels (~3% of a CPU step here; same update rule, same state dict layout). For a
    CUDA graph it is capturable (:class:`GraphedStep` then makes its rate a device tensor). A hinted
    network's hint layers form a second group at ``hint_lr_scale`` times the rate (its ``lr_scale``,
    which :func:`set_lr` keeps); without hints, or at scale 1, there is one group, as before."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    hinted = [p for n, p in named if n.startswith(HINT_LAYERS)]
    if not hinted or hint_lr_scale == 1.0:
        params: Any = [p for _, p in named]
    else:
        rest = [p for n, p in named if not n.startswith(HINT_LAYERS)]
        params = [{"params": rest}, {"params": hinted, "lr": lr * hint_lr_scale, "lr_scale": hint_lr_scale}]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True, capturable=capturable)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's next rate (times each group's ``lr_scale``): in place when it is a tensor (a
    captured graph reads that memory)."""
    for group in opt.param_groups:
        rate = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def _flipped(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    return x if flip is None else torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class EagerStep:
    """The step as plain PyTorch: on a CPU, under DDP, or when graphs are off."""

    def __init__(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, criterion: Criterion, cfg: StepConfig
    ) -> None:
        self.model, self.opt, self.criterion, self.cfg = model, opt, criterion, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.cache_casts = True  # autocast's weight-cast cache; a captured graph must not use it

    def body(
        self,
        l_norm: torch.Tensor,
        ab: torch.Tensor,
        flip: torch.Tensor | None,
        hints: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward, loss, backward, clip, update on device tensors; returns the loss (not read). ``hints``:
        a hinted model's simulated inputs (model.hints.simulate), drawn from the unflipped truth and
        flipped with it (the global hint, a histogram, is the same either way)."""
        l_norm, ab = _flipped(l_norm.float(), flip), _flipped(ab.float(), flip)
        given = {k: v if k == "global_hint" else _flipped(v, flip) for k, v in (hints or {}).items()}
        if self.cfg.channels_last:
            l_norm = l_norm.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.bf16, cache_enabled=self.cache_casts):
            pred = self.model(l_norm, raw=True, **given)  # ab, or the classification head's logits
        loss = self.criterion(pred.float(), ab, l_norm)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        return loss.detach()

    def to_device(self, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Batch tensors onto the step's device (non-blocking: pinned memory on CUDA)."""
        return [None if x is None else x.to(self.device, non_blocking=True) for x in xs]

    def __call__(
        self,
        l_norm: torch.Tensor,
        ab: torch.Tensor,
        flip: torch.Tensor | None,
        hints: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        on_device = dict(zip(hints or {}, self.to_device(*(hints or {}).values()), strict=True))
        return self.body(*self.to_device(l_norm, ab, flip), on_device or None)


class GraphedStep(EagerStep):
    """The step captured once as a CUDA graph and replayed. The first :data:`WARMUP_STEPS` calls are real
    eager steps on a side stream (as PyTorch's capture recipe asks); the next call copies its batch into
    static buffers, captures, and replays (capture itself computes nothing); every later call copies and
    replays. Same arithmetic as :class:`EagerStep`, so the same run up to the GPU's kernel choices."""

    def __init__(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, criterion: Criterion, cfg: StepConfig
    ) -> None:
        super().__init__(model, opt, criterion, cfg)
        for group in opt.param_groups:  # a device tensor the schedule fills in place (set_lr), read by the graph
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=self.device)
        self.cache_casts = False
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[torch.Tensor | None] = []
        self.loss: torch.Tensor | None = None
        self.side = torch.cuda.Stream(self.device)

    def __call__(
        self,
        l_norm: torch.Tensor,
        ab: torch.Tensor,
        flip: torch.Tensor | None,
        hints: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        assert hints is None, "a hinted model's step is eager (use_graphs)"
        self.calls += 1
        if self.calls <= WARMUP_STEPS:
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                loss = super().__call__(l_norm, ab, flip)
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            return loss
        if self.graph is None:
            self._capture(l_norm, ab, flip)
        else:
            for buffer, x in zip(self.static, (l_norm, ab, flip), strict=True):
                if buffer is not None:
                    buffer.copy_(x, non_blocking=True)
        assert self.graph is not None and self.loss is not None
        self.graph.replay()
        return self.loss.clone()

    def _capture(self, l_norm: torch.Tensor, ab: torch.Tensor, flip: torch.Tensor | None) -> None:
        self.static = self.to_device(l_norm, ab, flip)
        torch.cuda.synchronize(self.device)
        self.opt.zero_grad(set_to_none=True)  # backward allocates the gradients from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.body(*self.static)
        log.info("training step captured as a CUDA graph (batch %s)", tuple(l_norm.shape))


def make_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, criterion: Criterion, cfg: StepConfig, graphs: bool
) -> EagerStep:
    return (GraphedStep if graphs else EagerStep)(model, opt, criterion, cfg)


@dataclass
class LossLog:
    """Training losses kept on the device until a boundary of the loop reads them all at once."""

    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def read(self, world: World, lr: float) -> list[tuple[int, float]]:
        """[(step, loss)] since the last read, each the mean over ranks (one all-reduce, one transfer);
        :class:`DivergedError` at the first non-finite one. Every rank reads at the same steps, so a NaN
        on one rank stops all of them together."""
        if not self.pending:
            return []
        steps = [s for s, _ in self.pending]
        values = torch.stack([v.float() for _, v in self.pending]).double()
        self.pending.clear()
        if world.size > 1:
            values = world.sum(values) / world.size
        out = list(zip(steps, values.tolist(), strict=True))
        for step, value in out:
            if not math.isfinite(value):
                raise DivergedError(
                    f"training diverged at step {step}: the loss is {value} "
                    f"(train.lr={lr:g}); lower train.lr or set train.grad_clip"
                )
        return out
