"""The wording of printed lines: counts with their noun in the right number, and numbers as a reader wants them.

Light on purpose (standard library only): the scripts use it before any heavy import.
"""

from __future__ import annotations

from typing import Any


def counted(count: float, noun: str, plural: str | None = None) -> str:
    """`count` and `noun`, in the plural unless `count` is 1: "1 epoch", "2 epochs", "0.5 epochs", "1 batch"."""
    number = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{number} {noun if count == 1 else plural or noun + 's'}"


def format_number(value: Any) -> str:
    """A float as printed lines show a loss or an accuracy, to 4 decimals ("0.8371"); anything else as it is."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)
