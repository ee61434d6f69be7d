"""A trial runs the same in the sweep's process and in a pool worker; a dying trial process fails only its trial."""

import contextlib
import os
import pickle
import subprocess
import sys
import threading
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from support import sweep_by_learning_rate, trial_workers
from pipeline.hparams import RunConfig
from sweeps.trial import TrialSpec
from tracking.runs import values

FINE_TUNE = {  # a trial that trains the whole network: "auto" runs it in a fresh process
    "backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "batch_size": {"fixed": 8},
    "epochs": {"fixed": 2}, "fine_tune": {"fixed": True}, "fine_tune_epochs": {"fixed": 1},
    "fine_tune_at": {"fixed": 0.9}, "learning_rate": {"choice": [0.02, 0.01]},
}


def _sweep(tmp_path, class_folder, trial_process, experiment, space=FINE_TUNE, max_trials=2):
    return sweep_by_learning_rate(tmp_path, class_folder, space, experiment, trial_process, max_trials)


def test_a_pool_worker_ends_at_once_after_its_trial_and_keeps_its_last_output(tmp_path):
    """The pool joins an exited worker before it hands the next trial to the ready one: a worker skips the
    interpreter's teardown (TensorFlow's exit handlers, 1.4 s here), with its output flushed and exit code 0."""
    teardown = tmp_path / "teardown-ran"
    code = (f"import atexit, os\n"
            f"from sweeps import executor\n"
            f"atexit.register(lambda: open({str(teardown)!r}, 'w').close())  # as TensorFlow's, registered first\n"
            f"executor._warm(os.getppid(), {str(tmp_path / 'closed')!r}, {str(tmp_path)!r}, None, "
            f"{str(tmp_path / 'no-hint.json')!r})\n"
            f"print('last words', end='')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert (out.returncode, out.stdout) == (0, "last words"), out.stderr[-2000:]
    assert not teardown.exists()


def test_a_spec_goes_to_a_pool_worker_whole():
    spec = TrialSpec(run=RunConfig(dropout=0.1, fine_tune_at="all"), dataset="d", split=None, log_models="best",
                     verbose=0, trial_dir="/t", record_dir="/r", params={"trial_id": "0"}, stop_epoch=4, best=0.5,
                     checkpoint=True)
    assert pickle.loads(pickle.dumps(spec)) == spec


@pytest.mark.slow
def test_a_trial_in_a_fresh_process_gives_what_it_gives_in_the_sweeps(tmp_path, tracking_store, class_folder):
    same, _ = _sweep(tmp_path / "a", class_folder, "same", "same", max_trials=1)
    fresh, _ = _sweep(tmp_path / "b", class_folder, "auto", "fresh", max_trials=1)
    for lr in (0.02,):
        a, b = same[lr], fresh[lr]
        assert a.info.status == b.info.status == "FINISHED"
        assert values(b)["feature_cache"] == values(a)["feature_cache"]
        for name in ("val_accuracy", "test_accuracy", "head_test_accuracy", "loss"):
            assert b.data.metrics[name] == pytest.approx(a.data.metrics[name], abs=1e-6), name
        history = [m.value for m in MlflowClient().get_metric_history(b.info.run_id, "val_loss")]
        assert history == pytest.approx([m.value for m in MlflowClient().get_metric_history(a.info.run_id, "val_loss")])
        assert "checkpoint" in {f.path for f in MlflowClient().list_artifacts(b.info.run_id)}
        assert (a.data.tags["tlsweep.process"], b.data.tags["tlsweep.process"]) == ("sweep", "pool")


@pytest.mark.slow
def test_a_killed_trial_process_fails_its_trial_and_the_sweep_goes_on(tmp_path, tracking_store, class_folder):
    """The kernel's out-of-memory killer sends SIGKILL: here a thread sends it to the first trial's process."""
    killed = []

    started = time.time()

    def kill_first_trial_process():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for child in [w for w in trial_workers(of=psutil.Process().pid) if w.create_time() >= started - 1]:
                try:
                    time.sleep(2)  # inside the trial: importing, loading or training
                    child.kill()
                    killed.append(child.pid)
                    return
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_trial_process, daemon=True)
    killer.start()
    runs, trials = _sweep(tmp_path, class_folder, "fresh", "oom")
    killer.join()
    assert killed, "no trial process was seen"
    assert runs[0.02].info.status == "FAILED"
    assert runs[0.02].data.tags["error"] == ("FailedTrialError: the trial's process was killed by SIGKILL; the kernel "
                                             "kills a process this way when memory runs out")
    assert runs[0.01].info.status == "FINISHED"
    assert [t.status for t in trials] == ["FAILED", "COMPLETED"]


@pytest.mark.slow
def test_heads_on_cached_features_stay_in_the_sweeps_process(tmp_path, tracking_store, class_folder, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))  # features not cached yet
    heads = {**FINE_TUNE, "fine_tune": {"fixed": False}, "learning_rate": {"choice": [0.02, 0.01, 0.005]}}
    runs, _ = _sweep(tmp_path, class_folder, "auto", "heads", space=heads, max_trials=3)
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    # the first trial computes the features in a fresh process; the next two train heads here
    where = {r.data.tags["kt.trial_id"]: r.data.tags["tlsweep.process"] for r in runs.values()}
    assert where == {"0": "pool", "1": "sweep", "2": "sweep"}


@pytest.mark.slow
def test_the_next_trials_process_is_started_while_a_trial_runs_and_ended_with_the_pool(tmp_path, class_folder):
    from sweeps.executor import TrialPool

    def spec(n):
        return TrialSpec(run=RunConfig(image_size=32, epochs=1, fine_tune=False), dataset=str(class_folder), split=None,
                         log_models="best", verbose=0, trial_dir=str(tmp_path / f"t{n}"),
                         record_dir=str(tmp_path / f"r{n}"), params={}, checkpoint=True)

    pool = TrialPool(str(class_folder), None, tmp_path / "hint.json")
    me = psutil.Process().pid
    first = pool.run(spec(0))
    ready = _a_worker_at_rest(me, time.time() + 120)  # a worker got ready for the next trial
    second = pool.run(spec(1))  # the pool also starts a worker now (Python 3.11 spawns one per submit): it is cold
    ready.wait(30)  # the ready worker ran the second trial and exited
    assert second.val_accuracy == pytest.approx(first.val_accuracy, abs=1e-6)  # the same trial, the same result
    assert (tmp_path / "r1" / "plots").is_dir()
    assert not ready.is_running(), "the second trial ran in the worker that was ready"
    assert trial_workers(of=me), "and others wait for the next trial"
    pool.close()
    assert not trial_workers(of=me)


def _a_worker_at_rest(parent: int, deadline: float) -> psutil.Process:
    """The pool's worker that has used no CPU for a second: its initializer imported TensorFlow and mapped the data,
    and it waits on the pool's queue. (The first trial's worker may still be ending when its result arrives: it is
    gone within the second.)"""
    used: dict[psutil.Process, float] = {}
    while time.time() < deadline:
        now = {}
        for proc in trial_workers(of=parent):
            with contextlib.suppress(psutil.Error):
                now[proc] = sum(proc.cpu_times()[:2])
        for proc, seconds in now.items():
            with contextlib.suppress(psutil.Error):  # it ended meanwhile
                if proc in used and seconds - used[proc] < 0.02 and proc.status() != psutil.STATUS_ZOMBIE:
                    return proc
        used = now
        time.sleep(1.0)
    pytest.fail("no worker got ready for the next trial within two minutes")
