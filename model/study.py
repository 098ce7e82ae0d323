"""The fusion study's statistics: per-variant mean +- std over training seeds, and paired comparisons of
variants on the same test images, each with a confidence interval.

The unit of comparison is the test image: every model is scored on the same images, so variant A and
variant B are compared image by image (paired), which removes the between-image spread (a hard photo is
hard for every model) from the comparison.

Decision rule: a **two-level paired bootstrap** of the mean difference. Each replicate resamples the
test images (with replacement) and, independently for each variant, its training seeds (with
replacement), then takes the mean over the resampled images of (A's mean over its resampled seeds minus
B's). The 95% interval is the 2.5th-97.5th percentile of the replicates; a difference is called
significant when the interval excludes zero. Why this and not only a Wilcoxon signed-rank test on the
seed-averaged images: with three seeds the training noise is often larger than the image noise, and a
test over images alone treats the seed average as fixed, which overstates confidence; the bootstrap
covers both sources and gives the effect size in the metric's own units. The Wilcoxon p-value over the
seed-averaged images is reported beside it as a second opinion (it ignores seed noise, so it is the
more lenient of the two).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# per_image[variant][seed] -> one value per test image, the same images in the same order for every model
PerImage = Mapping[str, Mapping[int | None, Sequence[float]]]


@dataclass(frozen=True)
class Aggregate:
    """One variant and one metric over its seeds: the mean of each seed's test mean, and their spread."""

    variant: str
    metric: str
    mean: float
    std: float  # sample standard deviation over seeds (ddof=1); 0 with one seed
    n_seeds: int
    per_seed: dict[int | None, float]


def aggregate(per_image: Mapping[int | None, Sequence[float]], variant: str, metric: str) -> Aggregate:
    seed_means = {seed: float(np.mean(values)) for seed, values in per_image.items()}
    values = np.array(list(seed_means.values()))
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return Aggregate(variant, metric, float(values.mean()), std, len(values), seed_means)


@dataclass(frozen=True)
class Comparison:
    """A minus B on one metric, paired by test image: the mean difference and its 95% interval."""

    a: str
    b: str
    metric: str
    mean_diff: float
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    n_images: int
    significant: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matrix(per_seed: Mapping[int | None, Sequence[float]]) -> np.ndarray:
    """(seeds, images) array; every seed must have scored the same images."""
    rows = [np.asarray(v, dtype=np.float64) for v in per_seed.values()]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("every seed of a variant must be scored on the same test images")
    return np.stack(rows)


BLOCK = 512  # replicates at a time: memory is BLOCK x images floats, whatever the test split's size


def bootstrap(ma: np.ndarray, mb: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The two-level bootstrap's replicates of mean(A) - mean(B), vectorized. A replicate draws n images
    and, for each side, k seeds with replacement; the mean over the drawn (seed, image) cells is
    ``w @ m @ c / (k n)`` with ``w`` and ``c`` the draw counts of each seed and each image, so a block of
    replicates is two matrix products instead of a Python loop of fancy-indexed copies. The draws come
    from ``default_rng(seed)`` in blocks (images, then A's seeds, then B's), so a seed gives the same
    replicates every time."""
    n = ma.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, BLOCK):
        b = min(BLOCK, n_boot - start)
        images = _counts(rng.integers(0, n, (b, n)), n)
        means = [
            ((_counts(rng.integers(0, m.shape[0], (b, m.shape[0])), m.shape[0]) @ m) * images).sum(1) / (m.shape[0] * n)
            for m in (ma, mb)
        ]
        out[start : start + b] = means[0] - means[1]
    return out


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """(replicates, draws) indices in [0, size) -> (replicates, size) counts of each index per row."""
    rows = np.arange(len(draws))[:, None] * size
    return np.bincount((draws + rows).ravel(), minlength=len(draws) * size).reshape(len(draws), size).astype(float)


def paired(
    a: Mapping[int | None, Sequence[float]],
    b: Mapping[int | None, Sequence[float]],
    names: tuple[str, str],
    metric: str,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> Comparison:
    """A - B, paired by image; see the module docstring for the bootstrap and why."""
    from scipy.stats import wilcoxon

    ma, mb = _matrix(a), _matrix(b)
    if ma.shape[1] != mb.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} were scored on different numbers of test images")
    n = ma.shape[1]
    diff = ma.mean(0) - mb.mean(0)  # per image, each side averaged over its seeds
    boot = bootstrap(ma, mb, n_boot, seed)
    tail = (1 - level) / 2 * 100
    low, high = (float(x) for x in np.percentile(boot, [tail, 100 - tail]))
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return Comparison(*names, metric, float(diff.mean()), low, high, p, n, not (low <= 0.0 <= high))


def compare_all(
    per_image: Mapping[str, PerImage], variants: Sequence[str], baseline: str, metrics: Sequence[str]
) -> list[Comparison]:
    """Every pair of variants, and every variant against the baseline, on each metric that has numbers."""
    out = []
    pairs = [*itertools.combinations(variants, 2), *((v, baseline) for v in variants)]
    for metric in metrics:
        for a, b in pairs:
            pa, pb = per_image[metric][a], per_image[metric][b]
            if any(not math.isfinite(x) for s in (*pa.values(), *pb.values()) for x in s):
                continue  # a missing metric (LPIPS offline) or a diverged model: no interval to give
            out.append(paired(pa, pb, (a, b), metric))
    return out
