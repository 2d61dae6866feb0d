"""Rates with 95% Wilson intervals and the exact McNemar test for paired comparisons."""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(successes: int, total: int) -> dict:
    """{"rate", "ci95", "n", "k"}; rate is None for an empty sample."""
    low, high = wilson_interval(successes, total)
    return {"rate": successes / total if total else None, "ci95": [round(low, 4), round(high, 4)],
            "k": successes, "n": total}


def mcnemar_exact(before: list[bool], after: list[bool]) -> dict:
    """Exact two-sided McNemar test on paired outcomes: counts of items that flipped each way."""
    if len(before) != len(after):
        raise ValueError("paired outcomes must have equal length")
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    n = gained + lost
    if n == 0:
        return {"gained": 0, "lost": 0, "p_value": 1.0}
    tail = sum(math.comb(n, k) for k in range(0, min(gained, lost) + 1)) / 2**n
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}
