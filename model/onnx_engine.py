"""The colorizer as ONNX, and an onnxruntime engine that stands in for the PyTorch network.

Exported with PyTorch's TorchScript-based exporter (opset 17) with dynamic batch, height and width: the
dynamo exporter needs the sides declared as multiples of 32 and fails with fully dynamic ones.

ONNX is an optional speed-up, so its check is about what a user would see, not about float noise.
Every export is run on the same photos as eager PyTorch before it is kept, and compared twice:

- **the colorized photos**, uint8 RGB, at most :data:`RGB_TOLERANCE` = 1 level (1/255) apart at any
  pixel: the natural bar, since that is the resolution of the files ``colorize image`` writes. A
  difference of ~1e-5 in ab can already move a pixel that sits on a rounding boundary by one level, so
  1 level (not 0) is the smallest bar that float noise cannot cross;
- **the predicted ab** (normalized, ``ab / 110``), at most :data:`AB_TOLERANCE` = 2e-3 apart, i.e.
  0.22 Lab units, a quarter of the smallest colour difference people notice (about 1 Lab unit). It
  catches an export that is off everywhere by a little, which the rounding of the first check could
  hide. Measured with ``scripts/onnx_parity.py`` on an AVX-512 (bf16) CPU, over 36 comparisons (3
  fusions x 3 seeds of random-weight networks and the demo's three trained variants, at the 3 check
  shapes): at most 5.2e-7 in ab on these photos and 1 level in RGB (3 of 36 had 1). The old check fed
  uniform noise as L, which drives the network far from photos: 7.1e-5 here, 1.07e-4 on another CPU,
  where its 1e-4 bar failed registration. 2e-3 is 28x that noise figure and ~4000x the photo figure
  (docs/onnx_parity.md), so only a real fault crosses it.

A failed check (:class:`ExportMismatch`, with the measured differences in ``report``) or an exporter
that raises never fails registration: the register stage keeps the torch engine and says why.

:class:`OnnxColorizer` has the network's call signature (``l_norm (B,1,H,W) -> ab (B,2,H,W)``) and its
``spec``, so model.inference runs it unchanged: one inference pipeline, two engines.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model import hints as hinting
from model.colorizer import Colorizer, ColorizerSpec
from model.inference import compose, lightness_input
from storage.atomic import atomic_path

log = logging.getLogger(__name__)
OPSET = 17
RGB_TOLERANCE = 1  # uint8 levels in the colorized photo
AB_TOLERANCE = 2e-3  # normalized ab (x110 = Lab units)
ONNX_FILE = "model.onnx"
TEMPERATURE = "temperature"  # a classification model's second graph input


class ExportMismatch(RuntimeError):
    """The exported graph does not reproduce the eager network within what a user could see."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def check_shapes(size: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) the export is checked at: the training size, a non-square one, a larger one."""
    return [(2, size, size), (1, size, size + 32), (1, 2 * size, 2 * size)]


def check_photos(b: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """``b`` photo-like uint8 RGB images (smooth random colour fields, as photos are smooth at most
    pixels), the same on every machine for a seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (b, max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return [np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) for c in coarse]


def compare(
    engine: Any,
    net: torch.nn.Module,
    photos: list[np.ndarray],
    temperature: float | None = None,
    hints: dict[str, torch.Tensor] | None = None,
) -> tuple[float, int]:
    """(max |ab| difference, normalized; max RGB difference in uint8 levels) between two engines on the
    same photos, each run at the photo's own size (a classification model decoded at ``temperature``;
    a hinted one given ``hints``)."""
    x = torch.cat([lightness_input(p) for p in photos])
    hints = hints or {}
    with torch.inference_mode():
        ab_a, ab_b = engine(x, temperature, **hints).float(), net(x, temperature, **hints).float()
        rgb = [
            np.abs(compose(p, a).astype(np.int16) - compose(p, b).astype(np.int16)).max()
            for p, a, b in zip(photos, ab_a, ab_b, strict=True)
        ]
    return float((ab_a - ab_b).abs().max()), int(max(rgb))


def check_temperatures(net: Colorizer) -> list[float | None]:
    """The decodings an export is checked at: the model's own, and for a classification model also the
    plain mean (T = 1). Not the low end of the vividness range: there the decoding nears the mode, which
    jumps between two near-tied bins at float noise, in any two engines."""
    return [None, 1.0] if net.classifies else [None]


def check_hints(net: Colorizer, photos: list[np.ndarray]) -> list[tuple[str, dict[str, torch.Tensor] | None]]:
    """The hints an export is checked with: none, and for a hinted model also ten points of the photos'
    own colours (with their global hint, when the model takes one)."""
    if net.spec.hints == "off":
        return [("", None)]
    from model.lab import AB_SCALE, rgb8_to_lab

    ab = torch.stack([rgb8_to_lab(torch.from_numpy(np.array(p)).permute(2, 0, 1))[1:] / AB_SCALE for p in photos])
    given = hinting.evaluation_points(ab, 10, seed=0)
    if net.spec.takes_global:
        given["global_hint"] = hinting.global_from_ab(ab)
    return [("", None), ("_hints", given)]


def check(engine: Any, net: Colorizer, size: int) -> dict[str, float]:
    """Compare ``engine`` with eager ``net`` at :func:`check_shapes` (and :func:`check_temperatures`, and
    :func:`check_hints`); raises :class:`ExportMismatch` with every measured difference when either
    tolerance is exceeded."""
    report: dict[str, float] = {}
    for i, (b, h, w) in enumerate(check_shapes(size)):
        photos = check_photos(b, h, w, seed=i)
        for t in check_temperatures(net):
            for tag, hints in check_hints(net, photos):
                ab, rgb = compare(engine, net, photos, t, hints)
                at = ("" if t is None else f"_t{t:g}") + tag
                report[f"max_ab_diff_{b}x{h}x{w}{at}"] = ab
                report[f"max_rgb_diff_{b}x{h}x{w}{at}"] = rgb
    report["max_ab_diff"] = max(v for k, v in report.items() if k.startswith("max_ab_diff_"))
    report["max_rgb_diff"] = max(v for k, v in report.items() if k.startswith("max_rgb_diff_"))
    if not (report["max_ab_diff"] <= AB_TOLERANCE and report["max_rgb_diff"] <= RGB_TOLERANCE):
        raise ExportMismatch(
            f"ONNX export differs from eager by {report['max_ab_diff']:.2e} in normalized ab (limit "
            f"{AB_TOLERANCE:g}) and {report['max_rgb_diff']}/255 in RGB (limit {RGB_TOLERANCE}/255)",
            report,
        )
    return report


class _Decoding(torch.nn.Module):
    """A classification model with its temperature as a graph input: one export serves every vividness."""

    def __init__(self, net: Colorizer) -> None:
        super().__init__()
        self.net = net

    def forward(self, l_norm: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return self.net(l_norm, temperature)


class _Hinted(torch.nn.Module):
    """A hinted model with its hints (and a classification model's temperature) as graph inputs, in
    ``names``' order after ``l_norm``: one export serves a photo with hints and one without (all zeros)."""

    def __init__(self, net: Colorizer, names: list[str]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, l_norm: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.names, inputs, strict=True))
        temperature = given.pop(TEMPERATURE, None)
        return self.net(l_norm, temperature, **given)


