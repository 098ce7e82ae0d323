"""torchvision ImageNet weights: from ``$TORCH_HOME/hub/checkpoints`` or downloaded, loaded with
``weights_only=True``, or reported missing with what to do about it.

torchvision's own ``get_state_dict`` would also do this, but it downloads without resume and loads with
whatever ``torch.load`` defaults to; here the file is verified against the sha256 prefix in its name (as
torch.hub does), downloads go through :mod:`storage.fetch`, and a missing file is a recorded fact, not
an exception in the middle of model construction.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.fetch import DownloadError, download, file_digest

log = logging.getLogger(__name__)

URLS = {
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",  # IMAGENET1K_V2
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",  # IMAGENET1K_V1
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",  # LPIPS backbone
}
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass
class Pretrained:
    name: str
    path: Path
    available: bool
    reason: str = ""


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate(name: str, allow_download: bool = True, timeout: float = 30.0) -> Pretrained:
    """Find (or fetch) torchvision's weight file for ``name``; never raises for a missing file."""
    url = URLS[name]
    path = checkpoint_dir() / url.rsplit("/", 1)[1]
    prefix = path.stem.rsplit("-", 1)[-1]
    if not path.is_file() and allow_download:
        try:
            download(url, path, retries=1, timeout=timeout)
        except DownloadError as exc:
            return Pretrained(name, path, False, f"not in {path.parent} and not downloadable ({exc})")
    if not path.is_file():
        return Pretrained(name, path, False, f"not in {path.parent}; download {url} there")
    if not file_digest(path, "sha256").startswith(prefix):
        return Pretrained(name, path, False, f"{path} does not match the sha256 prefix {prefix} in its name")
    return Pretrained(name, path, True)


def load_state_dict(found: Pretrained) -> dict[str, torch.Tensor]:
    state = torch.load(found.path, map_location="cpu", weights_only=True)
    if found.name == "densenet121":  # old checkpoints name layers 'norm.1'; current modules say 'norm1'
        state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    return state
