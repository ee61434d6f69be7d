"""The chief's monitor requeues the trial of a silent worker; a stamped run keeps its trial."""

import time

import keras_tuner as kt
import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from sweeps import workers
from tracking import layout, runs, store


def _oracle(tmp_path):
    hp = kt.HyperParameters()
    hp.Choice("dropout", [0.1, 0.2, 0.3])
    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=3, seed=1)
    oracle._set_project_dir(str(tmp_path), "p")
    oracle.update_space(hp)
    return oracle


def test_a_silent_workers_trial_goes_to_the_next_worker(tmp_path, tracking_store):
    exp = store.experiment_id("m")
    parent = runs.start_parent(exp, "m:s", "sweep-s")
    oracle = _oracle(tmp_path)
    t1 = oracle.create_trial("w1")
    t2 = oracle.create_trial("w2")
    dead = runs.create_child(exp, parent, "trial-0", {layout.TRIAL_ID: t1.trial_id, layout.WORKER: "w1"})
    alive = runs.create_child(exp, parent, "trial-1", {layout.TRIAL_ID: t2.trial_id, layout.WORKER: "w2"})
    monitor = workers.WorkerMonitor(oracle, exp, parent, timeout=60)
    start = time.time()
    assert monitor.check(now=start) == []  # both first seen now
    runs.stamp(alive)
    assert monitor.check(now=start + 59) == []
    MlflowClient().set_tag(alive, layout.HEARTBEAT, f"{start + 50:.0f}")  # w2 beats on; w1 never did
    assert monitor.check(now=start + 61) == [t1.trial_id]
    assert set(oracle.ongoing_trials) == {"w2"} and "w1" not in oracle.tuner_ids
    assert MlflowClient().get_run(dead).info.status == "KILLED"
    assert MlflowClient().get_run(alive).info.status == "RUNNING"
    assert oracle.create_trial("w3").trial_id == t1.trial_id  # the requeued trial comes first
    runs.end_run(alive, "FINISHED")
    runs.end_parent(parent)


def test_bad_heartbeat_settings_are_one_clear_error(monkeypatch):
    monkeypatch.setenv("TLSWEEP_WORKER_TIMEOUT", "ten")
    with pytest.raises(UserError, match=r"TLSWEEP_WORKER_TIMEOUT='ten' is not a number of seconds above 0; unset it "
                                        r"for 600"):
        workers.worker_timeout()
    monkeypatch.setenv("TLSWEEP_HEARTBEAT_SECONDS", "0")
    with pytest.raises(UserError, match=r"TLSWEEP_HEARTBEAT_SECONDS='0'"):
        workers.heartbeat_seconds()


class _Tiny(workers.WaitsWhenIdle, kt.engine.base_tuner.BaseTuner):
    idle_wait = 0.2

    def run_trial(self, trial, *args, **kwargs):
        return {"val_accuracy": 0.5}


def test_a_worker_with_nothing_to_run_waits_instead_of_asking_without_end(tmp_path, capsys):
    # A grid search has one point; another worker holds it. Until that trial ends the oracle answers IDLE,
    # and Keras Tuner's loop would ask again at once (about 22,000 requests a second, measured without the wait).
    oracle = kt.oracles.GridSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=5)
    tuner = _Tiny(oracle=oracle, hypermodel=lambda hp: hp.Choice("dropout", [0.1]), directory=str(tmp_path),
                  project_name="p")
    held = oracle.create_trial("other")
    asked = []
    create_trial = oracle.create_trial

    def ask(tuner_id):
        asked.append(time.monotonic())
        if len(asked) == 3:  # the other worker reports first: this answer is STOPPED
            held.status = "COMPLETED"
            oracle.update_trial(held.trial_id, {"val_accuracy": 0.9})
            oracle.end_trial(held)
        return create_trial(tuner_id)

    oracle.create_trial = ask
    tuner.search()
    assert len(asked) == 3  # IDLE, IDLE, then STOPPED once the other trial ended
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert min(gaps) >= 0.2, gaps  # it waited idle_wait before asking again
    assert capsys.readouterr().out.count("no trial to run until one running on another worker ends") == 1


def test_sending_a_conditional_space_to_workers_prints_nothing(capsys):
    from keras_tuner.src.engine import conditions

    proto = conditions.Parent("fine_tune", [True]).to_proto()  # keras-tuner 1.4.7 printed "True" here
    assert list(proto.parent.values)[0].boolean_value is True
    assert capsys.readouterr().out == ""


def test_a_worker_with_no_trial_left_waits_while_another_workers_trial_runs(tmp_path):
    """Keras Tuner answers STOPPED once max_trials trials exist; had w2 stopped then, w1's trial, requeued when w1
    fell silent, would have gone to nobody. w2 waits (IDLE) until no trial runs, and takes a requeued one."""
    oracle = _oracle(tmp_path)
    workers.wait_for_running_trials(oracle)
    t0, t1, t2 = (oracle.create_trial(w) for w in ("w1", "w2", "w3"))
    oracle.end_trial(t1)
    oracle.end_trial(t2)
    assert oracle.create_trial("w2").status == kt.engine.trial.TrialStatus.IDLE  # all 3 exist; w1's still runs
    assert "w2" in oracle.tuner_ids
    assert workers._requeue(oracle, "w1", t0.trial_id)  # w1 fell silent
    again = oracle.create_trial("w2")
    assert again.trial_id == t0.trial_id and again.status == kt.engine.trial.TrialStatus.RUNNING
    oracle.end_trial(again)
    assert oracle.create_trial("w2").status == kt.engine.trial.TrialStatus.STOPPED  # nothing runs anywhere
    assert oracle.create_trial("w3").status == kt.engine.trial.TrialStatus.STOPPED
