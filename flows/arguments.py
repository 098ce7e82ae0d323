"""The command-line contract shared by ``colorize`` and the benchmark scripts (bench/): a parser whose
usage errors are one line and exit status 2, and the argument types that check a value where it is
typed (a whole number of at least 1, a network input side, a vividness, a comma list of sides or
batches), so a mistake is refused before any work and never reaches a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from storage.errors import ConfigError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own usage errors: one line, exit 2
        self.exit(ConfigError.exit_code, f"error: {message} (see {self.prog} --help)\n")


def usage_error(message: str) -> NoReturn:
    """A mistake found after parsing (a device that is not there, a model that cannot be loaded): one
    line on stderr, exit 2, as argparse's own."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(ConfigError.exit_code)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def batch(text: str) -> int:
    """A training batch: BatchNorm needs at least 2 images."""
    value = positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (BatchNorm), got {value}")
    return value


def side(text: str) -> int:
    from model.choices import side_problem

    value = positive(text)
    if problem := side_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def vividness(text: str) -> float:
    from model.choices import vividness_problem

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if problem := vividness_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def comma_list(item: Callable[[str], int]) -> Callable[[str], list[int]]:
    """A type for ``a,b,c``, each checked as ``item`` checks one."""

    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
        return [item(p) for p in parts]

    return parse
