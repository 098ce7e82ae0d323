"""User-guided colour (Zhang et al. 2017, "Real-Time User-Guided Image Colorization with Learned Deep
Priors"): the one owner of hints. It parses what a user gives (points ``X,Y:#RRGGBB``, a hints JSON file,
a reference photo), checks it against the photo, encodes it onto the network's grid, and simulates a user
for training and evaluation, so the CLI, the page, REST, ONNX and the train and evaluate stages all read
hints the same way.

What the network takes (model.colorizer, ``train.hints``):

- *local* hints: ``hint_ab`` (B,2,S,S), known ab/110 where a hint is and 0 elsewhere, and ``hint_mask``
  (B,1,S,S), 1 where a hint is. A point is a small square patch (:data:`USER_PATCH` cells of the grid per
  64 px of side) of one colour; only a/b are taken from it, the photo keeps its own L.
- a *global* hint: the reference's ab distribution over model.ab_bins' Q bins (fractions summing to 1), its
  mean chroma (sqrt(a^2+b^2), ab/110), and a flag, 1 when given: ``global_hint`` (B, Q+2). All zeros means
  "not given".

Simulated users (training, the evaluation's hint curve) follow Zhang'17: per image a number of points
drawn from a geometric distribution (p = 1/8, so one image in eight has none and the automatic output
stays trained), patch sides 1-9 px at 256 px (scaled to the crop), centres from a Gaussian around the
image centre (sigma a quarter of the side), each patch's colour the truth's mean ab over it; the global
hint from the truth's own histogram, given with :data:`GLOBAL_SHARE` probability. Everything draws from
one ``torch.Generator``, whose state a checkpoint keeps, so a resumed run sees the same hints.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import ab_bins
from model.choices import MAX_POINTS
from model.lab import AB_SCALE, rgb8_to_lab
from storage.errors import ConfigError
from storage.images import ImageError, load_photo

MAX_JSON_BYTES = 1 << 20  # a hints file larger than this is refused before it is parsed
GEOMETRIC_P = 1 / 8  # Zhang'17: the number of points ~ Geometric(p) - 1, so P(no point) = p
PATCH_SIDES_AT_256 = (1, 9)  # Zhang'17: patch sides in px at 256 px, uniform; scaled to the crop
EVAL_PATCH_AT_256 = 6  # the evaluation's points: 6 x 6 px patches at 256 px (Zhang'17's sweep)
GLOBAL_SHARE = 0.5  # training: how often the truth's global hint is given (local+global)
USER_PATCH = 1  # a user's point: a square of this many grid cells per 64 px of the network's side
GREY_CHROMA = 3.0  # a reference whose mean chroma (Lab units) is under this has no colour to follow
MAX_REFERENCE_BYTES = 16 << 20  # a reference sent in a request (base64 of its file): at most this many bytes
MAX_REFERENCE_PIXELS = 16_000_000  # ... and pixels (its palette needs no more; a bomb is refused unread)
_POINT = re.compile(r"^\s*(-?[0-9.]+)\s*,\s*(-?[0-9.]+)\s*:\s*(#[0-9A-Fa-f]{6})\s*$")
_COLOUR = re.compile(r"^#[0-9A-Fa-f]{6}$")


NOT_TRAINED = "this model was trained without hints: retrain with --set train.hints=local"
NO_GLOBAL = "this model was trained without a reference (global) hint: retrain with --set train.hints=local+global"


class HintError(ConfigError):
    """A user's hint that cannot be used: one line, exit 2, nothing written."""


def global_size() -> int:
    """The global hint's length: Q bins, the mean chroma, the given flag."""
    return len(ab_bins.bins()) + 2


@dataclass(frozen=True)
class Point:
    """A user's point: where (the photo's own pixels, full resolution) and which colour (#RRGGBB)."""

    x: float
    y: float
    color: str

    def ab(self) -> tuple[float, float]:
        """The colour's a and b (Lab units): all a point contributes (the photo keeps its own L)."""
        rgb = torch.tensor([int(self.color[i : i + 2], 16) for i in (1, 3, 5)], dtype=torch.uint8)
        lab = rgb8_to_lab(rgb.view(3, 1, 1))[:, 0, 0]
        return float(lab[1]), float(lab[2])

    def as_dict(self) -> dict[str, object]:
        return {"x": self.x, "y": self.y, "color": self.color.lower()}