def write_onnx(net: Colorizer, path: Path) -> None:
    """The ONNX graph of ``net`` at ``path``, batch and sides dynamic (no check: see :func:`export`). A
    classification model's graph carries its decoding, with the temperature as a second input (a float32
    tensor of shape (1,)), not baked in: ``--vividness`` needs no other export."""
    net = net.eval().to(memory_format=torch.contiguous_format)
    example = torch.rand(1, 1, net.spec.image_size, net.spec.image_size)
    dims = {0: "batch", 2: "height", 3: "width"}
    module, args, names = net, (example,), ["l_norm"]
    axes = {"l_norm": dims, "ab": dims}
    if net.classifies:
        # eval() too: the exporter restores the wrapper's mode afterwards, and a new module's is training,
        # which would leave the network itself in training mode (BatchNorm on batch statistics)
        module = _Decoding(net).eval()
        args, names = (example, torch.tensor([net.spec.temperature])), [*names, TEMPERATURE]
    if net.spec.hints != "off":  # after the temperature; a model without hints is exported exactly as before
        side = net.spec.image_size
        examples = hinting.none_given(1, side, side, net.spec.hints)
        hinted = list(examples)
        module = _Hinted(net, [*names[1:], *hinted]).eval()
        args, names = (*args, *examples.values()), [*names, *hinted]
        axes.update({n: dims for n in hinted if n != "global_hint"})
        axes.update({"global_hint": {0: "batch"}} if "global_hint" in hinted else {})
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            opset_version=OPSET,
            input_names=names,
            output_names=["ab"],
            dynamic_axes=axes,
            dynamo=False,
        )


def export(net: Colorizer, path: Path) -> dict[str, float]:
    """Write ``net`` as ONNX to ``path`` (atomically) and :func:`check` it against eager; returns the
    measured differences and the export time. Nothing is left at ``path`` when the check fails."""
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        write_onnx(net, tmp)
        report = {"export_seconds": round(time.perf_counter() - t0, 2)}
        report.update(check(OnnxColorizer(tmp, net.spec), net, net.spec.image_size))
    log.info("exported the colorizer to ONNX (%s): %s", path, report)
    return report


class OnnxColorizer:
    """onnxruntime on the CPU, called like the PyTorch network."""

    def __init__(self, path: Path | str, spec: ColorizerSpec, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.spec = spec
        names = {i.name for i in self.session.get_inputs()}
        self.decodes = TEMPERATURE in names
        # the hint inputs this export has: an export made before hints existed has none, whatever the spec
        self.hint_inputs = tuple(n for n in hinting.INPUTS if n in names)

    @property
    def takes_hints(self) -> bool:
        return bool(self.hint_inputs)

    def __call__(self, l_norm: torch.Tensor, temperature: float | None = None, **hints: torch.Tensor) -> torch.Tensor:
        """As the network's forward: a classification model decoded at ``temperature`` (default its spec's),
        a hinted one given ``hints`` (model.hints' inputs; a missing one is "not given", zeros)."""
        feed = {"l_norm": np.ascontiguousarray(l_norm.detach().float().cpu().numpy())}
        if self.decodes:
            t = self.spec.temperature if temperature is None else float(temperature)
            feed[TEMPERATURE] = np.array([t], dtype=np.float32)
        if set(hints) - set(self.hint_inputs):
            raise hinting.HintError(hinting.NOT_TRAINED if not self.hint_inputs else hinting.NO_GLOBAL)
        if self.hint_inputs:
            b, _, h, w = l_norm.shape
            given = {**hinting.none_given(b, h, w, "local+global"), **hints}
            for name in self.hint_inputs:
                feed[name] = np.ascontiguousarray(given[name].detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["ab"], feed)[0])

    def eval(self) -> OnnxColorizer:
        return self
