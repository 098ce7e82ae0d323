"""One inference pipeline, shared by ``colorize image``, the MLflow pyfunc model and the evaluate stage.

DDColor's approach: the network runs at its own input size on a downscaled copy; only the predicted ab
is upsampled to the photo's size, and the photo's own full-resolution L is kept, so detail and
sharpness come from the original. Full-resolution work is done in row tiles, so memory stays bounded
for large photos (the only full-size float buffer is the upsampled ab: 8 bytes per pixel).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.choices import DEVICES, PRECISIONS, vividness_problem
from model.lab import AB_SCALE, L_SCALE, lab_to_rgb, rgb8_to_lab

TILE_ROWS = 256
# How a separate process (the REST server, `mlflow models serve`) is told where the registered model's
# pyfunc puts its network and in which arithmetic; within one process they are passed as values
# (model.pyfunc.placing, through model.loading.load_engine).
DEVICE_ENV = "COLORIZE_DEVICE"
PRECISION_ENV = "COLORIZE_PRECISION"


def resolve_device(name: str = "auto", what: str = "--device") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU. ``cuda`` with no GPU visible raises ValueError
    (the CLI turns it into one line, exit 2) instead of failing at the first tensor moved there.
    ``what`` is how the user gave the value (a flag, or an environment variable), for the message."""
    if name not in DEVICES:
        raise ValueError(f"{what} {name}: choose from {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} cuda: no CUDA device is visible to torch; use cpu (or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_of(net: object) -> torch.device:
    """Where an engine runs: a torch network where its weights are; onnxruntime (or anything else) on the CPU."""
    if isinstance(net, torch.nn.Module):
        first = next(net.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    return torch.device("cpu")


class Bf16Net(torch.nn.Module):
    """A colorizer run under bf16 autocast, returning float32 ab: on a GPU's tensor cores about twice
    the matrix rate of float32, at colours a few 8-bit levels from float32's. Only the torch engine has
    it (onnxruntime stays the float32 CPU engine)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.spec = net, net.spec

    def forward(self, x: torch.Tensor, temperature: float | None = None, **hints: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.net(x, temperature, **hints).float()


def placement_from_env() -> tuple[str, str]:
    """The device and precision a serving process was told by ``$COLORIZE_DEVICE`` and
    ``$COLORIZE_PRECISION`` (an empty variable counts as unset: auto and fp32), checked here so that a
    bad value names the variable the user set rather than a flag they never passed."""
    device = os.environ.get(DEVICE_ENV) or "auto"
    precision = os.environ.get(PRECISION_ENV) or "fp32"
    if device not in DEVICES:
        raise ValueError(f"${DEVICE_ENV}={device}: choose from {', '.join(DEVICES)} (or leave it unset)")
    if precision not in PRECISIONS:
        raise ValueError(f"${PRECISION_ENV}={precision}: choose from {', '.join(PRECISIONS)} (or leave it unset)")
    return device, precision


def with_precision(net: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``net`` running in ``precision`` (fp32 or bf16); wrapping twice is wrapping once."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    if precision == "fp32" or isinstance(net, Bf16Net):
        return net
    return Bf16Net(net)


def choose_engine(engine: str, device: torch.device, precision: str, has_onnx: bool) -> str:
    """``torch`` or ``onnx`` for ``--engine`` ``engine``, a network placed on ``device`` in ``precision``
    and whether an ONNX export can run (registered with the version, onnxruntime installed): the one owner
    of ``auto``, for the CLI's loader (model.loading) and the registered model's pyfunc alike. ``auto``
    takes onnxruntime, the float32 CPU engine (1.5-2x faster there), on the CPU in fp32 with the export at
    hand, and PyTorch otherwise (on a GPU, in bf16, or with no export); ``torch`` and ``onnx`` are kept."""
    if engine != "auto":
        return engine
    return "onnx" if has_onnx and device.type == "cpu" and precision == "fp32" else "torch"


def place(net: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """A loaded torch network ready to run: on ``device``, in ``precision`` (:func:`with_precision`)."""
    return with_precision(net.to(device), precision)


def precision_of(net: object) -> str:
    """The arithmetic a torch engine runs in: bf16 for a :class:`Bf16Net`, else fp32."""
    return "bf16" if isinstance(net, Bf16Net) else "fp32"


def engine_line(net: object) -> str:
    """How an engine runs, in the words of the commands' options (for the page and summaries): the
    engine (onnx or torch), the device, the precision, and a classification model's vividness."""
    inner = net.net if isinstance(net, Vivid) else net
    kind = "torch" if isinstance(inner, torch.nn.Module) else "onnx"
    words = [f"engine {kind}", f"device {device_of(inner).type}", precision_of(inner)]
    spec = getattr(net, "spec", None)
    if getattr(spec, "head", "regression") == "classification":
        words.append(f"vividness {getattr(net, 'temperature', None) or spec.temperature:g}")
    return ", ".join(words)


class Vivid(torch.nn.Module):
    """An engine (the torch network, its bf16 wrapper, or onnxruntime) that decodes a classification
    model at a given temperature: a wrapper per call, so concurrent requests with different
    vividness never share a setting."""

    def __init__(self, net: Any, temperature: float) -> None:
        super().__init__()
        self.net, self.spec, self.temperature = net, net.spec, temperature

    def forward(self, x: torch.Tensor, temperature: float | None = None, **hints: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.temperature if temperature is None else temperature, **hints)


class Hinted(torch.nn.Module):
    """A torch engine given one photo's hints (model.hints.Guidance.inputs, at the network's input
    size): the outermost wrapper, so the vividness and bf16 wrappers below pass them on. onnxruntime's
    engine has no hint inputs; the commands run hints on torch."""

    def __init__(self, net: Any, hints: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.net, self.spec, self.hints = net, net.spec, hints

    def forward(self, x: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        return self.net(x, temperature, **{k: v.to(x.device) for k, v in self.hints.items()})


def with_vividness(net: Any, vividness: float | None) -> Any:
    """``net`` decoding at ``vividness`` (the annealed-mean temperature; None: the model's own default).
    ValueError, for the caller to say in one line, outside the range or for a regression model, which
    predicts ab directly and has nothing to decode."""
    if vividness is None:
        return net
    problem = vividness_problem(vividness)
    if problem:
        raise ValueError(f"--vividness {problem}")
    if getattr(net.spec, "head", "regression") != "classification":
        raise ValueError(
            "--vividness: this model predicts ab directly (regression head); only a model trained with "
            "train.head=classification has a vividness to set"
        )
    return Vivid(net, vividness)


def lightness_input(rgb: np.ndarray) -> torch.Tensor:
    """The network's input for a photo at its own size: L / 100, (1, 1, H, W)."""
    lab = rgb8_to_lab(torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None])  # np.array: writable, as torch wants
    return lab[:, :1] / L_SCALE


def net_input(rgb: np.ndarray, size: int) -> torch.Tensor:
    resample = Image.Resampling.BOX if min(rgb.shape[:2]) >= size else Image.Resampling.BICUBIC
    return lightness_input(np.asarray(Image.fromarray(rgb).resize((size, size), resample)))


@torch.inference_mode()
def predict_ab(net: torch.nn.Module, rgbs: list[np.ndarray], size: int) -> torch.Tensor:
    """Normalized ab at the network's size for a batch of photos of any sizes: (B, 2, size, size)."""
    return predict(net, rgbs, size)[1]


@torch.inference_mode()
def predict(net: torch.nn.Module, rgbs: list[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the network's input L/100, (B, 1, size, size); its normalized ab, (B, 2, size, size)), both on
    the CPU: the input too, for callers that work on it further (the video stabilizer computes its flow on
    it). The batch runs wherever the network is (a GPU when it was moved there)."""
    x = torch.cat([net_input(rgb, size) for rgb in rgbs])
    device = device_of(net)
    return x, net(x.to(device, non_blocking=True)).float().cpu()


@torch.inference_mode()
def compose(rgb: np.ndarray, ab_small: torch.Tensor) -> np.ndarray:
    """Photo (H,W,3 uint8) + predicted normalized ab (2,s,s) -> colorized photo (H,W,3 uint8), keeping
    the photo's own L at full resolution."""
    h, w = rgb.shape[:2]
    ab_full = F.interpolate(ab_small[None], size=(h, w), mode="bilinear", align_corners=False)[0] * AB_SCALE
    out = np.empty((h, w, 3), dtype=np.uint8)
    for y in range(0, h, TILE_ROWS):
        tile = torch.from_numpy(np.array(rgb[y : y + TILE_ROWS])).permute(2, 0, 1)  # a copy: input may be read-only
        lightness = rgb8_to_lab(tile)[:1]
        colored = lab_to_rgb(torch.cat((lightness, ab_full[:, y : y + TILE_ROWS]), dim=0))
        out[y : y + TILE_ROWS] = (colored * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return out


def colorize(net: torch.nn.Module, rgb: np.ndarray, size: int) -> np.ndarray:
    """A photo's colour version at full resolution (the input's own colour, if any, is ignored: only L)."""
    return compose(rgb, predict_ab(net, [rgb], size)[0])
