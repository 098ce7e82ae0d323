"""Quantized ab (Zhang, Isola & Efros 2016, "Colorful Image Colorization"): the bins a classification
head predicts a distribution over, the soft-encoded targets, the class-rebalancing weights, and the
annealed-mean decoding back to ab.

The bins are the centres of a 10x10 grid in ab (multiples of 10) that some sRGB colour falls into: every
8-bit sRGB colour is converted with this project's own Lab (model.lab, D65) and rounded to its nearest
centre. That gives Q = 261 bins, not the paper's 313: the paper's set (``pts_in_hull.npy``) is wider than
the sRGB gamut this conversion bounds. Computed once per process, never downloaded.

Everything here works on ab in Lab units (not the network's ab/110) and on any device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model.lab import AB_SCALE, rgb8_to_lab

GRID = 10.0  # the bin size in ab units
NEIGHBOURS, SIGMA = 5, 5.0  # soft encoding: the 5 nearest bins, a Gaussian of sigma 5 (the paper's values)


@functools.lru_cache(maxsize=1)
def _bins() -> torch.Tensor:
    levels = torch.arange(256, dtype=torch.uint8)
    found: set[tuple[int, int]] = set()
    for r in levels:  # one plane of the 8-bit cube at a time: 65,536 colours
        g, b = torch.meshgrid(levels, levels, indexing="ij")
        rgb = torch.stack((torch.full_like(g, int(r)), g, b)).reshape(1, 3, 256, 256)
        ab = rgb8_to_lab(rgb)[0, 1:].reshape(2, -1)
        centres = torch.round(ab / GRID).to(torch.int64)
        found.update(zip(centres[0].tolist(), centres[1].tolist(), strict=True))
    return torch.tensor(sorted(found), dtype=torch.float32) * GRID


def bins(device: torch.device | str | None = None) -> torch.Tensor:
    """The in-gamut bin centres, ``(Q, 2)`` ab, sorted by a then b."""
    return _bins().to(device) if device is not None else _bins()


def nearest(ab: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin for each ``(N, 2)`` ab: the hard encoding."""
    return torch.cdist(ab.float(), bins(ab.device)).argmin(dim=1)


@functools.lru_cache(maxsize=1)
def _grid_index() -> tuple[torch.Tensor, int]:
    """A table from grid cell (round(a/10), round(b/10)), offset to start at 0, to its bin's index."""
    cells = torch.round(_bins() / GRID).to(torch.int64)
    offset = int(cells.abs().max()) + 1
    table = torch.full((2 * offset + 1, 2 * offset + 1), -1, dtype=torch.int64)
    table[cells[:, 0] + offset, cells[:, 1] + offset] = torch.arange(len(cells))
    return table, offset


def histogram(ab: torch.Tensor) -> torch.Tensor:
    """How many of the ``(..., 2, H, W)`` ab pixels fall in each bin, ``(Q,)`` int64: the empirical prior
    the rebalancing weights are made from. A pixel is counted in the bin of its grid cell (the nearest
    centre); the rare one whose cell is not a bin (not an 8-bit sRGB colour) goes to the nearest bin."""
    table, offset = _grid_index()
    a, b = ab.movedim(-3, 0).reshape(2, -1).float()
    ia = (torch.round(a / GRID).to(torch.int64) + offset).clamp(0, table.shape[0] - 1)
    ib = (torch.round(b / GRID).to(torch.int64) + offset).clamp(0, table.shape[1] - 1)
    index = table.to(ab.device)[ia, ib]
    outside = index < 0
    if outside.any():
        index[outside] = nearest(torch.stack((a[outside], b[outside]), dim=1))
    return torch.bincount(index, minlength=len(_bins())).cpu()


def soft_encode(ab: torch.Tensor, centres: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, 2)`` ab -> ``(N, Q)`` targets: the ``NEIGHBOURS`` nearest bins weighted by a Gaussian of
    their distance (sigma ``SIGMA``), summing to 1; every other bin 0. ``centres``: the bins, already on
    ``ab``'s device (default :func:`bins`)."""
    dist = torch.cdist(ab.float(), bins(ab.device) if centres is None else centres)
    near, index = dist.topk(NEIGHBOURS, dim=1, largest=False)
    weight = torch.exp(-(near**2) / (2 * SIGMA**2))
    weight = weight / weight.sum(dim=1, keepdim=True)
    return torch.zeros_like(dist).scatter_(1, index, weight)


