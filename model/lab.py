"""CIE Lab (D65, 2 degree observer) conversion and the model's normalization, batched in torch.

This module is the single owner of the Lab constants: every stage (prepare, train, evaluate, inference)
goes through it, so the normalization cannot drift between notebooks as it did in the original project.

Layout: channels first, ``(..., 3, H, W)``; any leading batch dimensions. The formulas follow
``skimage.color.rgb2lab`` / ``lab2rgb`` exactly (same matrix, same white point, same piecewise branches,
same clipping of negative Z and of out-of-gamut RGB), so results agree to well under 1e-3.

Normalization: ``L / 100`` in [0, 1] is the model input; ``ab / 110`` is the target, about [-1, 1], which
matches the decoder's tanh. 110 covers the sRGB gamut's ab range (about -86..98 for a, -108..95 for b).
"""

from __future__ import annotations

import functools

import torch

L_SCALE = 100.0
AB_SCALE = 110.0

# sRGB (D65) -> XYZ, as in skimage.color.colorconv.xyz_from_rgb
_XYZ_FROM_RGB = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)

# Lab -> XYZ and XYZ -> Lab matrices with the white point folded in (row = output channel).
_LAB_FROM_XYZ = _XYZ_FROM_RGB / _WHITE_D65[:, None]  # rgb_linear -> xyz / white
_XYZ_FROM_LAB_WHITE = _RGB_FROM_XYZ * _WHITE_D65[None, :]  # (xyz / white) -> rgb_linear


def _srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    return torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)


def _linear_to_srgb(lin: torch.Tensor) -> torch.Tensor:
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308).pow(1 / 2.4) - 0.055, lin * 12.92)


# 8-bit inputs have only 256 possible values per channel: the sRGB curve becomes a table lookup.
_LINEAR_LUT_8BIT = _srgb_to_linear(torch.arange(256, dtype=torch.float64) / 255.0).to(torch.float32)


@functools.cache
def _placed(matrix: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A colour matrix copied once per dtype and device: a copy per call would be a host-to-device
    transfer inside a captured CUDA graph (the training loss's colourfulness term converts to RGB).
    Made outside inference mode: a copy first made under ``torch.inference_mode`` (an evaluation) and
    kept would refuse to take part in a later loss's backward pass."""
    with torch.inference_mode(False):
        return matrix.to(dtype=dtype, device=device, copy=True)


def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 colour matrix over the channel axis (-3) of ``(..., 3, H, W)``."""
    return torch.einsum("ij,...jhw->...ihw", _placed(matrix, x.dtype, x.device), x)


def _linear_to_lab(lin: torch.Tensor) -> torch.Tensor:
    t = _mix(_LAB_FROM_XYZ, lin)
    f = torch.where(t > 0.008856, t.clamp_min(0.008856).pow(1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)


def _check_channels(x: torch.Tensor) -> None:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected a (..., 3, H, W) tensor, got shape {tuple(x.shape)}")


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (float) or uint8 -> Lab with L in [0, 100]."""
    _check_channels(rgb)
    if rgb.dtype == torch.uint8:
        return rgb8_to_lab(rgb)
    return _linear_to_lab(_srgb_to_linear(rgb))


def rgb8_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 sRGB -> float32 Lab, with the sRGB curve as a 256-entry table (the prepare stage's path)."""
    _check_channels(rgb)
    lin = _LINEAR_LUT_8BIT.to(rgb.device)[rgb.long()]
    return _linear_to_lab(lin)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab -> sRGB in [0, 1]; negative Z and out-of-gamut RGB are clipped as skimage.color.lab2rgb does."""
    _check_channels(lab)
    L, a, b = lab.unbind(dim=-3)
    fy = (L + 16.0) / 116.0
    f = torch.stack((a / 500.0 + fy, fy, (fy - b / 200.0).clamp_min(0.0)), dim=-3)
    t = torch.where(f > 0.2068966, f.pow(3), (f - 16.0 / 116.0) / 7.787)
    lin = _mix(_XYZ_FROM_LAB_WHITE, t)
    return _linear_to_srgb(lin).clamp(0.0, 1.0)


def normalize(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lab -> (model input L/100 of shape (..., 1, H, W), target ab/110 of shape (..., 2, H, W))."""
    return lab[..., :1, :, :] / L_SCALE, lab[..., 1:, :, :] / AB_SCALE


def denormalize(l_norm: torch.Tensor, ab_norm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: (L/100, ab/110) -> Lab."""
    return torch.cat((l_norm * L_SCALE, ab_norm * AB_SCALE), dim=-3)


def lab_norm_to_rgb(l_norm: torch.Tensor, ab_norm: torch.Tensor) -> torch.Tensor:
    """Normalized L and ab -> sRGB in [0, 1]: how every stage rebuilds a colour image."""
    return lab_to_rgb(denormalize(l_norm.float(), ab_norm.float()))
