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

from model.lab import rgb8_to_lab

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


def soft_encode(ab: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` ab -> ``(N, Q)`` targets: the ``NEIGHBOURS`` nearest bins weighted by a Gaussian of
    their distance (sigma ``SIGMA``), summing to 1; every other bin 0."""
    dist = torch.cdist(ab.float(), bins(ab.device))
    near, index = dist.topk(NEIGHBOURS, dim=1, largest=False)
    weight = torch.exp(-(near**2) / (2 * SIGMA**2))
    weight = weight / weight.sum(dim=1, keepdim=True)
    return torch.zeros_like(dist).scatter_(1, index, weight)


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Class-rebalancing weights from the empirical ab prior ``(Q,)`` (counts or probabilities): the
    prior smoothed by a Gaussian of sigma ``SIGMA`` over the bins, mixed with the uniform by ``lam``,
    inverted, and scaled so that the expected weight under the smoothed prior is 1 (the paper's eq. 4)."""
    p = prior.double() / prior.double().sum()
    centres = bins(prior.device).double()
    kernel = torch.exp(-(torch.cdist(centres, centres) ** 2) / (2 * SIGMA**2))
    smooth = kernel @ p
    smooth = smooth / smooth.sum()
    w = 1.0 / ((1.0 - lam) * smooth + lam / len(p))
    return (w / (smooth * w).sum()).float()


def annealed_mean(probs: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """The ab that a distribution over the bins (``probs``, summing to 1 along ``dim``) decodes to: the
    mean of the distribution re-tempered to ``p^(1/T)``, renormalized. T = 1 is the mean; towards 0 it
    becomes the mode (the paper uses 0.38). Returns ab with ``dim`` of size 2."""
    if not temperature > 0:
        raise ValueError(f"the temperature must be above 0, got {temperature}")
    logp = torch.log(probs.clamp_min(1e-12)) / temperature
    tempered = torch.softmax(logp, dim=dim)
    centres = bins(probs.device).to(probs.dtype)  # (Q, 2)
    return torch.tensordot(tempered.movedim(dim, -1), centres, dims=1).movedim(-1, dim)
