"""A trial runs the same in the sweep's process and in a fresh one; a dying trial process fails only its trial."""

import json
import threading
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import sweep_by_learning_rate
from pipeline.hparams import RunConfig
from sweeps.trial import TrialSpec

FINE_TUNE = {  # a trial that trains the whole network: "auto" runs it in a fresh process
    "backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "batch_size": {"fixed": 8},
    "epochs": {"fixed": 2}, "fine_tune": {"fixed": True}, "fine_tune_epochs": {"fixed": 1},
    "fine_tune_at": {"fixed": 0.9}, "learning_rate": {"choice": [0.02, 0.01]},
}


def _sweep(tmp_path, class_folder, trial_process, experiment, space=FINE_TUNE, max_trials=2):
    return sweep_by_learning_rate(tmp_path, class_folder, space, experiment, trial_process, max_trials)


def test_spec_survives_json():
    spec = TrialSpec(run=RunConfig(dropout=0.1, fine_tune_at="all"), dataset="d", split=None, log_models="best",
                     verbose=0, trial_dir="/t", export_metadata={"trial_id": "0"}, run_spec={"name": "trial-0"},
                     params={}, journal="/j", stop_epoch=4, best=0.5, checkpoint=True)
    assert TrialSpec.from_json(spec.to_json()) == spec


def test_a_trial_in_a_fresh_process_gives_what_it_gives_in_the_sweeps(tmp_path, tracking_store, class_folder):
    same, _ = _sweep(tmp_path / "a", class_folder, "same", "same", max_trials=1)
    fresh, tuner = _sweep(tmp_path / "b", class_folder, "auto", "fresh", max_trials=1)
    assert tuner.config.trial_process == "auto"
    for lr in (0.02,):
        a, b = same[lr], fresh[lr]
        assert a.info.status == b.info.status == "FINISHED"
        assert b.data.params["feature_cache"] == a.data.params["feature_cache"]
        for name in ("val_accuracy", "test_accuracy", "head_test_accuracy", "loss"):
            assert b.data.metrics[name] == pytest.approx(a.data.metrics[name], abs=1e-6), name
        history = [m.value for m in MlflowClient().get_metric_history(b.info.run_id, "val_loss")]
        assert history == pytest.approx([m.value for m in MlflowClient().get_metric_history(a.info.run_id, "val_loss")])
        assert "checkpoint" in {f.path for f in MlflowClient().list_artifacts(b.info.run_id)}
    # the fresh process wrote its request and answer beside the trial's checkpoint
    answers = sorted((tmp_path / "b" / "state").rglob("answer.json"))
    assert len(answers) == 1 and "output" in json.loads(answers[0].read_text())


def test_a_killed_trial_process_fails_its_trial_and_the_sweep_goes_on(tmp_path, tracking_store, class_folder):
    """The kernel's out-of-memory killer sends SIGKILL: here a thread sends it to the first trial's process."""
    killed = []

    def kill_first_trial_process():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for child in psutil.Process().children(recursive=True):
                try:
                    if "sweeps.trial" in child.cmdline():
                        time.sleep(2)  # inside the trial: importing, loading or training
                        child.kill()
                        killed.append(child.pid)
                        return
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_trial_process, daemon=True)
    killer.start()
    runs, tuner = _sweep(tmp_path, class_folder, "fresh", "oom")
    killer.join()
    assert killed, "no trial process was seen"
    assert runs[0.02].info.status == "FAILED"
    assert runs[0.02].data.tags["error"] == ("FailedTrialError: the trial's process was killed by SIGKILL; the kernel "
                                             "kills a process this way when memory runs out")
    assert runs[0.01].info.status == "FINISHED"
    assert [t.status for t in tuner.oracle.trials.values()] == ["FAILED", "COMPLETED"]


def test_heads_on_cached_features_stay_in_the_sweeps_process(tmp_path, tracking_store, class_folder, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))  # features not cached yet
    heads = {**FINE_TUNE, "fine_tune": {"fixed": False}, "learning_rate": {"choice": [0.02, 0.01, 0.005]}}
    runs, tuner = _sweep(tmp_path, class_folder, "auto", "heads", space=heads, max_trials=3)
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    # the first trial computes the features in a fresh process; the next two train heads here
    answers = {p.parent.name for p in (tmp_path / "state").rglob("answer.json")}
    assert answers == {"trial_0"}
    assert tuner.data_cache, "the sweep's process loaded the data for its in-process trials"


@pytest.mark.slow
def test_the_next_trials_process_is_started_while_a_trial_runs_and_ended_with_the_sweep(tmp_path, class_folder):
    from sweeps import trial as trials

    def spec(n):
        return TrialSpec(run=RunConfig(image_size=32, epochs=1, fine_tune=False), dataset=str(class_folder), split=None,
                         log_models="best", verbose=0, trial_dir=str(tmp_path / f"t{n}"), export_metadata={},
                         run_spec={}, params={}, journal=str(tmp_path / "journal"), checkpoint=True)

    first = trials.run_fresh(spec(0))
    spare = trials._spare[0]
    assert spare.poll() is None, "a spare process waits for the next trial"
    second = trials.run_fresh(spec(1))
    assert spare.poll() == 0, "the spare ran the second trial and exited"
    assert second.val_accuracy == pytest.approx(first.val_accuracy, abs=1e-6)  # the same trial, the same result
    assert json.loads((tmp_path / "t1" / "answer.json").read_text())["output"]
    waiting = trials._spare[0]
    trials.close_spare()
    assert waiting.poll() is not None and trials._spare is None
