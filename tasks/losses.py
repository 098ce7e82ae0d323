"""The train stage's losses: what a step minimizes, chosen by the train section (``train.head``,
``train.loss``, ``train.colour_weight``, ``train.rebalance``). A module of its own because the choice is
the settings' and the numerics are the model's (model.metrics, model.lab, model.ab_bins), while the
step (tasks.train_step) only calls a :data:`Criterion`; tests and benches build a loss without a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from model import ab_bins
from model.lab import lab_norm_to_rgb
from model.metrics import colorfulness_torch
from tasks.settings.train import Settings

# (the network's raw output: ab or logits, true ab, L) -> loss
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def criterion(s: Settings, prepared: Mapping[str, Any], bins: torch.Tensor | None) -> Criterion:
    """The run's loss: the regression head's (:func:`loss_fn`), or the classification head's rebalanced
    cross-entropy with the weights made from the train split's ab prior (recorded by prepare)."""
    if s.head == "regression" or bins is None:
        return loss_fn(s.loss, s.colour_weight)
    return ab_bins.RebalancedLoss(bins, torch.tensor(prepared["ab_prior"]["counts"]), s.rebalance)


def loss_fn(kind: str, colour_weight: float = 0.5) -> Criterion:
    """The training loss on normalized ab. ``mse+colourfulness`` adds the per-image gap between the
    prediction's and the truth's colourfulness (Hasler & Suesstrunk, on RGB rebuilt with the true L),
    in units of 100, times ``colour_weight``: plain MSE is minimized by the conditional mean of ab, which
    for an ambiguous object is a desaturated brown (the sepia look); the gap term charges exactly that.
    DDColor's colourfulness loss pushes colourfulness up without a target; with the truth at hand the
    gap is the supervised form of it, and cannot be lowered by over-saturating."""
    mse, l1 = torch.nn.functional.mse_loss, torch.nn.functional.l1_loss
    if kind == "mse+colourfulness":

        def mse_colour(pred: torch.Tensor, true: torch.Tensor, l_norm: torch.Tensor) -> torch.Tensor:
            l_norm = l_norm.float().contiguous()
            gap = colorfulness_torch(lab_norm_to_rgb(l_norm, pred)) - colorfulness_torch(lab_norm_to_rgb(l_norm, true))
            return mse(pred, true) + colour_weight * gap.abs().mean() / 100.0

        return mse_colour
    plain = {"mse": mse, "l1": l1, "mse+l1": lambda p, t: mse(p, t) + l1(p, t)}[kind]
    return lambda pred, true, _l: plain(pred, true)
