"""The study's statistics on hand-made per-image tables whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from model.lab import lab_norm_to_rgb
from model.metrics import colorfulness, colorfulness_torch
from model.study import aggregate, compare_all, paired
from tasks import train


def test_aggregate_is_the_mean_and_sample_std_of_the_seeds_test_means() -> None:
    agg = aggregate({0: [1.0, 1.0], 1: [2.0, 2.0], 2: [2.0, 4.0]}, "max", "rgb_mse")
    assert agg.per_seed == {0: 1.0, 1: 2.0, 2: 3.0}
    assert (agg.mean, agg.std, agg.n_seeds) == (2.0, 1.0, 3)
    assert aggregate({7: [0.5, 1.5]}, "max", "rgb_mse").std == 0.0  # one seed: no spread to report


def test_a_constant_shift_on_every_image_is_significant_with_a_zero_width_interval() -> None:
    b = {s: [0.1 * i for i in range(12)] for s in (0, 1, 2)}
    a = {s: [x + 0.01 for x in b[s]] for s in (0, 1, 2)}
    c = paired(a, b, ("concat", "max"), "rgb_mse", n_boot=2000)
    assert c.mean_diff == pytest.approx(0.01)
    assert c.ci_low == pytest.approx(0.01) and c.ci_high == pytest.approx(0.01)
    assert c.significant and c.n_images == 12
    assert c.p_wilcoxon == pytest.approx(2 / 2**12)  # exact: all 12 differences positive


def test_differences_that_cancel_out_are_not_significant() -> None:
    b = {0: [0.5] * 20}
    a = {0: [0.5 + (0.01 if i % 2 else -0.01) for i in range(20)]}
    c = paired(a, b, ("average", "max"), "rgb_mse", n_boot=2000)
    assert c.mean_diff == pytest.approx(0.0, abs=1e-12)
    assert c.ci_low < 0 < c.ci_high and not c.significant
    assert c.p_wilcoxon > 0.5


def test_seed_noise_widens_the_interval_where_a_test_over_images_alone_is_fooled() -> None:
    """A is better than B by +0.0067 on every image on average over seeds, but one of A's three seeds
    is 0.08 worse than B and another 0.10 better: which seeds were drawn decides the sign. Wilcoxon over
    the seed-averaged images sees 30 identical positive differences; the bootstrap over seeds does not
    call it."""
    b = {s: [1.0] * 30 for s in (0, 1, 2)}
    a = {0: [1.0] * 30, 1: [1.10] * 30, 2: [0.92] * 30}
    c = paired(a, b, ("concat", "max"), "ssim", n_boot=4000)
    assert c.mean_diff == pytest.approx(0.02 / 3)
    assert c.p_wilcoxon < 1e-6
    assert c.ci_low < 0 < c.ci_high and not c.significant
    assert c.ci_low >= -0.08 - 1e-12 and c.ci_high <= 0.10 + 1e-12  # within what seed draws can give


def test_models_scored_on_different_images_are_refused() -> None:
    with pytest.raises(ValueError, match="different numbers of test images"):
        paired({0: [1.0, 2.0]}, {0: [1.0]}, ("a", "b"), "rgb_mse")
    with pytest.raises(ValueError, match="same test images"):
        paired({0: [1.0, 2.0], 1: [1.0]}, {0: [1.0, 2.0]}, ("a", "b"), "rgb_mse")


def test_compare_all_covers_every_pair_and_the_baseline_and_skips_missing_metrics() -> None:
    per_image = {
        "rgb_mse": {
            "concat": {0: [0.2, 0.3], 1: [0.25, 0.3]},
            "max": {0: [0.1, 0.2], 1: [0.1, 0.25]},
            "gray": {None: [0.4, 0.5]},
        },
        "lpips": {
            "concat": {0: [math.nan] * 2, 1: [math.nan] * 2},
            "max": {0: [math.nan] * 2, 1: [math.nan] * 2},
            "gray": {None: [math.nan] * 2},
        },
    }
    out = compare_all(per_image, ["concat", "max"], "gray", ["rgb_mse", "lpips"])
    assert [(c.a, c.b, c.metric) for c in out] == [
        ("concat", "max", "rgb_mse"),
        ("concat", "gray", "rgb_mse"),
        ("max", "gray", "rgb_mse"),
    ]


# ------------------------------------------------------------------ the colourfulness term of the loss
def test_the_differentiable_colourfulness_is_the_metric() -> None:
    rgb = torch.rand(3, 3, 16, 16)
    want = [colorfulness(img.permute(1, 2, 0).double().numpy()) for img in rgb]
    assert colorfulness_torch(rgb).tolist() == pytest.approx(want, rel=1e-4)


def test_the_colourfulness_term_charges_a_desaturated_prediction_and_pulls_it_towards_the_truth() -> None:
    torch.manual_seed(0)
    l_norm = torch.full((2, 1, 16, 16), 0.6)
    true = torch.stack([torch.full((16, 16), 0.4), torch.full((16, 16), -0.3)])[None].repeat(2, 1, 1, 1)
    true = true + 0.1 * torch.randn_like(true)
    mse, colour = train.loss_fn("mse"), train.loss_fn("mse+colourfulness", colour_weight=0.5)
    grey = torch.zeros_like(true)
    assert colour(grey, true, l_norm) > mse(grey, true, l_norm)  # the sepia answer costs more
    assert colour(true, true, l_norm) == pytest.approx(0.0, abs=1e-3)  # the truth costs nothing extra
    pred = (0.1 * true).requires_grad_()  # dull, right hue
    colour(pred, true, l_norm).backward()
    step = pred - 0.5 * pred.grad
    rgb = lab_norm_to_rgb(l_norm, step.detach())
    before = colorfulness_torch(lab_norm_to_rgb(l_norm, pred.detach()))
    assert (colorfulness_torch(rgb) > before).all()


def test_the_vectorized_bootstrap_is_the_two_level_resampling_replicate_by_replicate() -> None:
    """Each replicate of model.study.bootstrap equals the plain computation on the same draws: the mean
    over the drawn images of A's mean over its drawn seeds minus B's; and a seed gives the same replicates
    every time (the study's intervals are reproducible)."""
    import numpy as np

    from model import study

    rng = np.random.default_rng(5)
    ma, mb = rng.random((3, 40)), rng.random((2, 40))
    n_boot = study.BLOCK + 100  # two blocks, the second partial
    got = study.bootstrap(ma, mb, n_boot, seed=7)
    draws, want = np.random.default_rng(7), []
    for start in range(0, n_boot, study.BLOCK):
        b = min(study.BLOCK, n_boot - start)
        images = draws.integers(0, 40, (b, 40))
        sa, sb = draws.integers(0, 3, (b, 3)), draws.integers(0, 2, (b, 2))
        want += [ma[np.ix_(sa[r], images[r])].mean() - mb[np.ix_(sb[r], images[r])].mean() for r in range(b)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert np.array_equal(got, study.bootstrap(ma, mb, n_boot, seed=7))
    assert not np.array_equal(got, study.bootstrap(ma, mb, n_boot, seed=8))
