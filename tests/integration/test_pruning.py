"""Pruning: the median rule as numbers, the callback, the sweep file's ``prune:``, and a real sweep that prunes."""

import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.pruning import PruneCallback, aligned_curve, best_so_far, should_prune, thresholds
from support import saved_trials
from sweeps.config import PRUNE_DEFAULTS, load_sweep, parse_sweep
from tracking import layout
from tracking import leaderboard as lb


def test_best_so_far_is_the_running_maximum():
    assert best_so_far({0: 0.2, 1: 0.5, 2: 0.4, 3: 0.6}) == {0: 0.2, 1: 0.5, 2: 0.5, 3: 0.6}


def test_thresholds_are_the_median_of_earlier_best_so_far_after_warmup_and_min_trials():
    curves = [{0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.3, 1: 0.4, 2: 0.9}, {0: 0.6, 1: 0.5}]
    # epoch 1: bests 0.7, 0.4, 0.6 -> 0.6; epoch 2: 0.7, 0.9 (the third trial stopped at epoch 1) -> 0.8
    assert thresholds(curves, min_trials=2, warmup_epochs=1) == {1: 0.6, 2: pytest.approx(0.8)}
    assert thresholds(curves, min_trials=3, warmup_epochs=1) == {1: 0.6}  # only two trials reached epoch 2
    assert thresholds(curves, min_trials=1, warmup_epochs=0)[0] == 0.5
    assert thresholds(curves[:2], min_trials=3, warmup_epochs=0) == {}  # too few finished trials: never prune
    assert thresholds([], min_trials=1, warmup_epochs=0) == {}


def test_should_prune_only_below_the_threshold_of_that_epoch():
    limits = {2: 0.8}
    assert should_prune(0.5, 2, limits)
    assert not should_prune(0.8, 2, limits)  # equal to the median is not behind
    assert not should_prune(0.1, 1, limits)  # no threshold (warm-up): never


def test_the_callback_stops_training_on_best_so_far_and_remembers_the_epoch():
    class Model:
        stop_training = False

    cb = PruneCallback({"1": 0.6, "2": 0.8})  # JSON keys arrive as strings
    cb.set_model(Model())
    cb.on_epoch_end(0, {"val_accuracy": 0.7})
    cb.on_epoch_end(1, {"val_accuracy": 0.3})  # best so far 0.7 >= 0.6: goes on
    assert cb.pruned_at is None and not cb.model.stop_training
    cb.on_epoch_end(2, {"val_accuracy": 0.75})  # best so far 0.75 < 0.8
    assert cb.pruned_at == 2 and cb.model.stop_training


@pytest.mark.parametrize(
    "prune,message",
    [
        ("yes", r"prune in sweep t must be false, true or a mapping such as \{rule: median, min_trials: 3, "
                r"warmup_epochs: 2\}; got 'yes'"),
        ({"rule": "median", "patience": 2}, r"unknown key\(s\) \['patience'\] in prune of sweep t; known keys: rule, "
                                            r"min_trials, warmup_epochs, head"),
        ({"rule": "asha"}, r"prune rule 'asha' in sweep t is not one of median"),
        ({"min_trials": 0}, r"prune min_trials in sweep t must be a whole number >= 1, got 0"),
        ({"warmup_epochs": 1.5}, r"prune warmup_epochs in sweep t must be a whole number >= 0, got 1.5"),
        ({"head": "no"}, r"prune head in sweep t must be true \(prune head epochs too\) or false \(fine-tuning epochs "
                         r"only\), got 'no'"),
    ],
)
def test_bad_prune_settings(prune, message):
    with pytest.raises(UserError, match=message):
        parse_sweep({"prune": prune}, "t")


def test_prune_settings_and_hyperband():
    assert parse_sweep({}, "t").prune is None
    assert parse_sweep({"prune": False}, "t").prune is None
    assert parse_sweep({"prune": True}, "t").prune == PRUNE_DEFAULTS
    assert parse_sweep({"prune": {"min_trials": 5}}, "t").prune == {**PRUNE_DEFAULTS, "min_trials": 5}
    with pytest.raises(UserError, match=r"prune in sweep t does not apply to tuner: hyperband, which stops trials "
                                        r"itself; set prune: false"):
        parse_sweep({"tuner": "hyperband", "prune": True}, "t")
    assert load_sweep("tf_flowers").with_overrides(tuner="hyperband").prune is None  # TUNER=hyperband


