"""What a user chooses among, and within, when running a model: engines, devices, arithmetic, the
default model, image and network-input bounds. One owner for each, and light (no torch import): the
CLI's help lists them without loading a network.
"""

from __future__ import annotations

ENGINES = ("auto", "torch", "onnx")  # auto: onnxruntime on a CPU when the version has its ONNX export
DEVICES = ("auto", "cpu", "cuda")  # auto: a GPU when one is visible, else the CPU
PRECISIONS = ("fp32", "bf16")  # the torch engine's arithmetic
UPSCALE_BACKENDS = ("auto", "torch", "ncnn")  # auto: torch on a GPU, else ncnn when installed, else torch
DEFAULT_MODEL = "models:/colorizer@champion"  # what `colorize image|video|app|serve` run without --model
SIDE_MULTIPLE = 32  # the encoders' five stride-2 stages: a network input side is a multiple of this
MAX_SIDE = 2048  # the largest network input the pipeline trains at (prepare.image_size); 8192 needs ~100 GB


def side_problem(side: int) -> str | None:
    """Why ``side`` cannot be a network input side, or None."""
    if side < SIDE_MULTIPLE or side % SIDE_MULTIPLE or side > MAX_SIDE:
        return f"must be a multiple of {SIDE_MULTIPLE} up to {MAX_SIDE}, got {side}"
    return None


HINT_MODES = ("off", "local", "local+global")  # what a model takes besides L: nothing, points, points + a palette
MAX_POINTS = 256  # the most hint points a request, a file, the page or the evaluation's curve may carry
HINT_CURVE = (0, 1, 2, 5, 10, 20, 50)  # the evaluation's numbers of points (Zhang'17's sweep's counts)
HEADS = ("regression", "classification")  # ab directly (MSE-trained), or a distribution over quantized ab
DEFAULT_VIVIDNESS = 0.38  # the annealed-mean temperature a classification model decodes at (Zhang et al.'s)
# The annealed-mean temperature's range. Higher is more colour: 1 decodes the distribution's mean, and
# towards 0.01 its most likely bin, which for a broad distribution (what the models trained here predict
# over most of a photo) is the grey one (docs/vivid.md).
VIVIDNESS_RANGE = (0.01, 1.0)


def vividness_problem(value: float) -> str | None:
    """Why ``value`` cannot be a decoding temperature, or None."""
    low, high = VIVIDNESS_RANGE
    if not low <= value <= high:  # also refuses NaN
        return (
            f"must be between {low:g} and {high:g} (higher: more colour; 1: the distribution's mean; "
            f"{DEFAULT_VIVIDNESS:g} is the paper's), got {value:g}"
        )
    return None
