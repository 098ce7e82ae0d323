"""Temporal consistency for video: the previous frame's colour carried along the motion into the next.

Colorizing each frame on its own makes colour flicker: the network sees each frame anew and small
changes in the picture move its ab prediction. Here the predicted ab of frame t is blended with the
previous *output* ab, warped into frame t by optical flow (OpenCV's DIS, computed on the frames'
lightness, which is exact): an exponential moving average along motion trajectories. Pixels the flow
cannot explain (occlusions, disocclusions, objects entering) are found by a photometric check, the
previous lightness warped the same way must match this frame's, and keep this frame's own prediction.
A scene cut (most of the frame unexplained) resets the memory.

Everything runs at the network's input size on small maps, so it costs little next to the network; the
final frame still keeps its own full-resolution L (model.inference.compose).

:func:`warping_error` is the flicker metric of Lai et al. (2018): the mean |ab_t - warp(ab_{t-1})| over
non-occluded pixels, with the flow and occlusions taken from the lightness of the frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


def to_gray8(l_norm: np.ndarray) -> np.ndarray:
    """L/100 in [0, 1] (H, W) -> uint8, what the flow is computed on."""
    return np.clip(l_norm * 255.0 + 0.5, 0, 255).astype(np.uint8)


def backward_flow(gray: np.ndarray, prev_gray: np.ndarray) -> np.ndarray:
    """For each pixel of ``gray``, where it was in ``prev_gray``: (H, W, 2) offsets (x, y)."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(gray, prev_gray, None)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample ``image`` (H, W) or (H, W, C) of the previous frame at the positions ``flow`` points to."""
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR, cv2.BORDER_REPLICATE)


def explained(gray: np.ndarray, prev_gray: np.ndarray, flow: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels whose motion the flow explains: inside the previous frame, and the previous lightness
    warped along the flow matches this frame's within ``tolerance`` (in [0, 1] units)."""
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w), np.arange(h))
    x, y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    diff = np.abs(warp(prev_gray.astype(np.float32), flow) - gray.astype(np.float32)) / 255.0
    return inside & (diff <= tolerance)


@dataclass
class Stabilizer:
    """Blends each frame's predicted ab with the previous output warped into it (see the module doc).

    ``strength`` is the weight of the carried colour where the motion is explained: 0 is per-frame
    output; near 1 the colour of an object is set by its first frames and held. ``state``/``restore``
    let a chunked run resume with exactly the memory an uninterrupted run would have.
    """

    strength: float = 0.8
    tolerance: float = 0.06
    cut: float = 0.5  # a frame with less than this share of explained pixels starts a new scene
    prev_gray: np.ndarray | None = field(default=None, repr=False)
    prev_ab: np.ndarray | None = field(default=None, repr=False)

    def __call__(self, l_norm: np.ndarray, ab: np.ndarray) -> np.ndarray:
        """``l_norm`` (H, W) L/100 and ``ab`` (2, H, W) of one frame at the network's size -> stabilized ab."""
        gray = to_gray8(l_norm)
        out = ab
        if self.prev_gray is not None and self.prev_gray.shape == gray.shape:
            flow = backward_flow(gray, self.prev_gray)
            ok = explained(gray, self.prev_gray, flow, self.tolerance)
            if ok.mean() >= self.cut:
                carried = warp(np.ascontiguousarray(self.prev_ab.transpose(1, 2, 0)), flow).transpose(2, 0, 1)
                weight = (self.strength * ok).astype(np.float32)
                out = (weight * carried + (1 - weight) * ab).astype(np.float32)
        self.prev_gray, self.prev_ab = gray, np.ascontiguousarray(out, dtype=np.float32)
        return self.prev_ab

    def state(self) -> dict[str, Any]:
        if self.prev_gray is None:
            return {}
        return {"prev_gray": self.prev_gray, "prev_ab": self.prev_ab}

    def restore(self, state: dict[str, Any]) -> None:
        self.prev_gray = state.get("prev_gray")
        self.prev_ab = state.get("prev_ab")


def warping_error(grays: list[np.ndarray], abs_: list[np.ndarray], tolerance: float = 0.06) -> float:
    """Mean |ab_t - warp(ab_{t-1})| over the pixels the motion explains, over all consecutive pairs.
    ``grays``: uint8 (H, W) lightness of each frame; ``abs_``: (2, H, W) ab of each frame (any units)."""
    errors = []
    for t in range(1, len(grays)):
        flow = backward_flow(grays[t], grays[t - 1])
        ok = explained(grays[t], grays[t - 1], flow, tolerance)
        if not ok.any():
            continue
        carried = warp(np.ascontiguousarray(abs_[t - 1].transpose(1, 2, 0)), flow).transpose(2, 0, 1)
        errors.append(float(np.abs(abs_[t] - carried)[:, ok].mean()))
    return float(np.mean(errors)) if errors else float("nan")
