"""Wilson score intervals against known values, and the rule that marks trials tied with the best."""

import math

import pytest

from pipeline.stats import Z95, accuracy_interval, tied, wilson_interval


@pytest.mark.parametrize("correct, n, low, high", [
    (8, 10, 0.4902, 0.9433),  # the textbook example (Wilson 1927; e.g. Newcombe 1998, Table II)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),  # Newcombe 1998, example (a): 81/263
    (15, 148, 0.0624, 0.1605),  # Newcombe 1998, example (b): 15/148
])
def test_wilson_interval_known_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_endpoints_are_where_the_score_test_just_rejects():
    # The interval is the set of p with |p_hat - p| <= z * sqrt(p (1 - p) / n): the endpoints solve it exactly.
    for correct, n in ((516, 550), (3, 7), (330, 367)):
        p_hat = correct / n
        for p in wilson_interval(correct, n):
            assert abs(p_hat - p) == pytest.approx(Z95 * math.sqrt(p * (1 - p) / n), abs=1e-12)


def test_accuracy_interval_rounds_the_count_and_handles_missing_sizes():
    assert accuracy_interval(0.8, 10) == wilson_interval(8, 10)
    assert accuracy_interval(0.93818, 550) == wilson_interval(516, 550)
    assert all(math.isnan(v) for v in accuracy_interval(0.9, 0))
    assert all(math.isnan(v) for v in accuracy_interval(None, 10))
    assert all(math.isnan(v) for v in accuracy_interval(float("nan"), 10))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_a_trial_inside_the_best_interval_is_tied_one_below_is_not():
    low, _ = accuracy_interval(0.938, 550)  # ~0.915
    assert tied(0.938, 550, 0.938)
    assert tied(0.938, 550, low + 0.001)
    assert not tied(0.938, 550, low - 0.001)
    assert not tied(0.938, 0, 0.938)  # no sizes: nothing to say