def test_without_head_epochs_only_fine_tuning_epochs_get_thresholds():
    # keys (pipeline.pruning.aligned): head epochs as themselves, fine-tuning epoch j as -(j + 1)
    slow_head = {0: 0.2, 1: 0.3, 2: 0.4, -1: 0.9, -2: 0.92}
    fast_head = {0: 0.8, 1: 0.85, 2: 0.86, 3: 0.86, -1: 0.88, -2: 0.9}
    other = {0: 0.7, 1: 0.8, 2: 0.84, -1: 0.86}
    limits = thresholds([slow_head, fast_head, other], min_trials=2, warmup_epochs=1, head=False)
    assert set(limits) == {-1, -2}  # no head epoch: a slow head never stops a trial
    assert limits[-1] == pytest.approx(0.88)  # best so far at fine-tuning epoch 1: 0.9, 0.88, 0.86
    with_head = thresholds([slow_head, fast_head, other], min_trials=2, warmup_epochs=1)
    assert with_head[2] == pytest.approx(0.84) and {k: with_head[k] for k in (-1, -2)} == limits
    assert not should_prune(0.4, 2, limits)  # the slow head of the next trial goes on to fine-tune


def test_prune_head_false_is_kept_and_absent_means_true():
    assert parse_sweep({"prune": {"head": False}}, "t").prune == {**PRUNE_DEFAULTS, "head": False}
    assert "head" not in parse_sweep({"prune": True}, "t").prune  # a saved search's settings stay as they were


@pytest.mark.parametrize("name", ["default", "cats_vs_dogs"])
def test_shipped_sweeps_for_any_folder_prune_fine_tuning_epochs_only(name):
    assert load_sweep(name).prune == {**PRUNE_DEFAULTS, "head": False}


@pytest.mark.parametrize("name", ["tf_flowers_staged"])
def test_shipped_full_sweeps_prune_and_quick_does_not(name):
    assert load_sweep(name).prune == PRUNE_DEFAULTS
    assert load_sweep("quick").prune is None
    assert load_sweep("tf_flowers").prune is None  # its heads converge in seconds and fine-tuning reorders them


PRUNING_SWEEP = {
    "tuner": "grid", "max_trials": 4, "log_models": "best",
    "prune": {"rule": "median", "min_trials": 2, "warmup_epochs": 1},
    "space": {"backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "batch_size": {"fixed": 8},
              "fine_tune": {"fixed": False}, "epochs": {"fixed": 4}, "dropout": {"fixed": 0.1},
              # two trials that learn, one that cannot (1e-7), one that learns: in this order
              "learning_rate": {"choice": [0.03, 0.02, 1e-7, 0.01]}},
}


