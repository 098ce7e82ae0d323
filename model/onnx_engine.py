"""The colorizer as ONNX, and an onnxruntime engine that stands in for the PyTorch network.

Exported with PyTorch's TorchScript-based exporter (opset 17) with dynamic batch, height and width: the
dynamo exporter needs the sides declared as multiples of 32 and fails with fully dynamic ones. Every
export is checked against eager PyTorch on a few shapes before it is kept, so a registered ONNX file is
one that was seen to agree (max difference in normalized ab at most :data:`TOLERANCE`).

:class:`OnnxColorizer` has the network's call signature (``l_norm (B,1,H,W) -> ab (B,2,H,W)``) and its
``spec``, so model.inference runs it unchanged: one inference pipeline, two engines.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from model.colorizer import Colorizer, ColorizerSpec
from storage.atomic import atomic_path

log = logging.getLogger(__name__)
OPSET = 17
TOLERANCE = 1e-4
ONNX_FILE = "model.onnx"


class ExportMismatch(RuntimeError):
    """The exported graph does not reproduce the eager network."""


def check_shapes(size: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) the export is checked at: the training size, a non-square one, a larger one."""
    return [(2, size, size), (1, size, size + 32), (1, 2 * size, 2 * size)]


def export(net: Colorizer, path: Path) -> dict[str, float]:
    """Write ``net`` as ONNX to ``path`` (atomically) and check it against eager on :func:`check_shapes`;
    returns the max difference per shape and the export time."""
    net = net.eval().to(memory_format=torch.contiguous_format)
    size = net.spec.image_size
    example = torch.rand(1, 1, size, size)
    dims = {0: "batch", 2: "height", 3: "width"}
    t0 = time.perf_counter()
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            str(tmp),
            opset_version=OPSET,
            input_names=["l_norm"],
            output_names=["ab"],
            dynamic_axes={"l_norm": dims, "ab": dims},
            dynamo=False,
        )
        report = {"export_seconds": round(time.perf_counter() - t0, 2)}
        engine = OnnxColorizer(tmp, net.spec)
        gen = torch.Generator().manual_seed(0)
        for b, h, w in check_shapes(size):
            x = torch.rand(b, 1, h, w, generator=gen)
            diff = float((engine(x) - net(x)).abs().max())
            report[f"max_diff_{b}x{h}x{w}"] = diff
            if not diff <= TOLERANCE:
                raise ExportMismatch(f"ONNX export differs from eager by {diff:.2e} at {b}x{h}x{w} (> {TOLERANCE})")
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

    def __call__(self, l_norm: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(l_norm.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["ab"], {"l_norm": x})[0])

    def eval(self) -> OnnxColorizer:
        return self