def parse_point(text: str) -> Point:
    """``X,Y:#RRGGBB`` (the CLI's ``--hint``) -> a point; anything else is a one-line HintError."""
    m = _POINT.match(text)
    if not m:
        raise HintError(f"--hint {text!r}: expected X,Y:#RRGGBB (pixels of the photo, a hex colour)")
    return _point(m.group(1), m.group(2), m.group(3), f"--hint {text!r}")


def _point(x: object, y: object, color: object, where: str) -> Point:
    try:
        fx, fy = float(x), float(y)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HintError(f"{where}: x and y must be numbers") from None
    if isinstance(x, bool) or isinstance(y, bool) or not (math.isfinite(fx) and math.isfinite(fy)):
        raise HintError(f"{where}: x and y must be finite numbers")
    if not isinstance(color, str) or not _COLOUR.match(color):
        raise HintError(f"{where}: colour {color!r} is not #RRGGBB")
    return Point(fx, fy, color.lower())


def parse_json(text: str | bytes, where: str = "hints") -> list[Point]:
    """A hints document -> its points. The format (what the page exports and ``--hints`` reads)::

        {"points": [{"x": 120, "y": 45, "color": "#3366cc"}, ...]}

    (a bare list of points is accepted too). x and y are in the photo's own pixels."""
    if len(text) > MAX_JSON_BYTES:
        raise HintError(f"{where}: larger than {MAX_JSON_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HintError(f"{where}: not valid JSON ({exc})") from None
    items = doc.get("points") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise HintError(f'{where}: expected {{"points": [{{"x": .., "y": .., "color": "#RRGGBB"}}, ...]}}')
    return from_items(items, where)


def from_items(items: Iterable[object], where: str = "hints") -> list[Point]:
    """Points from a list of ``{"x", "y", "color"}`` mappings (a JSON document, a REST parameter)."""
    points = []
    for i, item in enumerate(items):
        if len(points) >= MAX_POINTS:
            raise HintError(f"{where}: more than {MAX_POINTS} points")
        if not isinstance(item, dict) or set(item) - {"x", "y", "color"} or not {"x", "y", "color"} <= set(item):
            raise HintError(f'{where}: point {i} must be {{"x": .., "y": .., "color": "#RRGGBB"}}')
        points.append(_point(item["x"], item["y"], item["color"], f"{where}: point {i}"))
    return points


def to_json(points: Iterable[Point]) -> str:
    """The hints document of ``points`` (:func:`parse_json` reads it back)."""
    return json.dumps({"points": [p.as_dict() for p in points]}, indent=1)


def check_points(points: list[Point], width: int, height: int) -> None:
    """Every point inside a ``width`` x ``height`` photo, and not too many: else one line."""
    if len(points) > MAX_POINTS:
        raise HintError(f"{len(points)} points: at most {MAX_POINTS}")
    for p in points:
        if not (0 <= p.x < width and 0 <= p.y < height):
            raise HintError(f"point {p.x:g},{p.y:g} is outside the {width}x{height} photo")


def local_maps(points: list[Point], width: int, height: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's local-hint inputs for ``points`` on a ``width`` x ``height`` photo fed at ``size``:
    (hint_ab (1,2,size,size) ab/110, hint_mask (1,1,size,size)). The photo is stretched to the square
    input, so a point lands on the cell its relative position gives; a later point overwrites an earlier
    one where their patches overlap."""
    check_points(points, width, height)
    ab = torch.zeros(1, 2, size, size)
    mask = torch.zeros(1, 1, size, size)
    side = max(1, round(USER_PATCH * size / 64))
    for p in points:
        gx, gy = min(size - 1, int(p.x * size / width)), min(size - 1, int(p.y * size / height))
        x0, y0 = max(0, gx - side // 2), max(0, gy - side // 2)
        a, b = p.ab()
        ab[0, 0, y0 : y0 + side, x0 : x0 + side] = a / AB_SCALE
        ab[0, 1, y0 : y0 + side, x0 : x0 + side] = b / AB_SCALE
        mask[0, 0, y0 : y0 + side, x0 : x0 + side] = 1.0
    return ab, mask


def global_from_ab(ab_norm: torch.Tensor) -> torch.Tensor:
    """The global hint of each image of ``ab_norm`` (B,2,H,W) ab/110: (B, Q+2), given (flag 1)."""
    out = []
    for ab in ab_norm.float().cpu():
        counts = ab_bins.histogram(ab * AB_SCALE).float()
        chroma = ab.square().sum(0).sqrt().mean()
        out.append(torch.cat((counts / counts.sum(), chroma.view(1), torch.ones(1))))
    return torch.stack(out)


def reference_hint(rgb: np.ndarray) -> torch.Tensor:
    """The global hint (1, Q+2) of a reference photo (H,W,3 uint8): the palette to follow. A grey
    reference is refused: it has no colour to follow."""
    lab = rgb8_to_lab(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    chroma = float(lab[1:].square().sum(0).sqrt().mean())
    if chroma < GREY_CHROMA:
        raise HintError(f"the reference is grey (mean chroma {chroma:.1f} Lab units): it has no colour to follow")
    return global_from_ab((lab[1:] / AB_SCALE)[None])


INPUTS = ("hint_ab", "hint_mask", "global_hint")  # the network's hint inputs, in the ONNX graph's order


def none_given(batch: int, height: int, width: int, mode: str) -> dict[str, torch.Tensor]:
    """The hint inputs a model trained with ``train.hints=mode`` takes, each giving no hint (zeros: the
    automatic output), in :data:`INPUTS`' order."""
    out = {"hint_ab": torch.zeros(batch, 2, height, width), "hint_mask": torch.zeros(batch, 1, height, width)}
    if mode == "local+global":
        out["global_hint"] = torch.zeros(batch, global_size())
    return {} if mode == "off" else out


def _patch_side(size: int, at_256: float) -> int:
    return max(1, round(at_256 * size / 256))


def sample_points(
    ab_norm: torch.Tensor, counts: list[int], gen: torch.Generator, fixed_side: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated local hints for a batch of truths ``ab_norm`` (B,2,S,S): ``counts[i]`` patches on image
    i, each the truth's mean ab over it, at Gaussian positions around the centre; sides uniform in
    :data:`PATCH_SIDES_AT_256` scaled to S, or ``fixed_side`` px at 256. Returns (hint_ab, hint_mask)
    on ``ab_norm``'s device."""
    b, _, h, w = ab_norm.shape
    hint_ab = torch.zeros(b, 2, h, w)
    mask = torch.zeros(b, 1, h, w)
    truth = ab_norm.detach().float().cpu()
    lo, hi = (_patch_side(h, s) for s in PATCH_SIDES_AT_256)
    total = sum(counts)
    if total:
        centres = torch.randn(total, 2, generator=gen) * torch.tensor([h / 4, w / 4]) + torch.tensor([h / 2, w / 2])
        sides = torch.randint(lo, hi + 1, (total,), generator=gen)
        k = 0
        for i, n in enumerate(counts):
            for _ in range(n):
                side = _patch_side(h, fixed_side) if fixed_side is not None else int(sides[k])
                cy = int(centres[k, 0].clamp(0, h - 1))
                cx = int(centres[k, 1].clamp(0, w - 1))
                y0, x0 = max(0, min(h - side, cy - side // 2)), max(0, min(w - side, cx - side // 2))
                patch = truth[i, :, y0 : y0 + side, x0 : x0 + side]
                hint_ab[i, :, y0 : y0 + side, x0 : x0 + side] = patch.mean(dim=(1, 2))[:, None, None]
                mask[i, :, y0 : y0 + side, x0 : x0 + side] = 1.0
                k += 1
    return hint_ab.to(ab_norm.device), mask.to(ab_norm.device)


def simulate(ab_norm: torch.Tensor, mode: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A simulated user's hints for a training batch (see the module's notes), as the network's inputs."""
    b = ab_norm.shape[0]
    # Geometric(p) - 1 by inversion: floor(log(U) / log(1 - p)), U in (0, 1]
    u = 1.0 - torch.rand(b, generator=gen, dtype=torch.float64)
    counts = torch.floor(torch.log(u) / math.log(1.0 - GEOMETRIC_P)).clamp(max=MAX_POINTS).to(torch.int64).tolist()
    hint_ab, mask = sample_points(ab_norm, counts, gen)
    out = {"hint_ab": hint_ab, "hint_mask": mask}
    if mode == "local+global":
        given = (torch.rand(b, generator=gen) < GLOBAL_SHARE).float()
        out["global_hint"] = (global_from_ab(ab_norm) * given[:, None]).to(ab_norm.device)
    return out


def evaluation_points(ab_norm: torch.Tensor, n: int, seed: int, first_index: int = 0) -> dict[str, torch.Tensor]:
    """``n`` points from the truth on every image of a batch, ``first_index`` the first image's place in
    the test split: image i's points are drawn from a generator seeded by (``seed``, i), so they are the
    same for every model, run and batch size that scores that image (the evaluation's hint curve)."""
    hint_ab, mask = torch.zeros_like(ab_norm), torch.zeros_like(ab_norm[:, :1])
    for i in range(ab_norm.shape[0]):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + first_index + i)
        one_ab, one_mask = sample_points(ab_norm[i : i + 1], [n], gen, fixed_side=EVAL_PATCH_AT_256)
        hint_ab[i], mask[i] = one_ab[0], one_mask[0]
    return {"hint_ab": hint_ab, "hint_mask": mask}


GLOBAL = "global"  # the hint curve's condition "the truth's global hint, no points"


def curve_inputs(ab_norm: torch.Tensor, condition: int | str, seed: int, first_index: int) -> dict[str, torch.Tensor]:
    """The hint inputs of one condition of the evaluation's curve for a batch of truths: ``n`` points
    (:func:`evaluation_points`), or :data:`GLOBAL`, the truth's own global hint and no point."""
    if condition == GLOBAL:
        return {"global_hint": global_from_ab(ab_norm).to(ab_norm.device)}
    return evaluation_points(ab_norm, int(condition), seed, first_index)


@dataclass(frozen=True)
class Guidance:
    """What a user gave for one photo, or for every photo of a command: points in the photo's own pixels
    and a reference's global hint (:func:`reference_hint`), either possibly empty."""

    points: tuple[Point, ...] = ()
    reference: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.points) or self.reference is not None

    def inputs(self, mode: str, width: int, height: int, size: int) -> dict[str, torch.Tensor]:
        """The network's hint inputs for a ``width`` x ``height`` photo fed at ``size``, for a model
        trained with ``train.hints=mode``; a model that cannot take what was given is a one-line
        HintError (:data:`NOT_TRAINED`, :data:`NO_GLOBAL`), never a silent automatic result."""
        if mode == "off":
            raise HintError(NOT_TRAINED)
        if self.reference is not None and mode != "local+global":
            raise HintError(NO_GLOBAL)
        hint_ab, hint_mask = local_maps(list(self.points), width, height, size)
        given = {"hint_ab": hint_ab, "hint_mask": hint_mask}
        if self.reference is not None:
            given["global_hint"] = self.reference
        return given


def request_guidance(points: object, reference: object) -> Guidance:
    """The hints of a REST or pyfunc request (``params``): ``hints``, the hints document as a string (the
    format of :func:`parse_json`, points in each image's own pixels, the same for every image of the
    request), and ``reference``, a colour photo's file (PNG, JPEG, ...) base64-encoded; empty: not given.
    Anything else is a one-line HintError."""
    if not isinstance(points, str) or not isinstance(reference, str):
        raise HintError("params hints and reference must be strings (a hints JSON document; a base64 image file)")
    found = parse_json(points, "params hints") if points.strip() else []
    palette = None
    if reference.strip():
        try:
            data = base64.b64decode(reference, validate=True)
        except (binascii.Error, ValueError):
            raise HintError("params reference: not base64 (send the image file's bytes, base64-encoded)") from None
        if len(data) > MAX_REFERENCE_BYTES:
            raise HintError(f"params reference: larger than {MAX_REFERENCE_BYTES} bytes")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "reference"
            path.write_bytes(data)
            try:
                rgb = load_photo(path, MAX_REFERENCE_PIXELS).rgb
            except ImageError as exc:
                raise HintError(str(exc).replace(str(path), "params reference")) from None
        palette = reference_hint(rgb)
    return Guidance(tuple(found), palette)