@pytest.mark.slow  # 40-45 s ("same") on the shared 2 cores, more with fresh processes
@pytest.mark.parametrize("trial_process", ["same", "fresh"])
def test_a_sweep_prunes_the_trial_that_cannot_learn_and_not_the_others(tmp_path, tracking_store, class_folder, capsys,
                                                                      trial_process):
    import mlflow

    from sweeps.run import run_sweep

    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump({**PRUNING_SWEEP, "trial_process": trial_process}))
    parent = run_sweep(str(class_folder), sweep=str(path), experiment="prune", state_dir=str(tmp_path / "state"),
                       verbose=0, progress=False)
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("prune").experiment_id
    kids = {float(r.data.params["learning_rate"]): r for r in
            client.search_runs([exp], f"tags.`{layout.PARENT_RUN_ID}` = '{parent}'")}
    assert set(kids) == {0.03, 0.02, 1e-7, 0.01}
    assert all(r.info.status == "FINISHED" for r in kids.values())
    bad = kids[1e-7]
    assert layout.PRUNED in bad.data.tags, {lr: r.data.tags.get(layout.PRUNED) for lr, r in kids.items()}
    epoch = int(bad.data.tags[layout.PRUNED])
    curve = [m.value for m in sorted(client.get_metric_history(bad.info.run_id, layout.VAL_ACCURACY),
                                     key=lambda m: m.step)]
    assert epoch >= 2 and len(curve) == epoch < 4  # stopped after that epoch (counted from 1), after the warm-up
    for lr in (0.03, 0.02, 0.01):  # the ones that learn ran all their epochs
        assert layout.PRUNED not in kids[lr].data.tags
        assert len(client.get_metric_history(kids[lr].info.run_id, layout.VAL_ACCURACY)) == 4
    # Keras Tuner counts the pruned trial with what it reached: its last val_accuracy
    scores = {float(t.hyperparameters.values["learning_rate"]): t.score for t in saved_trials(tmp_path / "state")}
    assert scores[1e-7] == pytest.approx(curve[-1])
    assert bad.data.metrics[layout.VAL_ACCURACY] == pytest.approx(curve[-1])
    assert max(scores.values()) > scores[1e-7]
    # every trial measured its cost (log_models: best exports nothing: the Keras model, its head's full classifier)
    for r in kids.values():
        assert r.data.tags[layout.COST_OF] == "keras"
        assert r.data.metrics[layout.TOTAL_PARAMS] > 3_000_000 and r.data.metrics[layout.SIZE_MB] > 10
        assert 0 < r.data.metrics[layout.LATENCY_MS] < 5000
    if trial_process != "same":
        return
    from sweeps.cli import main as sweeps_main

    assert sweeps_main(["best-export", "--experiment", "prune", "--export-dir", str(tmp_path / "exports"),
                        "--max-latency-ms", "0.001"]) == 2
    assert "error: no finished trial of 'prune' fits latency_ms <= 0.001 (4 measured; smallest latency_ms" in \
        capsys.readouterr().err
    assert sweeps_main(["best-export", "--experiment", "prune", "--export-dir", str(tmp_path / "exports"),
                        "--max-latency-ms", "100000", "--max-size-mb", "1000"]) == 0
    out = capsys.readouterr().out
    assert "within latency_ms <= 100000 and size_mb <= 1000: trial" in out and "also the unconstrained best" in out
    chosen = re.search(r"best run (\w+):", out).group(1)  # the selection rule's first (ties: a steadier estimate)
    best = next(r for r in kids.values() if r.info.run_id == chosen)
    # best-export built and measured the SavedModel in a run of its own: the FINISHED trial run is as it was
    export = client.search_runs([best.info.experiment_id], f"tags.`{layout.EXPORT_OF}` = '{chosen}'")
    assert len(export) == 1 and export[0].info.status == "FINISHED", export
    export = export[0]
    assert export.data.tags[layout.KIND] == layout.EXPORT and export.data.tags[layout.COST_OF] == "savedmodel"
    assert export.data.tags[layout.PARENT_RUN_ID] == best.data.tags[layout.PARENT_RUN_ID]
    assert export.data.params == best.data.params and layout.MODEL_URI in export.data.tags
    assert export.data.metrics[layout.SIZE_MB] > best.data.metrics[layout.SIZE_MB]
    after = client.get_run(chosen)
    assert (after.data.tags, after.data.metrics, after.info.end_time) == (best.data.tags, best.data.metrics,
                                                                           best.info.end_time)
    assert sweeps_main(["report", "--experiment", "prune", "--out-dir", str(tmp_path / "reports")]) == 0
    assert len(lb.trial_runs("prune")) == len(kids), "an export run is not a trial"


