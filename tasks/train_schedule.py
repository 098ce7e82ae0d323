"""The train stage's learning-rate schedule: the rate for a global batch (:func:`peak_lr`) and the rate
at each step (:func:`lr_at`: warm-up, then constant or cosine). A module of its own because the rate is
a pure function of the settings and the step (no torch), read where the optimizer is made
(tasks.train_state), after every step (tasks.train_loop), and by the tests.
"""

from __future__ import annotations

import math

from tasks.settings.train import Settings


def peak_lr(s: Settings, batch: int) -> float:
    """The rate for this run's global batch: ``train.lr`` is stated for ``train.lr_batch`` images, and a
    larger batch averages away gradient noise, so it can take a larger step. ``sqrt``: lr x sqrt(batch /
    lr_batch), the rule derived for Adam (Malladi et al., NeurIPS 2022: the square-root scaling rule keeps
    Adam's SDE the same; Krizhevsky 2014 argued it first). ``linear``: lr x batch / lr_batch, the rule for
    SGD (Goyal et al. 2017), which needs its warm-up. Example: the demo's 3e-4 at 16 images is 1.2e-3 at
    256 with ``sqrt``."""
    ratio = batch / s.lr_batch
    return s.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[s.lr_scaling]


def plan_warnings(s: Settings, n_train: int, batch: int, total: int) -> list[str]:
    """What a run is about to do that its settings did not say (logged as warnings, and the batch used is
    recorded in the manifest): a ``train.batch_size`` above the train split, trained at the split's size
    instead; a ``train.warmup_steps`` at or past the run's last step, so the rate never reaches its peak."""
    notes = []
    if batch < s.batch_size:
        notes.append(
            f"train.batch_size={s.batch_size} is more than the train split can fill ({n_train} images): "
            f"training on batches of {batch} (the manifest's batch_size)"
        )
    if s.warmup_steps >= total > 0:
        peak = peak_lr(s, batch)
        last = lr_at(s, total - 1, total, peak)
        notes.append(
            f"train.warmup_steps={s.warmup_steps} is not shorter than the run ({total} steps): the rate never "
            f"reaches its peak {peak:.3g} and ends at {last:.3g}; lower train.warmup_steps"
        )
    return notes


def lr_at(s: Settings, step: int, total: int, peak: float | None = None) -> float:
    """The learning rate for the step after ``step``: a pure function of the step, so a resumed run needs
    nothing saved beyond the optimizer. A linear warm-up to ``peak`` over ``warmup_steps`` (a large batch's
    scaled rate is unstable on the first, untrained steps: Goyal et al. 2017), then constant or
    cosine-annealed to 0 at ``total``. Cosine annealing ends near 0, where the weights stop moving:
    without it, the last epoch's noise (validation MSE moving by up to 41% from one epoch to the next on the
    photo corpus) decides which model is kept."""
    peak = s.lr if peak is None else peak
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return peak
    done, span = min(step, total) - s.warmup_steps, max(1, total - s.warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * done / span))
