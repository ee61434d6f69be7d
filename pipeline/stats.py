"""How far an accuracy measured on n images can be trusted: Wilson score intervals and the "tied" rule.

An accuracy of 0.938 on 550 validation images is 516 right out of 550; another sample of 550 would
give a different count. The Wilson score interval (95 %: z = 1.96) says which true accuracies are
compatible with the count; unlike the "normal" interval p ± z·sqrt(p(1-p)/n) it stays inside [0, 1]
and is right near 0 and 1, where good classifiers live.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal: a two-sided 95 % interval


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n``; ``(nan, nan)`` when n is 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct!r}")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float | None, n: int | None, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval of an accuracy measured on ``n`` examples (its count of right answers is rounded
    back from the accuracy); ``(nan, nan)`` when either is unknown."""
    if accuracy is None or n is None or not n or math.isnan(float(accuracy)) or math.isnan(float(n)):
        return float("nan"), float("nan")
    n = int(n)
    return wilson_interval(min(max(round(float(accuracy) * n), 0), n), n, z)


def tied(best_accuracy: float, best_n: int, accuracy: float) -> bool:
    """Whether ``accuracy`` is statistically tied with the best: it lies inside the best's 95 % Wilson
    interval (measured on the same ``best_n`` validation images), so the data cannot tell them apart."""
    low, _ = accuracy_interval(best_accuracy, best_n)
    return not math.isnan(low) and not math.isnan(float(accuracy)) and float(accuracy) >= low - 1e-12
