"""``make bench``'s logic on tiny data: it compares only searches that drew the same hyperparameters."""

import argparse

import keras_tuner as kt
import pytest
import yaml

from benchmarks import bench
from sweeps.config import parse_sweep
from sweeps.tuner import SpaceHyperModel, make_oracle


def _draws(seed: int, trials: int = 6) -> list[dict]:
    """What a seeded random search over the bench's space draws, without training anything."""
    config = parse_sweep(yaml.safe_load(bench.sweep_yaml(trials, 1, 1, 8, 32, seed)), "bench")
    oracle = make_oracle(config)
    oracle._set_project_dir("/tmp/unused", "bench")  # never written: trials are only created, not saved
    space = oracle.get_space()
    SpaceHyperModel(config.space).build(space)  # the space as a tuner registers it (fine_tune's default is true)
    oracle.update_space(space)
    draws = []
    for i in range(trials):
        trial = oracle.create_trial(f"t{i}")
        SpaceHyperModel(config.space).build(trial.hyperparameters)
        draws.append({k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")})
    return draws


def test_the_draw_check_passes_equal_draws_and_names_the_first_difference():
    same = [{"dropout": 0.1, "fine_tune": True}, {"dropout": 0.2, "fine_tune": False}]
    assert bench.compare_draws({"plain": same, "ours": [dict(d) for d in same]}) is None
    other = [same[0], {"dropout": 0.3, "fine_tune": False}]
    assert bench.compare_draws({"plain": same, "ours": other}) == (
        "trial 1: plain vs ours drew differently: {'dropout': (0.2, 0.3)}")
    assert bench.compare_draws({"plain": same, "ours": same[:1]}) == "plain ran 2 trials, ours 1"


def test_the_bench_space_draws_fine_tuning_trials_and_other_seeds_draw_otherwise():
    a = _draws(1)  # the bench's default seed
    assert bench.fine_tuning(a) >= len(a) / 2, "the default bench has at least half fine-tuning trials"
    assert {d.get("fine_tune_at") for d in a if d["fine_tune"]} == {0.75, 0.9}, "both cuts"
    assert bench.compare_draws({"plain": a, "ours": _draws(1)}) is None, "a seed draws the same each time"
    assert bench.compare_draws({"plain": a, "ours": _draws(2)}) is not None


def _args(tmp_path, class_folder, **kw):
    return argparse.Namespace(data=str(class_folder), per_class=12, trials=2, epochs=1, fine_tune_epochs=1,
                              image_size=32, batch_size=8, seed=kw.pop("seed", 5), fixed_cost_data=None,
                              fixed_cost_repeats=1, no_fixed_cost=True, split_overhead=kw.pop("split_overhead", False),
                              **kw)


def _with_models(db, experiment: str) -> int:
    """How many runs of ``experiment`` in the SQLite store ``db`` have a logged model."""
    from mlflow.tracking import MlflowClient

    from tracking import layout

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return sum(layout.MODEL_URI in r.data.tags for r in runs)


def test_splitting_the_overhead_needs_the_exports_it_splits_off(tmp_path, capsys):
    assert bench.run(_args(tmp_path, tmp_path, split_overhead=True, log_models="best"), tmp_path / "work") == 2
    assert capsys.readouterr().err.strip() == (
        "error: --split-overhead compares the sweep with its model exports against one without them; with "
        "--log-models best there are none to split off: drop one of the two")


@pytest.mark.slow
def test_the_bench_runs_on_tiny_data_and_fails_when_the_sides_draw_differently(tmp_path, class_folder, monkeypatch,
                                                                               capsys):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))  # the bench moves it per side; restored after
    assert bench.run(_args(tmp_path, class_folder, split_overhead=True), tmp_path / "ok") == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("speedup=") and " tracking_overhead=" in last and " trials=2 " in last
    assert "fixed_cost_head_s=" in last and "same hyperparameters drawn on every side: yes" in out
    assert " tracking_overhead_mlflow_s=" in last and " tracking_overhead_exports_s=" in last
    # (d) is the tracked sweep without model exports, (b) the shipped one with them (its first trial improves)
    assert _with_models(tmp_path / "ok" / "mlflow_no_exports.db", "bench-no-exports") == 0
    assert _with_models(tmp_path / "ok" / "mlflow.db", "bench") >= 1

    plain = bench.plain_keras_tuner  # the plain side searches with another seed: unlike trials
    monkeypatch.setattr(bench, "plain_keras_tuner", lambda data, config, size, seed, work: plain(
        data, config, size, seed + 1, work))
    assert bench.run(_args(tmp_path, class_folder), tmp_path / "differ") == 1
    assert "error: the searches drew different hyperparameters" in capsys.readouterr().err
