"""``tuner: tpe``: Optuna's TPE behind Keras Tuner's Oracle API (sweeps/tpe.py), alone and in a real sweep."""

import math

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from support import needs_flowers
from sweeps.config import parse_sweep
from sweeps.tpe import STARTUP_TRIALS
from sweeps.tuner import SpaceHyperModel, TPEOracle, make_oracle

# A conditional space as the shipped sweeps have: fine_tune_at and fine_tune_learning_rate only when fine_tune.
SPACE = {"backbone": {"choice": ["efficientnet_lite0", "mobilenet_v2"], "default": "mobilenet_v2"},
         "fine_tune": {"boolean": True, "default": True},
         "fine_tune_at": {"choice": [0.75, 0.9], "default": 0.9},
         "fine_tune_learning_rate": {"float": [1e-6, 1e-4], "sampling": "log", "default": 1e-5},
         "dropout": {"float": [0.0, 0.5], "step": 0.1, "default": 0.3},
         "epochs": {"int": [3, 10], "default": 10},
         "learning_rate": {"float": [1e-4, 1e-2], "sampling": "log", "default": 2e-3}}
SEARCHED = tuple(SPACE)
FINE_TUNE_ONLY = ("fine_tune_at", "fine_tune_learning_rate")


def oracle(folder, seed: int = 3, max_trials: int = 12, space: dict = SPACE) -> TPEOracle:
    """The oracle ``tuner: tpe`` makes, with the space declared as a sweep declares it, saving in ``folder``."""
    config = parse_sweep({"tuner": "tpe", "max_trials": max_trials, "seed": seed, "space": space}, "s")
    made = make_oracle(config)
    made._set_project_dir(str(folder), "p")
    made.verbose = 0
    hp = made.get_space()
    SpaceHyperModel(config.space).build(hp)
    made.update_space(hp)
    return made


def score(values: dict) -> float:
    """A made-up objective with its best at learning_rate 1e-3, dropout 0.3, efficientnet_lite0 fine-tuned."""
    return (1 - abs(math.log10(values["learning_rate"]) + 3) / 2 - abs(values["dropout"] - 0.3)
            + 0.1 * (values["backbone"] == "efficientnet_lite0") + 0.1 * values["fine_tune"])


def finish(o: TPEOracle, trial, status: str = "COMPLETED") -> None:
    if status == "COMPLETED":
        o.update_trial(trial.trial_id, {"val_accuracy": score(trial.hyperparameters.values)})
    trial.status = status
    o.end_trial(trial)


def run(o: TPEOracle, trials: int) -> list[dict]:
    drawn = []
    for _ in range(trials):
        trial = o.create_trial("w1")
        drawn.append(dict(trial.hyperparameters.values))
        finish(o, trial)
    return drawn


def test_tpe_is_a_tuner_a_sweep_file_can_name():
    assert isinstance(make_oracle(parse_sweep({"tuner": "tpe"}, "s")), TPEOracle)


def test_the_first_trial_is_the_default_point_then_tpe_asks_only_the_active_values(tmp_path):
    o = oracle(tmp_path, max_trials=20)
    drawn = run(o, 20)
    assert {k: drawn[0][k] for k in SEARCHED} == {"backbone": "mobilenet_v2", "fine_tune": True, "fine_tune_at": 0.9,
                                                  "fine_tune_learning_rate": 1e-5, "dropout": 0.3, "epochs": 10,
                                                  "learning_rate": 2e-3}
    assert len({str(v) for v in drawn}) == 20, "no point twice"
    for values in drawn:
        assert all((k in values) == values["fine_tune"] for k in FINE_TUNE_ONLY), values
        assert values["dropout"] in [pytest.approx(0.1 * i) for i in range(6)] and 3 <= values["epochs"] <= 10
        assert 1e-4 <= values["learning_rate"] <= 1e-2
    assert {v["fine_tune"] for v in drawn} == {True, False}
    # Optuna's study holds what the oracle asked it: the fine-tuning values only where fine_tune was true
    study = o._study()
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 20
    for values, asked in zip(drawn, study.trials):
        assert set(asked.params) == {k for k in SEARCHED if k in values}
        assert asked.value == pytest.approx(score(values))


def test_after_its_random_start_tpe_draws_where_the_trials_scored_best(tmp_path):
    drawn = run(oracle(tmp_path, max_trials=24), 24)
    error = [abs(math.log10(v["learning_rate"]) + 3) for v in drawn]
    start, learnt = error[1:STARTUP_TRIALS], error[-8:]
    assert sum(learnt) / len(learnt) < sum(start) / len(start), error


@pytest.mark.parametrize("seed", [0, 7])
def test_the_same_seed_draws_the_same_trials_and_another_seed_other_ones(tmp_path, seed):
    first, again = run(oracle(tmp_path / "a", seed), 10), run(oracle(tmp_path / "b", seed), 10)
    assert first == again
    assert run(oracle(tmp_path / "c", seed + 1), 10)[1:] != first[1:]


