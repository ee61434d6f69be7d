"""``make bench-fixed-cost``: what counts as steps, what as fixed cost, and the ``measure`` that ``make bench`` calls."""

import re

import pytest

from benchmarks import bench_fixed_cost as bench
from tracking import layout

METRICS = {layout.HEAD_SECONDS: 2.0, layout.FINE_TUNE_SECONDS: 10.0, layout.EVAL_SECONDS: 1.5,
           layout.STEP_SECONDS: 12.5, layout.TRACE_SECONDS: 3.0, layout.EVAL_TRACE_SECONDS: 0.5,
           layout.TRAIN_SECONDS: 16.0, layout.WALL_SECONDS: 17.0, layout.FEATURE_SECONDS: 0.0}


def test_steps_are_the_timed_steps_without_tracing_and_the_breakdown_sums_to_the_fixed_cost():
    # fit and the test evaluation took 13.5 s, of which 12.5 s in steps: the 1 s between steps is fixed cost
    assert bench.steps_in(METRICS) == pytest.approx(12.5 - 3.0 - 0.5)
    line = bench.breakdown(20.0, METRICS)
    fixed = float(re.search(r"fixed ([\d.]+) s =", line).group(1))
    parts = [float(v) for v in re.findall(r" (-?[\d.]+)(?:;| \()", line.split(" = ", 1)[1])]
    assert fixed == pytest.approx(20.0 - 9.0) and sum(parts) == pytest.approx(fixed, abs=0.02), line
    assert "in the Keras calls outside their steps (phase setup, pipelines made, epoch ends, callbacks) 1.00" in line


def test_a_trial_times_its_steps(class_folder):
    """``step_seconds`` is within the calls that ran the steps, and covers most of them on a real (tiny) run."""
    from pipeline.data import load_data
    from pipeline.model import build_model
    from pipeline.training import train

    data = load_data(str(class_folder), 32, seed=0)
    model = build_model("mobilenet_v2", data.num_classes, 32, weights=None)
    result = train(model, data, epochs=2, fine_tune_epochs=1, unfreeze_from=100, verbose=0)
    in_calls = result.head_seconds + result.fine_tune_seconds + result.eval_seconds
    assert 0 < result.trace_seconds + result.eval_trace_seconds < result.step_seconds < in_calls


@pytest.mark.slow
def test_measure_gives_both_fixed_costs(class_folder):
    result = bench.measure(class_folder, image_size=32, repeats=1, echo=False)
    assert set(result) == {"fixed_cost_head_s", "fixed_cost_finetune_s", "fixed_cost_finetune_kept_s"}
    assert all(0 < v < 600 for v in result.values()), result


def test_unknown_kinds_are_one_line_naming_the_known():
    with pytest.raises(SystemExit, match=r"^unknown kinds nope; known: head, finetune, finetune_kept$"):
        bench.main(["--kinds", "head,nope", "--data", "."])
