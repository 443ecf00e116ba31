"""What every command group shares: the console and the option types of percentages and score points."""

from __future__ import annotations

import argparse

from rich.console import Console

# soft_wrap: a message is one line whatever the terminal (or none) is, so logs and tests can grep it;
# only tables, meant for the eye, take the terminal's width.
console = Console(stderr=True, soft_wrap=True)


def points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of score points: {text!r} (e.g. 0.02)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("an allowance is not negative")
    return value


def percent(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (e.g. 2%)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a loss limit is not negative")
    return value

