"""The scaling study's statistics: a cell's mean and sample std, the paired gain's 95% t-interval, the least-squares
slope of the gain against log2(encoder parameters) with its 95% interval, and whether a curve has plateaued.

No scipy: the t quantile is found by bisection on the Student-t distribution function, which has a closed form for an
integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

CONFIDENCE = 0.95
PLATEAU_POINTS = 0.5  # the protocol: less than this change (top-1 points) over the last quarter of the epochs


def t_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` degrees of freedom (A&S 26.7.3 odd df, 26.7.4 even df)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) (1 + cos^2/2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    # 2/pi (theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
    term, total = 1.0, 1.0 if df > 1 else 0.0
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided critical value: P(|T| <= t) = confidence."""
    low, high = 0.0, 1e3
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_within(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def cell(percents: Sequence[float]) -> dict[str, Any]:
    """Top-1 (%) of several seeds: the values, their mean and sample standard deviation (n - 1; None for one seed)."""
    std = statistics.stdev(percents) if len(percents) > 1 else None
    return {"values": list(percents), "n": len(percents), "mean": statistics.fmean(percents), "std": std}


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean with its 95% t-interval (None bounds below two values)."""
    summary = cell(values)
    if summary["std"] is None:
        return {**summary, "low": None, "high": None}
    half = t_quantile(len(values) - 1) * summary["std"] / math.sqrt(len(values))
    return {**summary, "low": summary["mean"] - half, "high": summary["mean"] + half}


def slope_interval(x: Sequence[float], y: Sequence[float]) -> dict[str, Any] | None:
    """Least-squares slope of y on x with its 95% t-interval (n - 2 degrees of freedom); None below 3 points or 2
    distinct x."""
    n = len(x)
    if n < 3 or len(set(x)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((xi - mean_x) ** 2 for xi in x)
    slope = sum((xi - mean_x) * (yi - mean_y) for xi, yi in zip(x, y, strict=True)) / sxx
    residuals = [yi - mean_y - slope * (xi - mean_x) for xi, yi in zip(x, y, strict=True)]
    half = t_quantile(n - 2) * math.sqrt(sum(r * r for r in residuals) / (n - 2) / sxx)
    return {"slope": slope, "low": slope - half, "high": slope + half, "n": n}


def last_quarter_change(accuracies: Sequence[float]) -> float:
    """|top-1 after the last epoch - top-1 after epoch floor(3/4 x epochs)|, in the accuracies' unit."""
    if len(accuracies) < 2:
        return math.nan
    return abs(accuracies[-1] - accuracies[max(len(accuracies) * 3 // 4, 1) - 1])
