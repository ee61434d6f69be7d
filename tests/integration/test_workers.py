"""The chief's monitor requeues the trial of a silent worker; a stamped run keeps its trial."""

import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from support import random_oracle
from sweeps import workers
from tracking import layout, runs, store


def test_a_silent_workers_trial_goes_to_the_next_worker(tmp_path, tracking_store):
    exp = store.experiment_id("m")
    parent = runs.start_parent(exp, "m:s", "sweep-s")
    oracle = random_oracle(tmp_path)
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


def test_a_worker_knows_the_sweep_ended_only_from_an_end_after_it_began(tracking_store):
    """A parent FINISHED before the worker began (an earlier end of a sweep now extended) is not this end."""
    exp = store.experiment_id("m")
    parent = runs.start_parent(exp, "m:s", "sweep-s")
    runs.end_parent(parent)  # the sweep ended once
    since = time.time() + 1
    assert not runs.finished_since(parent, since)
    runs.start_parent(exp, "m:s", "sweep-s")  # the chief started again (more trials), and the worker began
    assert not runs.finished_since(parent, since)
    time.sleep(1.1)
    runs.end_parent(parent, "KILLED")
    assert not runs.finished_since(parent, since), "a chief killed is waited for"
    runs.start_parent(exp, "m:s", "sweep-s")
    runs.end_parent(parent)
    assert runs.finished_since(parent, since)
