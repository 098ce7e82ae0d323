"""The fusion variants: how one scale's ResNet and DenseNet features become one. The one table of them.

Each variant is either **projected** (each side brought to the block's width by a 1x1 conv + BN, then
merged element-wise by ``merge``, then ReLU) or not (the two concatenated on channels, then a 1x1
conv-BN-ReLU to the width). The settings (``train.variants``), the CLI's help, the network
(``model.colorizer.FusionBlock``) and the tests read this table; adding a variant is one entry here.

Light on purpose (no torch import): ``colorize --help`` lists the names. ``merge`` receives tensors and
uses only their methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    project: bool
    merge: Callable[[Any, Any], Any] | None = None  # (a, b) -> merged, same shape; None when not projected


VARIANTS: dict[str, Variant] = {
    "concat": Variant(project=False),
    "average": Variant(project=True, merge=lambda a, b: (a + b) * 0.5),
    "max": Variant(project=True, merge=lambda a, b: a.maximum(b)),
}


def names() -> tuple[str, ...]:
    """The variants' names, in the table's order (the default set to train)."""
    return tuple(VARIANTS)


def variant(name: str) -> Variant:
    """The named variant; a one-line ValueError naming the choices for any other name."""
    if name not in VARIANTS:
        raise ValueError(f"unknown fusion variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]
