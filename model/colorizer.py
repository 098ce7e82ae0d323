"""The ensemble colorizer (Oza et al. 2022): ResNet50 + DenseNet121 read L, fuse at four scales, decode ab.

Shapes for an input of side S (a multiple of 32)::

    L (B,1,S,S) -> grey-normalized -> ResNet50 taps   256@S/4  512@S/8  1024@S/16  2048@S/32
                                   -> DenseNet121 taps 256@S/4  512@S/8  1024@S/16  1024@S/32
    fusion per scale (concat | average | max)          w@S/4    2w@S/8   4w@S/16    8w@S/32
    decoder: from S/32 up, x2 per block, skip from the fusion block of the same scale, to S/2
    regression head:     -> one more block to S/1 -> 1x1 conv -> tanh -> ab/110 (B,2,S,S)
    classification head: -> 1x1 conv -> logits over Q ab bins (B,Q,S/2,S/2) -> annealed mean at T
                         -> ab (B,2,S/2,S/2) -> bilinear x2 -> ab/110 (B,2,S,S)

The classification head (Zhang, Isola & Efros 2016, model.ab_bins) predicts at half the input side: its
Q = 261 values per pixel (logits, and the loss's soft targets) cost a quarter of what they would at S,
and colour is smooth (inference upsamples ab to a photo's size anyway, keeping the photo's own L). Its
bin centres are a buffer of the state dict, so a loaded model decodes with the bins it was trained on.
Both heads return ab/110 at S from ``forward``, so everything downstream (inference, ONNX, evaluation)
takes either; ``forward(..., raw=True)`` gives what the training loss reads (ab, or the logits).

Hints (``spec.hints``, model.hints): local hints (known ab and its mask at S) are pooled to each scale
(the mask by max, the ab by the mask-weighted mean, so one hinted pixel marks its whole cell) and added,
through a zero-initialised 1x1 conv, to the four fusion outputs (S/4 .. S/32) and to the decoder at S/2
(and S for the regression head): the bottleneck's cell spans a whole region, so one point can set a
region's colour, and the finer scales place its edges. The global hint (the reference's ab distribution,
mean chroma, a given flag) enters at the bottleneck through a zero-initialised linear layer. Zero
initialisation makes a new hinted network compute exactly what the same network without hints would, so
training starts from the automatic colorizer and learns to use hints; ``hints="off"`` builds none of it
(the same state dict, graph and outputs as a network from before hints existed).

One-channel stems are the pretrained RGB stems summed over their input channels (timm's
``adapt_input_conv``): for a grey image fed as R=G=B, the summed kernel gives exactly the same response.
The grey input is normalized with the mean/std of ImageNet's channel statistics (0.449, 0.226).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models import densenet121, resnet50

from model import ab_bins
from model import fusion as fusions
from model import hints as hinting
from model.choices import DEFAULT_VIVIDNESS, HEADS, HINT_MODES, SIDE_MULTIPLE
from model.lab import AB_SCALE
from model.pretrained import load_state_dict, locate
from storage.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

MODEL_FILE, SPEC_FILE = "model.pt", "model.json"  # a trained colorizer on disk: state dict + spec
GRAY_MEAN, GRAY_STD = 0.449, 0.226
RESNET_CHANNELS = (256, 512, 1024, 2048)
DENSENET_CHANNELS = (256, 512, 1024, 1024)


@dataclass(frozen=True)
class ColorizerSpec:
    """Everything needed to rebuild the network around a saved state dict."""

    fusion: str = "concat"  # a name in model.fusion.VARIANTS
    decoder_width: int = 64
    image_size: int = 64
    head: str = "regression"  # a name in model.choices.HEADS
    classes: int = 0  # the classification head's number of ab bins (Q)
    temperature: float = DEFAULT_VIVIDNESS  # the classification head's decoding when none is asked for
    hints: str = "off"  # a name in model.choices.HINT_MODES: what the network takes besides L

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}: choose from {', '.join(HEADS)}")
        if self.hints not in HINT_MODES:
            raise ValueError(f"unknown hints {self.hints!r}: choose from {', '.join(HINT_MODES)}")

    def as_dict(self) -> dict[str, object]:
        """The spec as model.json stores it; ``hints`` only when the model takes them, so a model without
        hints is written exactly as before they existed (and an old model.json reads as ``off``)."""
        d = asdict(self)
        if self.hints == "off":
            del d["hints"]
        return d

    @property
    def takes_global(self) -> bool:
        return self.hints == "local+global"


def adapt_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel copy of an RGB conv whose kernel is the sum of the RGB kernels."""
    new = nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class ResNetEncoder(nn.Module):
    def __init__(self, state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        net = resnet50(weights=None)
        if state is not None:
            net.load_state_dict(state)
        net.conv1 = adapt_stem(net.conv1)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], self.stem(x)
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class DenseNetEncoder(nn.Module):
    def __init__(self, state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        net = densenet121(weights=None)
        if state is not None:
            net.load_state_dict(state)
        f = net.features
        f.conv0 = adapt_stem(f.conv0)
        self.stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
        self.blocks = nn.ModuleList([f.denseblock1, f.denseblock2, f.denseblock3, f.denseblock4])
        self.transitions = nn.ModuleList([f.transition1, f.transition2, f.transition3])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            feats.append(x)
            if i < 3:
                x = self.transitions[i](x)
        return feats


def _conv_bn_relu(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class FusionBlock(nn.Module):
    """Merge ResNet and DenseNet features of one scale, as the variant ``mode`` of
    :data:`model.fusion.VARIANTS` says: cat -> 1x1 conv -> BN -> ReLU, or each side projected to
    ``width`` (1x1 conv + BN), merged element-wise, then ReLU. An unknown name fails here, at build."""

    def __init__(self, mode: str, c_res: int, c_dense: int, width: int) -> None:
        super().__init__()
        self.mode, self.variant = mode, fusions.variant(mode)
        if self.variant.project:
            self.proj_res = nn.Sequential(nn.Conv2d(c_res, width, 1, bias=False), nn.BatchNorm2d(width))
            self.proj_dense = nn.Sequential(nn.Conv2d(c_dense, width, 1, bias=False), nn.BatchNorm2d(width))
        else:
            self.merge = _conv_bn_relu(c_res + c_dense, width, k=1)

    def forward(self, r: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if not self.variant.project:
            return self.merge(torch.cat((r, d), dim=1))
        return torch.relu(self.variant.merge(self.proj_res(r), self.proj_dense(d)))


class UpBlock(nn.Module):
    """x2 bilinear upsample, concat the skip (if any), two 3x3 conv-BN-ReLU."""

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(_conv_bn_relu(c_in + c_skip, c_out), _conv_bn_relu(c_out, c_out))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat((x, skip), dim=1)
        return self.conv(x)


class Colorizer(nn.Module):
    def __init__(
        self,
        spec: ColorizerSpec,
        resnet_state: dict | None = None,
        densenet_state: dict | None = None,
        bins: torch.Tensor | None = None,
    ):
        """``bins``: the classification head's ab bin centres, (Q, 2); by default model.ab_bins' (a few
        seconds to compute, once per process), or a placeholder a state dict is about to overwrite."""
        super().__init__()
        self.spec = spec
        w = spec.decoder_width
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.resnet = ResNetEncoder(resnet_state)
        self.densenet = DenseNetEncoder(densenet_state)
        self.fusions = nn.ModuleList(
            [
                FusionBlock(spec.fusion, r, d, c)
                for r, d, c in zip(RESNET_CHANNELS, DENSENET_CHANNELS, widths, strict=True)
            ]
        )
        self.up16 = UpBlock(widths[3], widths[2], widths[2])  # S/32 -> S/16, skip fusion 3
        self.up8 = UpBlock(widths[2], widths[1], widths[1])  # -> S/8, skip fusion 2
        self.up4 = UpBlock(widths[1], widths[0], widths[0])  # -> S/4, skip fusion 1
        self.up2 = UpBlock(widths[0], 0, max(w // 2, 8))  # -> S/2
        if spec.head == "classification":
            centres = ab_bins.bins() if bins is None else bins
            if spec.classes and len(centres) != spec.classes:
                raise ValueError(f"the spec says {spec.classes} ab bins, the bins given are {len(centres)}")
            self.register_buffer("bins", centres.clone().float())
            self.head = nn.Conv2d(max(w // 2, 8), len(centres), 1)
        else:
            self.up1 = UpBlock(max(w // 2, 8), 0, max(w // 2, 8))  # -> S
            self.head = nn.Conv2d(max(w // 2, 8), 2, 1)
        if spec.hints != "off":  # built last: a model without hints draws its initial weights as before
            finest = [max(w // 2, 8)] * (1 if self.classifies else 2)  # S/2 (and S: regression)
            self.hint_local = nn.ModuleList([_zero(nn.Conv2d(3, c, 1)) for c in (*widths, *finest)])
            if spec.takes_global:
                self.hint_global = _zero(nn.Linear(hinting.global_size(), widths[3]))

    @property
    def classifies(self) -> bool:
        return self.spec.head == "classification"

    def forward(
        self,
        l_norm: torch.Tensor,
        temperature: float | torch.Tensor | None = None,
        raw: bool = False,
        hint_ab: torch.Tensor | None = None,
        hint_mask: torch.Tensor | None = None,
        global_hint: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ab/110 (B,2,S,S) from L/100 (B,1,S,S). ``temperature``: the classification head's decoding
        (default the spec's; ignored by regression; model.inference.Vivid fixes another). ``raw``: the
        training loss's input instead, the regression head's ab or the classification head's logits
        (B,Q,S/2,S/2). ``hint_ab``/``hint_mask``/``global_hint``: the user's hints (model.hints), for a
        model trained with them; missing ones mean "not given"."""
        if l_norm.shape[-1] % SIDE_MULTIPLE or l_norm.shape[-2] % SIDE_MULTIPLE:
            raise ValueError(f"input side must be a multiple of {SIDE_MULTIPLE}, got {tuple(l_norm.shape[-2:])}")
        if self.spec.hints == "off":
            if hint_ab is not None or hint_mask is not None or global_hint is not None:
                raise hinting.HintError(hinting.NOT_TRAINED)
            return self._forward(l_norm, temperature, raw)
        local = self._local(l_norm, hint_ab, hint_mask)
        glob = None
        if self.spec.takes_global:
            given = global_hint if global_hint is not None else l_norm.new_zeros(l_norm.shape[0], hinting.global_size())
            glob = self.hint_global(given.to(l_norm.dtype))[:, :, None, None]
        elif global_hint is not None:
            raise hinting.HintError(hinting.NO_GLOBAL)
        return self._forward(l_norm, temperature, raw, local, glob)

    def _local(
        self, l_norm: torch.Tensor, hint_ab: torch.Tensor | None, hint_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B,3,S,S): the hinted ab (0 elsewhere) and the mask."""
        b, _, h, w = l_norm.shape
        ab = hint_ab if hint_ab is not None else l_norm.new_zeros(b, 2, h, w)
        mask = hint_mask if hint_mask is not None else l_norm.new_zeros(b, 1, h, w)
        return torch.cat((ab.to(l_norm.dtype) * mask.to(l_norm.dtype), mask.to(l_norm.dtype)), dim=1)

    def _hint(self, i: int, local: torch.Tensor | None, factor: int) -> torch.Tensor | float:
        """The local hints at 1/``factor`` of the input side, through the ``i``-th projection."""
        if local is None:
            return 0.0
        if factor > 1:
            mask = nn.functional.max_pool2d(local[:, 2:], factor)
            density = nn.functional.avg_pool2d(local[:, 2:], factor)
            ab = nn.functional.avg_pool2d(local[:, :2], factor) / density.clamp_min(1e-6)
            local = torch.cat((ab, mask), dim=1)
        return self.hint_local[i](local)

    def _forward(
        self,
        l_norm: torch.Tensor,
        temperature: float | torch.Tensor | None,
        raw: bool,
        local: torch.Tensor | None = None,
        glob: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = (l_norm - GRAY_MEAN) / GRAY_STD
        f1, f2, f3, f4 = (fuse(r, d) for fuse, r, d in zip(self.fusions, self.resnet(x), self.densenet(x), strict=True))
        if local is not None:
            f1, f2, f3, f4 = (f + self._hint(i, local, 4 << i) for i, f in enumerate((f1, f2, f3, f4)))
        if glob is not None:
            f4 = f4 + glob
        y = self.up16(f4, f3)
        y = self.up8(y, f2)
        y = self.up4(y, f1)
        y = self.up2(y)
        if local is not None:
            y = y + self._hint(4, local, 2)
        if not self.classifies:
            y = self.up1(y)
            if local is not None:
                y = y + self._hint(5, local, 1)
            return torch.tanh(self.head(y))
        logits = self.head(y)
        return logits if raw else self.decode(logits, temperature)

    def decode(self, logits: torch.Tensor, temperature: float | torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B,Q,h,w) -> ab/110 (B,2,2h,2w): the annealed mean over this model's bins
        (model.ab_bins.decode) in float32, then upsampled to the input's side."""
        t = self.spec.temperature if temperature is None else temperature
        with torch.autocast(logits.device.type, enabled=False):  # bf16 would round ab to ~0.5 units
            ab = ab_bins.decode(logits.float(), self.bins.float(), t) / AB_SCALE
            return nn.functional.interpolate(ab, scale_factor=2, mode="bilinear", align_corners=False)

    def encoder_stems(self) -> list[nn.Module]:
        return [self.resnet.stem, self.densenet.stem]

    def freeze(self, what: Literal["none", "stems", "all"]) -> None:
        modules: list[nn.Module] = {"none": [], "stems": self.encoder_stems(), "all": [self.resnet, self.densenet]}[
            what
        ]
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)
        self._frozen = modules

    def train(self, mode: bool = True) -> Colorizer:
        super().train(mode)
        for m in getattr(self, "_frozen", []):
            m.eval()  # frozen parts keep their BN statistics
        return self


def _zero(layer: nn.Conv2d | nn.Linear) -> nn.Module:
    """``layer`` with its weights and bias at 0: it adds nothing until training teaches it to."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def load_trained(spec_path: Path | str, weights_path: Path | str) -> Colorizer:
    """A trained colorizer in eval mode from its spec JSON and state dict (``weights_only`` load): the one
    loader for stage folders and for the registered MLflow model's artifacts."""
    spec = ColorizerSpec(**json.loads(Path(spec_path).read_text()))
    net = Colorizer(spec, bins=torch.zeros(spec.classes, 2))  # the bins are the state dict's
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return net.eval()


def save_trained(net: Colorizer, folder: Path) -> None:
    """The inverse of :func:`load_folder`: state dict (contiguous, so any layout loads) and spec, atomically."""
    with atomic_path(folder / MODEL_FILE) as tmp:
        torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
    write_json(folder / SPEC_FILE, net.spec.as_dict())


def is_trained_folder(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / SPEC_FILE).is_file()


def load_folder(folder: Path | str) -> Colorizer:
    """A trained stage folder (or any folder holding the two files) -> the network in eval mode."""
    return load_trained(Path(folder) / SPEC_FILE, Path(folder) / MODEL_FILE)


@dataclass
class PretrainedReport:
    used: bool
    detail: str


def build(
    spec: ColorizerSpec, pretrained: bool = True, allow_download: bool = True
) -> tuple[Colorizer, PretrainedReport]:
    """The colorizer with ImageNet encoders when their weights can be had, else from scratch (reported)."""
    if not pretrained:
        return Colorizer(spec), PretrainedReport(False, "disabled by config (train.pretrained=false)")
    found = [locate(name, allow_download) for name in ("resnet50", "densenet121")]
    missing = [f for f in found if not f.available]
    if missing:
        detail = "; ".join(f"{f.name}: {f.reason}" for f in missing)
        log.warning("TRAINING FROM SCRATCH: ImageNet weights unavailable (%s)", detail)
        return Colorizer(spec), PretrainedReport(False, f"from scratch: {detail}")
    states = [load_state_dict(f) for f in found]
    detail = ", ".join(f"{f.name}={f.path.name}" for f in found)
    return Colorizer(spec, *states), PretrainedReport(True, f"ImageNet: {detail}")
