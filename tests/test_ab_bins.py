"""Quantized ab for a classification head (Zhang et al. 2016): the bins, soft targets, class
rebalancing and annealed-mean decoding, on hand-made inputs whose answers are known."""

from __future__ import annotations

import pytest
import torch

from model import ab_bins
from model.lab import rgb8_to_lab


def _in_gamut_ab(n: int, seed: int = 0) -> torch.Tensor:
    """ab of ``n`` random 8-bit sRGB colours, ``(n, 2)``."""
    rgb = torch.randint(0, 256, (1, 3, 1, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return rgb8_to_lab(rgb)[0, 1:, 0].T


def test_the_bins_are_the_in_gamut_cells_of_a_10_grid() -> None:
    centres = ab_bins.bins()
    assert centres.shape[1] == 2 and 250 <= len(centres) <= 320  # 261 for sRGB; the paper's wider set has 313
    assert torch.equal(centres, torch.round(centres / 10) * 10) and centres.abs().max() <= 130
    assert len({tuple(c) for c in centres.tolist()}) == len(centres)
    assert (0.0, 0.0) in {tuple(c) for c in centres.tolist()}  # grey


def test_encoding_then_decoding_a_colour_lands_within_half_a_bin() -> None:
    ab = _in_gamut_ab(20_000)
    back = ab_bins.bins()[ab_bins.nearest(ab)]
    assert (back - ab).abs().max() <= ab_bins.GRID / 2 + 1e-4


def test_soft_targets_sum_to_one_over_the_five_nearest_bins() -> None:
    ab = _in_gamut_ab(500, seed=1)
    target = ab_bins.soft_encode(ab)
    assert target.shape == (500, len(ab_bins.bins()))
    assert torch.allclose(target.sum(1), torch.ones(500), atol=1e-6)
    assert ((target > 0).sum(1) == ab_bins.NEIGHBOURS).all()
    assert torch.equal(target.argmax(1), ab_bins.nearest(ab))  # the nearest bin weighs most


def test_rebalancing_weights_average_to_one_under_the_prior_and_favour_rare_colours() -> None:
    q = len(ab_bins.bins())
    prior = torch.ones(q)
    prior[ab_bins.nearest(torch.zeros(1, 2))] = 1000.0  # grey dominates, as in photos
    w = ab_bins.rebalance_weights(prior, lam=0.5)
    centres = ab_bins.bins().double()
    smooth = torch.exp(-(torch.cdist(centres, centres) ** 2) / (2 * ab_bins.SIGMA**2)) @ (prior.double() / prior.sum())
    smooth = smooth / smooth.sum()
    assert float((smooth * w.double()).sum()) == pytest.approx(1.0, abs=1e-6)
    assert w[ab_bins.nearest(torch.zeros(1, 2))] < w.median()  # the common colour is down-weighted
    assert torch.allclose(ab_bins.rebalance_weights(prior, lam=1.0), torch.ones(q))  # lam 1: no rebalancing


def test_annealed_mean_is_the_mean_at_t1_and_the_mode_as_t_goes_to_0() -> None:
    centres = ab_bins.bins()
    q = len(centres)
    picks = ab_bins.nearest(torch.tensor([[0.0, 0.0], [40.0, 20.0], [-30.0, 50.0]]))
    probs = torch.zeros(1, q)
    probs[0, picks] = torch.tensor([0.2, 0.5, 0.3])
    mean = (probs[0, picks, None] * centres[picks]).sum(0)
    assert torch.allclose(ab_bins.annealed_mean(probs, 1.0)[0], mean, atol=1e-4)
    assert torch.allclose(ab_bins.annealed_mean(probs, 0.01)[0], centres[picks[1]], atol=1e-3)
    t38 = ab_bins.annealed_mean(probs, 0.38)[0]
    assert (t38 - centres[picks[1]]).norm() < (mean - centres[picks[1]]).norm()  # between mean and mode
    maps = torch.zeros(2, q, 4, 4)
    maps[:, picks[2]] = 1.0  # a per-pixel distribution (B, Q, H, W) decodes to (B, 2, H, W)
    assert torch.allclose(ab_bins.annealed_mean(maps, 0.38), centres[picks[2]].view(1, 2, 1, 1).expand(2, 2, 4, 4))
    with pytest.raises(ValueError, match="above 0"):
        ab_bins.annealed_mean(probs, 0.0)


def test_the_rebalanced_loss_is_the_soft_cross_entropy_weighted_by_the_targets_bin() -> None:
    """Uniform weights (lambda 1) leave the plain cross-entropy with the soft targets; a prior where one
    colour dominates down-weights the pixels of that colour; targets are pooled to the logits' side."""
    centres = ab_bins.bins()
    q = len(centres)
    ab = torch.zeros(1, 2, 4, 4)
    ab[0, :, :, 2:] = torch.tensor([40.0, 20.0]).view(2, 1, 1)  # left half grey, right half a colour
    ab_norm = ab / 110
    logits = torch.randn(1, q, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = ab_bins.RebalancedLoss(centres, torch.ones(q), lam=1.0)(logits, ab_norm)
    target = ab_bins.soft_encode(ab.permute(0, 2, 3, 1).reshape(-1, 2)).view(1, 4, 4, q).permute(0, 3, 1, 2)
    expected = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(plain, expected, atol=1e-5)

    grey = ab_bins.nearest(torch.zeros(1, 2))
    prior = torch.ones(q)
    prior[grey] = 1000.0
    loss = ab_bins.RebalancedLoss(centres, prior, lam=0.5)
    per_pixel = -(target * torch.log_softmax(logits, 1)).sum(1)[0]
    w = ab_bins.rebalance_weights(prior, 0.5)
    assert torch.allclose(loss(logits, ab_norm), (w[target.argmax(1)[0]] * per_pixel).mean(), atol=1e-5)
    assert w[target.argmax(1)[0, 0, 0]] < w[target.argmax(1)[0, 0, 3]]  # grey pixels count less

    small = torch.randn(1, q, 2, 2, generator=torch.Generator().manual_seed(1))  # the head's S/2 logits
    pooled = torch.nn.functional.avg_pool2d(target, 2)
    assert torch.allclose(pooled.sum(1), torch.ones(1, 2, 2), atol=1e-6)  # a mixture: still sums to 1
    expected = -(pooled * torch.log_softmax(small, 1)).sum(1).mean()
    assert torch.allclose(ab_bins.RebalancedLoss(centres, torch.ones(q), lam=1.0)(small, ab_norm), expected, atol=1e-5)


def test_the_heads_starting_bias_predicts_the_smoothed_prior_and_rules_out_no_colour() -> None:
    q = len(ab_bins.bins())
    prior = torch.zeros(q)
    prior[ab_bins.nearest(torch.tensor([[0.0, 0.0], [20.0, 10.0]]))] = torch.tensor([700.0, 300.0])
    p = torch.softmax(ab_bins.prior_logits(prior), 0)
    assert torch.allclose(p.double(), 0.9999 * ab_bins.smoothed_prior(prior) + 1e-4 / q, atol=1e-6)
    assert p.min() > 0  # every colour stays reachable
    mean = ab_bins.annealed_mean(p[None], 1.0)[0]
    assert (mean - torch.tensor([6.0, 3.0])).norm() < 1.5  # the prior's own mean colour, not the gamut's
