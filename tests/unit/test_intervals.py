"""Every accuracy comes with its 95 % interval; trials the validation split cannot tell from the best are tied."""

import math

import pandas as pd
import pytest

from pipeline.stats import wilson_interval
from tracking import leaderboard as lb
from tracking.intervals import interval_metrics, interval_text


def test_interval_metrics_use_the_split_sizes_and_skip_an_empty_split():
    m = interval_metrics(0.8, 10, 0.5, 0)
    assert (m["val_accuracy_low"], m["val_accuracy_high"]) == wilson_interval(8, 10)
    assert "test_accuracy_low" not in m and "test_accuracy_high" not in m
    assert interval_text(*wilson_interval(8, 10)) == "[0.490, 0.943]"
    assert interval_text(math.nan, math.nan) == ""


def _runs(rows):
    return pd.DataFrame([{
        "run_id": f"r{i}", "tags.kt.trial_id": str(i), "status": status, "params.backbone": "efficientnet_lite0",
        "metrics.val_accuracy": val, "metrics.test_accuracy": test, "params.validation_size": "550",
        "params.test_size": "367"} for i, (status, val, test) in enumerate(rows)])


def test_the_leaderboard_carries_intervals_and_marks_trials_tied_with_the_best():
    low, _ = wilson_interval(516, 550)  # the best: 516 of 550 right, interval ~[0.915, 0.955]
    table = lb.leaderboard(_runs([
        ("FINISHED", 0.90, 0.88),  # below the best's interval: not tied
        ("FINISHED", 516 / 550, 0.90),  # the best
        ("FINISHED", low + 0.002, 0.91),  # inside it: tied
        ("FAILED", 0.99, None),  # not finished: never tied, never best
    ]))
    assert list(table["run_id"]) == ["r1", "r2", "r0", "r3"]
    assert list(table["tied"]) == [True, True, False, False]
    assert (table.loc[0, "val_accuracy_low"], table.loc[0, "val_accuracy_high"]) == pytest.approx(
        wilson_interval(516, 550))
    assert (table.loc[0, "test_accuracy_low"], table.loc[0, "test_accuracy_high"]) == pytest.approx(
        wilson_interval(330, 367))
    shown = lb.shown(table)
    assert shown.loc[0, "val_95"] == interval_text(*wilson_interval(516, 550))
    assert list(shown["tied"]) == ["tied", "tied", "", ""]
    assert math.isnan(table.loc[3, "test_accuracy_low"])


def test_a_leaderboard_of_runs_without_sizes_has_no_intervals_and_no_ties():
    runs = _runs([("FINISHED", 0.9, 0.9)]).drop(columns=["params.validation_size", "params.test_size"])
    table = lb.leaderboard(runs)
    assert math.isnan(table.loc[0, "val_accuracy_low"]) and list(table["tied"]) == [False]
    assert list(lb.leaderboard(pd.DataFrame()).columns)[-1] == "tied"
