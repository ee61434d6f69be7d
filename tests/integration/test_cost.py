"""The cost of a model (size, parameters, latency), the Pareto front, and choosing within a budget."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import cost
from pipeline.errors import UserError
from sweeps.best import within_budget
from tracking import layout
from tracking.leaderboard import pareto_front


@pytest.fixture(scope="module")
def tiny_model():
    from pipeline.model import build_model

    return build_model("efficientnet_lite0", 3, 32, weights="none", seed=1)


def test_latency_is_the_median_of_timed_calls_after_warm_up():
    calls = []
    assert cost.latency_ms(lambda x: calls.append(x.shape), (8, 8, 3), runs=5, warmup=2) >= 0
    assert calls == [(1, 8, 8, 3)] * 7


@pytest.mark.slow  # 30-50 s on the shared cores: the export and tracing dominate
def test_keras_and_savedmodel_cost_of_one_classifier(tiny_model, tmp_path):
    from pipeline.export import export_model

    in_memory = cost.keras_cost(tiny_model)
    assert in_memory.of == cost.KERAS and in_memory.total_params == tiny_model.count_params() > 3_000_000
    assert in_memory.size_mb == pytest.approx(in_memory.total_params * 4 / 1e6, rel=0.01)  # float32 weights
    assert 0 < in_memory.latency_ms < 5000
    export = export_model(tiny_model, tmp_path / "export", ["a", "b", "c"])
    saved = cost.savedmodel_cost(export, tiny_model.count_params())
    assert saved.of == cost.SAVEDMODEL and saved.total_params == in_memory.total_params
    # The SavedModel (not the model.keras copy beside it) is larger than the weights: with the graph, and (measured
    # here) Keras' ExportArchive writes every variable twice (6,833,737 values for 3,416,867 parameters).
    assert in_memory.size_mb < saved.size_mb < 2.3 * in_memory.size_mb
    assert 0 < saved.latency_ms < 5000


def test_cost_of_a_head_is_measured_once_per_architecture(tiny_model):
    measured = cost.keras_cost(tiny_model)
    assert measured.of == cost.KERAS and measured.total_params == tiny_model.count_params() > 3_000_000
    assert measured.size_mb == pytest.approx(measured.total_params * 4 / 1e6, rel=0.01)  # float32 weights
    assert 0 < measured.latency_ms < 5000
    built = []
    key = ("test-architecture", 32, 3)
    first = cost.cost_of_head(key, lambda: built.append(1) or tiny_model)
    again = cost.cost_of_head(key, lambda: built.append(1) or tiny_model)
    assert first == again and built == [1]


def test_savedmodel_latency_is_measured_once_per_architecture_and_the_size_each_time(tmp_path, monkeypatch):
    """A sweep's export helper exports many trials of one architecture: loading and timing each export took
    ~1.4 s, and the latency does not depend on the weights."""
    import tensorflow as tf

    loads = []

    class Loaded:
        signatures = {"serving_default": type("Serve", (), {
            "structured_input_signature": ((), {"image": tf.TensorSpec([None, 8, 8, 3], tf.float32)})})()}

    monkeypatch.setattr(cost, "_SAVEDMODEL_LATENCY", {})
    monkeypatch.setattr(cost.tf.saved_model, "load", lambda path: loads.append(path) or Loaded())
    monkeypatch.setattr(cost, "latency_ms", lambda call, shapes: 7.0 + len(loads))
    for name, megabytes in (("a", 1), ("b", 2)):
        (tmp_path / name / "variables").mkdir(parents=True)
        (tmp_path / name / "saved_model.pb").write_bytes(b"x" * 1000)
        (tmp_path / name / "variables" / "v").write_bytes(b"x" * megabytes * 10**6)
    architecture = ("efficientnet_lite0", 8, 3, False, "float32")
    first = cost.savedmodel_cost(tmp_path / "a", 10, architecture)
    again = cost.savedmodel_cost(tmp_path / "b", 10, architecture)
    assert len(loads) == 1 and first.latency_ms == again.latency_ms == 8.0
    assert (first.size_mb, again.size_mb) == (pytest.approx(1.001), pytest.approx(2.001)), "each export's own size"
    assert cost.savedmodel_cost(tmp_path / "b", 10).latency_ms == 9.0, "without an architecture: measured each time"
    other = cost.savedmodel_cost(tmp_path / "b", 10, ("efficientnet_lite0", 8, 3, False, "mixed_float16"))
    assert len(loads) == 3 and other.latency_ms == 10.0, "another architecture is measured on its own"


def test_pareto_front_keeps_the_trials_nothing_beats_on_both():
    costs = [10.0, 5.0, 20.0, 5.0, float("nan"), 30.0]
    values = [0.90, 0.80, 0.95, 0.70, 0.99, 0.94]
    # 5.0/0.80, then 10/0.90, then 20/0.95; 5.0/0.70 and 30/0.94 are beaten, NaN left out
    assert pareto_front(costs, values) == [1, 0, 2]
    assert pareto_front([], []) == []


def board(rows):
    return pd.DataFrame(rows, columns=["run_id", "trial_id", layout.OBJECTIVE, layout.LATENCY_MS, layout.SIZE_MB])


DONE = board([("r4", "4", 0.97, math.nan, math.nan),  # best first (as the leaderboard); r4 logged before costs
              ("r1", "1", 0.95, 40.0, 20.0), ("r2", "2", 0.93, 12.0, 16.0), ("r3", "3", 0.90, 8.0, 9.0)])


def test_within_budget_takes_the_best_that_fits_and_says_what_it_costs():
    chosen, line = within_budget(DONE, "e", max_latency_ms=20)
    assert chosen["run_id"] == "r2"
    assert line == ("within latency_ms <= 20: trial 2 (val_accuracy 0.9300, latency_ms 12, size_mb 16); the "
                    "unconstrained best is trial 4 (val_accuracy 0.9700); 1 finished trial(s) have no latency_ms "
                    "(logged before tlsweep measured costs) and were not considered")
    chosen, _ = within_budget(DONE, "e", max_latency_ms=20, max_size_mb=10)
    assert chosen["run_id"] == "r3"
    chosen, line = within_budget(DONE.iloc[1:], "e", max_size_mb=100)
    assert chosen["run_id"] == "r1" and line == ("within size_mb <= 100: trial 1 (val_accuracy 0.9500, latency_ms 40, "
                                                 "size_mb 20), also the unconstrained best")
    chosen, line = within_budget(DONE, "e")  # no budget: the best
    assert chosen["run_id"] == "r4" and line == ""


def test_no_trial_within_budget_is_a_clear_error(monkeypatch):
    with pytest.raises(UserError, match=r"^no finished trial of 'e' fits latency_ms <= 5 \(3 measured; smallest "
                                        r"latency_ms 8\); 1 finished trial\(s\) have no latency_ms .*; raise "
                                        r"--max-latency-ms$"):
        within_budget(DONE, "e", max_latency_ms=5)
    with pytest.raises(UserError, match=r"fits size_mb <= 1 \(0 measured; no trial has cost metrics\); 1 finished "
                                        r"trial\(s\) have no size_mb .*; raise --max-size-mb$"):
        within_budget(DONE.iloc[:1], "e", max_size_mb=1)
    with pytest.raises(UserError, match=r"^--max-latency-ms 0 is not a budget; give a number above 0 \(in ms\)$"):
        within_budget(DONE, "e", max_latency_ms=0)
    monkeypatch.setenv("MAKELEVEL", "1")  # under make: the variable the user typed
    with pytest.raises(UserError, match=r"^MAX_LATENCY_MS=0 is not a budget; give a number above 0 \(in ms\)$"):
        within_budget(DONE, "e", max_latency_ms=0)


def test_the_report_draws_the_pareto_fronts(tmp_path):
    from tracking.report import sweep_charts

    table = DONE.assign(status="FINISHED", backbone="efficientnet_lite0", dropout=[0.1, 0.2, 0.3, 0.1])
    names = {p.name for p in sweep_charts(table, tmp_path)}
    assert {layout.PARETO_LATENCY, layout.PARETO_SIZE} <= names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
    older = table.assign(**{layout.LATENCY_MS: np.nan, layout.SIZE_MB: np.nan})  # no costs: no Pareto chart
    assert not {layout.PARETO_LATENCY, layout.PARETO_SIZE} & {p.name for p in sweep_charts(older, tmp_path / "o")}