def test_curves_come_from_finished_unpruned_siblings_of_the_same_stage_in_mlflow(tracking_store):
    import mlflow
    from mlflow.entities import Metric

    from sweeps.prune import Curves

    client = MlflowClient()
    exp = mlflow.create_experiment("curves")
    parent = client.create_run(exp).info.run_id

    def child(trial, values, status="FINISHED", fine_tune_start=None, **tags):
        run = client.create_run(exp, tags={layout.PARENT_RUN_ID: parent, layout.TRIAL_ID: trial,
                                           layout.KIND: layout.TRIAL, **tags}).info.run_id
        client.log_batch(run, metrics=[Metric(layout.VAL_ACCURACY, v, 0, s) for s, v in enumerate(values)]
                         + ([Metric(layout.FINE_TUNE_START, fine_tune_start, 0, 0)] if fine_tune_start else []))
        client.set_terminated(run, status)

    child("0", [0.5, 0.6, 0.7])
    child("1", [0.7, 0.8, 0.9])
    child("2", [0.1, 0.1], **{layout.PRUNED: "1"})  # pruned: not a reference
    child("3", [0.0, 0.0, 0.0], status="KILLED")  # not finished
    child("4", [0.0, 0.0, 0.0], **{layout.STAGE: "2"})  # another stage
    child("ensemble 0+1", [0.0], **{layout.KIND: layout.ENSEMBLE})  # the sweep's ensemble: no curve
    curves = Curves(exp, parent, {"min_trials": 2, "warmup_epochs": 1})
    assert curves.limits() == {1: pytest.approx(0.7), 2: pytest.approx(0.8)}
    curves.add("5", [0.9, 0.95, 0.99], 0, None)  # this process's own trial, before MLflow has it
    assert curves.limits()[2] == pytest.approx(0.9)
    curves.add("6", [0.0, 0.0], 0, 1)
    assert curves.limits()[2] == pytest.approx(0.9), "a pruned trial of its own is no reference either"
    assert Curves(exp, parent, {"min_trials": 3, "warmup_epochs": 0}).limits() == {}
    child("7", [0.2, 0.3, 0.95], fine_tune_start=2)  # its third epoch is its first fine-tuning epoch
    aligned = Curves(exp, parent, {"min_trials": 1, "warmup_epochs": 0}).limits()
    assert aligned[-1] == pytest.approx(0.95) and aligned[2] == pytest.approx(0.8), "phases read from MLflow"
    for r in client.search_runs([exp]):
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id)


def test_pruning_goes_on_from_its_own_trials_while_the_tracking_server_does_not_answer(capsys):
    """A tracking server that died mid-sweep: the thresholds come from this process's own finished trials
    (said once), not from a read that MLflow would retry for minutes or an exception that fails the trial."""
    import time

    import mlflow

    from sweeps.prune import Curves
    from tracking.server import free_port

    port = free_port()  # a port nothing listens on: connections are refused at once
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        curves = Curves("0", "parent", {"min_trials": 2, "warmup_epochs": 0})
        curves.add("0", [0.5, 0.6], 0, None)
        curves.add("1", [0.7, 0.8], 0, None)
        start = time.perf_counter()
        assert curves.limits() == {0: pytest.approx(0.6), 1: pytest.approx(0.7)}
        assert curves.limits() == {0: pytest.approx(0.6), 1: pytest.approx(0.7)}
        assert time.perf_counter() - start < 10, "no MLflow retries against a server that is down"
    finally:
        mlflow.set_tracking_uri(previous)
    said = capsys.readouterr().err
    assert said.count("pruning compares with this process's own finished trials until the tracking server "
                      "answers again") == 1


def test_epochs_are_compared_phase_by_phase():
    # A trial with a 2-epoch head and one with a 3-epoch head: fine-tuning epoch 0 of each is compared with the
    # other's fine-tuning epoch 0, not with whatever epoch 2 of the axis was.
    short = aligned_curve([0.5, 0.6, 0.9, 0.95], 0, fine_tune_start=2)
    long = aligned_curve([0.4, 0.5, 0.55, 0.8, 0.85], 0, fine_tune_start=3)
    assert short == {0: 0.5, 1: 0.6, -1: 0.9, -2: 0.95} and long == {0: 0.4, 1: 0.5, 2: 0.55, -1: 0.8, -2: 0.85}
    limits = thresholds([short, long], min_trials=2, warmup_epochs=1)
    # medians of the best so far: head epoch 1 (0.6, 0.5), fine-tuning epoch 0 (0.9, 0.8), epoch 1 (0.95, 0.85)
    assert limits == {1: pytest.approx(0.55), -1: pytest.approx(0.85), -2: pytest.approx(0.9)}
    callback = PruneCallback({str(k): v for k, v in limits.items()})  # as JSON brings them
    import keras

    callback.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    callback.on_phase_begin("head", 0)
    for epoch, value in enumerate([0.5, 0.6, 0.6]):  # a 3-epoch head, as good as the others' heads
        callback.on_epoch_end(epoch, {"val_accuracy": value})
    assert callback.pruned_at is None, "head epoch 2 has no threshold: only one earlier trial reached it"
    callback.on_phase_begin("fine_tune", 3)
    callback.on_epoch_end(3, {"val_accuracy": 0.8})  # fine-tuning epoch 0: below the median 0.85 there
    assert callback.pruned_at == 3 and callback.model.stop_training
