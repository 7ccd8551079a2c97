"""argparse types for numeric flags, each with its range: a bad value is refused by
argparse (exit 2, the flag named) instead of being used or silently replaced."""

from __future__ import annotations

import argparse
import math


def whole(low: int, high: int):
    """A type for a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {value}")
        return value

    parse.__name__ = "whole number"     # argparse names the type by it in its messages
    return parse


def number(low: float, high: float, low_open: bool = False):
    """A type for a finite number in [low, high] ((low, high] with low_open)."""
    bounds = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value

    parse.__name__ = "number"
    return parse