def smoothed_prior(prior: torch.Tensor) -> torch.Tensor:
    """The empirical ab prior ``(Q,)`` (counts or probabilities) as probabilities smoothed by a Gaussian of
    sigma ``SIGMA`` over the bins (the paper's p-tilde), float64."""
    p = prior.double() / prior.double().sum()
    centres = bins(prior.device).double()
    smooth = torch.exp(-(torch.cdist(centres, centres) ** 2) / (2 * SIGMA**2)) @ p
    return smooth / smooth.sum()


def prior_logits(prior: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """Logits whose softmax is the smoothed prior mixed with ``floor`` of the uniform: the classification
    head's starting bias. An untrained (or unsure) head then predicts the colours photos have, whose
    mean is a muted brown, instead of all 261 in-gamut colours alike, whose mean is a pink; and no
    colour starts impossible."""
    p = (1.0 - floor) * smoothed_prior(prior) + floor / len(prior)
    return torch.log(p).float()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Class-rebalancing weights from the empirical ab prior ``(Q,)`` (counts or probabilities): the
    prior smoothed by a Gaussian of sigma ``SIGMA`` over the bins, mixed with the uniform by ``lam``,
    inverted, and scaled so that the expected weight under the smoothed prior is 1 (the paper's eq. 4)."""
    smooth = smoothed_prior(prior)
    w = 1.0 / ((1.0 - lam) * smooth + lam / len(smooth))
    return (w / (smooth * w).sum()).float()


def annealed_mean(probs: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """The ab that a distribution over the bins (``probs``, summing to 1 along ``dim``) decodes to: the
    mean of the distribution re-tempered to ``p^(1/T)``, renormalized. T = 1 is the mean; towards 0 it
    becomes the mode (the paper uses 0.38). Returns ab with ``dim`` of size 2."""
    if not temperature > 0:
        raise ValueError(f"the temperature must be above 0, got {temperature}")
    logp = torch.log(probs.clamp_min(1e-12))
    return decode(logp, bins(probs.device).to(probs.dtype), temperature, dim)


def decode(
    logits: torch.Tensor, centres: torch.Tensor, temperature: float | torch.Tensor, dim: int = 1
) -> torch.Tensor:
    """:func:`annealed_mean` from logits (or log-probabilities) over ``centres`` ``(Q, 2)``: ``p^(1/T)``
    renormalized is the softmax of the logits over T. ``temperature`` may be a tensor (an ONNX graph's
    input), so it is not checked here."""
    tempered = torch.softmax(logits / temperature, dim=dim)
    dim, last = dim % logits.dim(), logits.dim() - 1  # non-negative: ONNX's Transpose takes no -1
    return torch.tensordot(tempered.movedim(dim, last), centres, dims=1).movedim(last, dim)


class RebalancedLoss:
    """The classification head's training loss (the paper's eq. 2 with eq. 3's weights): cross-entropy
    between the predicted distribution and the soft-encoded truth, each pixel weighted by the rebalancing
    weight of its target's most likely bin, averaged over pixels.

    The logits may be smaller than the truth (the head predicts at S/2): the targets are soft-encoded at
    the truth's resolution and then average-pooled to the logits' (each target the mixture of its pixels'
    distributions, so an edge between red and green keeps both colours rather than their brown mean).
    The bins and weights are copied to the logits' device at the first call and kept there: a captured
    CUDA graph replays the later calls without any host-to-device copy. Callable as the train step's
    criterion: ``(logits, true normalized ab, L) -> loss``."""

    def __init__(self, centres: torch.Tensor, prior: torch.Tensor, lam: float = 0.5) -> None:
        self.centres, self.weights = centres.float(), rebalance_weights(prior, lam)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, logits: torch.Tensor, ab_norm: torch.Tensor, _l: torch.Tensor | None = None) -> torch.Tensor:
        device = logits.device
        if device not in self._on:
            self._on[device] = (self.centres.to(device), self.weights.to(device))
        centres, weights = self._on[device]
        b, _, h, w = ab_norm.shape
        pixels = (ab_norm.float() * AB_SCALE).permute(0, 2, 3, 1).reshape(-1, 2)
        target = soft_encode(pixels, centres).view(b, h, w, -1).permute(0, 3, 1, 2)
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.adaptive_avg_pool2d(target, logits.shape[-2:])
        weight = weights[target.argmax(dim=1)]
        cross_entropy = -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)
        return (weight * cross_entropy).mean()