def test_a_reloaded_search_draws_what_the_uninterrupted_one_draws(tmp_path):
    uninterrupted = run(oracle(tmp_path / "whole"), 10)
    before = oracle(tmp_path / "cut")
    drawn = run(before, 6)
    killed = before.create_trial("w1")  # running when the sweep is killed: Keras Tuner runs it again on reload
    after = oracle(tmp_path / "cut")
    after.reload()
    again = after.create_trial("w1")
    assert again.trial_id == killed.trial_id and again.hyperparameters.values == killed.hyperparameters.values
    finish(after, again)
    drawn += [dict(again.hyperparameters.values)] + run(after, 3)
    assert drawn == uninterrupted


def test_a_failed_trial_is_told_as_failed_and_the_search_goes_on_until_too_many_fail_in_a_row(tmp_path):
    o = oracle(tmp_path)
    run(o, 5)
    finish(o, o.create_trial("w1"), "FAILED")
    nxt = o.create_trial("w1")
    assert nxt.status == "RUNNING" and nxt.trial_id == "06"
    assert [t.state.name for t in o._study().trials][5:] == ["FAIL", "RUNNING"]
    finish(o, nxt, "FAILED")
    with pytest.raises(RuntimeError, match="consecutive failures exceeded the limit of 3"):  # as the other tuners
        finish(o, o.create_trial("w1"), "FAILED")


def test_running_trials_are_in_the_study_for_the_constant_liar_and_not_drawn_again(tmp_path):
    o = oracle(tmp_path)
    run(o, STARTUP_TRIALS + 2)
    parallel = [o.create_trial(f"w{i}") for i in range(3)]  # three workers of a distributed sweep, none finished
    assert len({str(t.hyperparameters.values) for t in parallel}) == 3
    assert [t.state.name for t in o._study().trials][-3:] == ["RUNNING"] * 3


def test_values_outside_the_space_are_left_out_of_the_study_and_the_search_goes_on(tmp_path):
    o = oracle(tmp_path)
    first = o.create_trial("w1")
    # a trial of an earlier space (ON_CHANGE=continue): a range and a choice the space has no more
    first.hyperparameters.values.update(dropout=0.9, backbone="resnet50", learning_rate="fast")
    o.update_trial(first.trial_id, {"val_accuracy": 0.5})
    first.status = "COMPLETED"
    o.end_trial(first)
    (asked,) = o._study().trials
    assert set(asked.params) == {"fine_tune", "fine_tune_at", "fine_tune_learning_rate", "epochs"}
    assert asked.state == optuna.trial.TrialState.COMPLETE and asked.value == 0.5
    assert run(o, STARTUP_TRIALS + 2)


def test_a_space_with_no_point_left_stops_the_search(tmp_path):
    o = oracle(tmp_path, space={"dropout": {"choice": [0.1, 0.2]}})
    run(o, 2)
    assert o.create_trial("w1").status == "STOPPED"


@pytest.mark.slow
@needs_flowers()
@pytest.mark.realdata
def test_a_tpe_sweep_on_a_few_flower_photos_tracks_every_trial(tmp_path, tracking_store, monkeypatch):
    from sweeps.run import run_sweep
    from test_realdata import flower_subset
    from tracking.layout import TRIAL_ID, TUNER

    monkeypatch.chdir(tmp_path)
    trials = STARTUP_TRIALS + 2  # the last two drawn by TPE
    config = {"tuner": "tpe", "max_trials": trials, "log_models": "best", "trial_process": "same", "space": {
        "backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 64}, "fine_tune": {"fixed": False},
        "epochs": {"int": [2, 6], "default": 4}, "batch_size": {"choice": [8, 16], "default": 16},
        "dropout": {"float": [0.0, 0.5], "step": 0.1, "default": 0.2},
        "learning_rate": {"float": [1e-4, 1e-2], "sampling": "log", "default": 1e-3}}}
    (tmp_path / "tpe.yaml").write_text(__import__("yaml").safe_dump(config))
    parent = run_sweep(str(flower_subset(tmp_path / "flowers", 12)), sweep=str(tmp_path / "tpe.yaml"),
                       experiment="tpe", state_dir=str(tmp_path / "state"), verbose=0, progress=False)
    exp = mlflow.get_experiment_by_name("tpe")
    kids = MlflowClient().search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(k.data.tags[TRIAL_ID] for k in kids) == [str(i) for i in range(trials)]
    assert all(k.info.status == "FINISHED" and k.data.tags[TUNER] == "tpe" for k in kids)
    first = next(k for k in kids if k.data.tags[TRIAL_ID] == "0").data.params
    searched = ("epochs", "batch_size", "dropout", "learning_rate")
    assert tuple(first[p] for p in searched) == ("4", "16", "0.2", "0.001"), "the default point first"
    assert len({tuple(k.data.params[p] for p in searched) for k in kids}) == trials
