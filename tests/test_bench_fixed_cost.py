"""``make bench-fixed-cost``: what counts as steps, what as fixed cost, and the ``measure`` that ``make bench`` calls."""

import re

import pytest

from benchmarks import bench_fixed_cost as bench
from tracking import layout

METRICS = {layout.HEAD_SECONDS: 2.0, layout.FINE_TUNE_SECONDS: 10.0, layout.EVAL_SECONDS: 1.5,
           layout.TRACE_SECONDS: 3.0, layout.EVAL_TRACE_SECONDS: 0.5, layout.TRAIN_SECONDS: 16.0,
           layout.WALL_SECONDS: 17.0, layout.FEATURE_SECONDS: 0.0}


def test_steps_are_fit_and_test_evaluation_without_tracing_and_the_breakdown_sums_to_the_fixed_cost():
    assert bench.steps_in(METRICS) == pytest.approx(2.0 + 10.0 + 1.5 - 3.0 - 0.5)
    line = bench.breakdown(20.0, METRICS)
    fixed = float(re.search(r"fixed ([\d.]+) s =", line).group(1))
    parts = [float(v) for v in re.findall(r" (-?[\d.]+)(?:;| \()", line.split(" = ", 1)[1])]
    assert fixed == pytest.approx(20.0 - 10.0) and sum(parts) == pytest.approx(fixed, abs=0.02), line


@pytest.mark.slow
def test_measure_gives_both_fixed_costs(class_folder):
    result = bench.measure(class_folder, image_size=32, repeats=1, echo=False)
    assert set(result) == {"fixed_cost_head_s", "fixed_cost_finetune_s"}
    assert all(0 < v < 600 for v in result.values()), result
