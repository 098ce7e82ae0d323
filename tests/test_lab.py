"""Lab conversion agrees with scikit-image, both directions, batched, including out-of-gamut clipping."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage import color, data

from model.lab import AB_SCALE, L_SCALE, denormalize, lab_to_rgb, normalize, rgb8_to_lab, rgb_to_lab


def _chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def _hwc(x: torch.Tensor) -> np.ndarray:
    return np.moveaxis(x.numpy(), -3, -1)


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
def test_rgb_to_lab_matches_skimage_on_real_photos(photo: str) -> None:
    rgb = getattr(data, photo)()
    expected = color.rgb2lab(rgb)
    assert np.abs(_hwc(rgb8_to_lab(_chw(rgb))) - expected).max() < 1e-3  # the uint8 table path
    assert np.abs(_hwc(rgb_to_lab(_chw(rgb).double() / 255)) - expected).max() < 1e-3


def test_batched_conversion_equals_per_image_conversion() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    lab = _hwc(rgb_to_lab(_chw(batch)))
    for i in range(5):
        assert np.abs(lab[i] - color.rgb2lab(batch[i])).max() < 1e-3


def test_lab_to_rgb_matches_skimage_including_out_of_gamut() -> None:
    rng = np.random.default_rng(1)
    # Whole Lab box, far beyond the sRGB gamut: exercises the negative-Z and [0,1] clipping branches.
    lab = np.stack(
        [rng.uniform(0, 100, (40, 40)), rng.uniform(-128, 127, (40, 40)), rng.uniform(-128, 127, (40, 40))], -1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about the negative Z values it clips
        expected = color.lab2rgb(lab)
    got = _hwc(lab_to_rgb(_chw(lab)))
    assert np.abs(got - expected).max() < 1e-3
    assert got.min() >= 0 and got.max() <= 1


def test_round_trip_recovers_the_photo() -> None:
    rgb = data.astronaut()[::4, ::4]
    back = _hwc(lab_to_rgb(rgb_to_lab(_chw(rgb).double() / 255)))
    assert np.abs(back * 255 - rgb).max() < 0.01


def test_normalization_scales_and_inverts() -> None:
    lab = rgb_to_lab(_chw(data.coffee()[::8, ::8]).double() / 255)
    l_norm, ab_norm = normalize(lab)
    assert l_norm.shape[-3] == 1 and ab_norm.shape[-3] == 2
    assert l_norm.min() >= 0 and l_norm.max() <= 1
    assert ab_norm.abs().max() <= 1  # the decoder's tanh range covers every sRGB colour
    assert torch.allclose(denormalize(l_norm, ab_norm), lab)
    assert (L_SCALE, AB_SCALE) == (100.0, 110.0)


def test_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="3, H, W"):
        rgb_to_lab(torch.zeros(1, 4, 8, 8))
