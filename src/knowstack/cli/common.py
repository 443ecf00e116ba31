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
    """A percentage, `2%` (or a bare number from 1 up, read as percent); a bare fraction such as 0.02 is refused as
    ambiguous (2%? 0.02%?) rather than guessed."""
    written = text.strip()
    try:
        value = float(written.removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (e.g. 2%)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a loss limit is not negative")
    if not written.endswith("%") and 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{written} is ambiguous: write {value * 100:g}% for the fraction {written}, "
                                         f"or {written}% for {written} percent")
    return value

