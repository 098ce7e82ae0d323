"""The prepared-sample format, next to model.lab's constants: one ``lab.npy`` per sample, float16,
channels first ``(3, S, S)`` holding ``L/100`` and ``ab/110``.

6 bytes per pixel (24,704 bytes per 64x64 sample with the npy header), read straight into tensors by the
training loop. float16 keeps ab to about 0.03 Lab units, far below what the eye or the loss can see,
and the Lab conversion is paid once in the prepare stage, not per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.lab import normalize, rgb8_to_lab
from storage.shards import decode_npy, encode_npy, iter_samples

FIELD = "lab.npy"
DESCRIPTION = "lab.npy float16 (3,S,S): L/100, a/110, b/110"
NPY_HEADER = 128


def bytes_per_sample(size: int) -> int:
    return 3 * size * size * 2 + NPY_HEADER


def encode_batch(rgb: torch.Tensor) -> tuple[torch.Tensor, list[bytes]]:
    """uint8 RGB ``(B,3,S,S)`` -> (its Lab, for statistics; one encoded sample field per image)."""
    lab = rgb8_to_lab(rgb)
    l_norm, ab_norm = normalize(lab)
    packed = torch.cat((l_norm, ab_norm), dim=1).to(torch.float16).numpy()
    return lab, [encode_npy(arr) for arr in packed]


def decode_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared sample -> (L/100 of shape (1,S,S), ab/110 of shape (2,S,S)) as float32 tensors."""
    arr = torch.from_numpy(decode_npy(sample[FIELD]).astype(np.float32))
    return arr[:1], arr[1:]


def decode_sample16(sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_sample` in the stored float16, for the training loader: half the bytes to pin and
    copy, made float32 on the training device (the same numbers)."""
    arr = torch.from_numpy(decode_npy(sample[FIELD]).astype(np.float16, copy=False))
    return arr[:1], arr[1:]


def first_batch(shards: list[Path], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of ``shards`` in file order, stacked: the fixed images of preview grids."""
    samples = [decode_sample(s) for _, s in zip(range(n), iter_samples(shards), strict=False)]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
