"""The 95 % intervals that go with every logged accuracy, under the layout's names."""

from __future__ import annotations

from pipeline.stats import accuracy_interval
from tracking import layout


def interval_metrics(val_accuracy: float | None, validation_size: int, test_accuracy: float | None,
                     test_size: int) -> dict[str, float]:
    """``val_accuracy_low/high`` and ``test_accuracy_low/high`` (Wilson, 95 %); a split without images gives none."""
    out: dict[str, float] = {}
    for (low_name, high_name), accuracy, n in (
            ((layout.VAL_ACCURACY_LOW, layout.VAL_ACCURACY_HIGH), val_accuracy, validation_size),
            ((layout.TEST_ACCURACY_LOW, layout.TEST_ACCURACY_HIGH), test_accuracy, test_size)):
        low, high = accuracy_interval(accuracy, n)
        if low == low:  # not NaN
            out[low_name], out[high_name] = low, high
    return out


def interval_text(low: float, high: float) -> str:
    """``[0.915, 0.955]``, or empty when unknown."""
    return "" if low != low or high != high else f"[{low:.3f}, {high:.3f}]"
