"""Checks of user-supplied values: each returns the value normalised or raises a ValueError naming it."""

from __future__ import annotations

import math

import numpy as np


def integer(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (either bound optional); bools are not integers."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            expected = "a positive integer" if low == 1 else f"an integer >= {low}"
        elif low is None:
            expected = f"an integer <= {high}"
        else:
            expected = f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def positive_int(value, name: str) -> int:
    """`value` as an int >= 1."""
    return integer(value, name, low=1)


def number(value, name: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the given interval (bounds optional, closed unless *_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value
