"""Keras Tuner's chief/worker mode with every process logging to one `mlflow server`, all real processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import children_sigint
from sweeps.cli import main as sweeps_main
from tracking.layout import TRIAL_ID, WORKER
from tracking.server import free_port, start_local, stop_group
from tracking.runs import values

ROOT = Path(__file__).resolve().parents[2]
SWEEP = {
    "tuner": "grid",
    "max_trials": 6,
    "log_models": "best",
    "trial_process": "same",  # fast; the test of a killed worker runs trials in fresh processes
    "space": {
        "backbone": {"fixed": "efficientnet_lite0"},
        "image_size": {"fixed": 32},
        "dropout": {"choice": [0.1, 0.2, 0.3]},
        "fine_tune": {"boolean": True},
        "epochs": {"fixed": 2},
        "fine_tune_epochs": {"fixed": 1},
        "fine_tune_at": {"fixed": 120},
        "learning_rate": {"fixed": 0.01},
        "batch_size": {"fixed": 8},
    },
}


def start(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    with children_sigint():  # as from a terminal: background jobs of a non-interactive shell would ignore SIGINT
        return subprocess.Popen(args, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on ``port`` with the SQLite store and artifact root in ``folder``, as `make server` starts it,
    in its own process group (``stop_group`` ends it with its uvicorn worker); waits until it answers."""
    return start_local(f"sqlite:///{folder / 'server.db'}", str(folder / "artifacts"), folder / "server.log", port)[0]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    proc = start_server(tmp_path, port)
    yield f"http://127.0.0.1:{port}"
    stop_group(proc)


class Sweep:
    """A chief and workers started as `make sweep-chief` / `make sweep-worker` start them."""

    def __init__(self, tmp_path: Path, uri: str, dataset: str):
        self.tmp, self.uri = tmp_path, uri
        self.oracle = f"127.0.0.1:{free_port()}"
        self.configure()
        self.args = [sys.executable, "-m", "sweeps.cli", "sweep", "--dataset", dataset, "--sweep",
                     str(tmp_path / "dist.yaml"), "--experiment", "dist", "--split", "60/20/20", "--state-dir",
                     str(tmp_path / "state"), "--tracking-uri", uri, "--quiet", "--oracle", self.oracle]
        self.procs: dict[str, subprocess.Popen] = {}

    def configure(self, **changes) -> None:
        (self.tmp / "dist.yaml").write_text(yaml.safe_dump({**SWEEP, **changes}))

    def chief(self) -> subprocess.Popen:
        self.procs["chief"] = start([*self.args, "--role", "chief"], ROOT, self.tmp / "chief.log")
        return self.procs["chief"]

    def worker(self, name: str) -> subprocess.Popen:
        self.procs[name] = start([*self.args, "--role", "worker", "--worker-id", name], ROOT,
                                 self.tmp / f"{name}.log")
        return self.procs[name]

    def wait(self, timeout: float = 600) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{name} still running after {timeout} s; logs:\n{self.logs()}")
        return codes

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture
def sweep(tmp_path, server, class_folder, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))
    s = Sweep(tmp_path, server, str(class_folder))
    yield s
    s.kill()


def running_trial(sweep: Sweep, client: MlflowClient, worker: str, extra: str = ""):
    """The run of a trial the worker is running now (waits for one)."""
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, sweep.logs()
        exp = client.get_experiment_by_name("dist")
        running = client.search_runs(
            [exp.experiment_id], f"attributes.status = 'RUNNING' and tags.`{WORKER}` = '{worker}' {extra}") if exp else []
        if running:
            return running[0]
        time.sleep(0.2)


def check_one_finished_run_per_trial(uri: str, trials: int = 6) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dist")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`tlsweep.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert sorted(k.data.tags[TRIAL_ID] for k in finished) == [str(i) for i in range(trials)], "each trial ran once"
    assert not [k for k in kids if k.info.status == "RUNNING"]
    # Several writers lost nothing: every run has all its metrics, every step, and its artifacts.
    for kid in finished:
        fine_tuned = values(kid)["fine_tune"] == "True"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert len(client.get_metric_history(kid.info.run_id, key)) == (3 if fine_tuned else 2), key
        assert {"test_accuracy", "wall_seconds", "trainable_params"} <= set(kid.data.metrics)
        assert len(client.list_artifacts(kid.info.run_id, "plots")) == 3
        assert [a.path for a in client.list_artifacts(kid.info.run_id, "checkpoint")] == [
            "checkpoint/weights.npz" if fine_tuned else "checkpoint/head.keras"]
        assert kid.data.tags[WORKER] in {"w1", "w2"}
    assert parent.data.tags["tlsweep.best_run_id"] in {k.info.run_id for k in finished}
    return kids


@pytest.mark.slow  # the default tier has the same checks in the test of a killed worker below
def test_chief_and_two_workers_share_one_sweep_and_one_tracking_server(sweep, tmp_path, capsys):
    sweep.chief()
    sweep.worker("w1")
    sweep.worker("w2")
    codes = sweep.wait()
    assert codes == {"chief": 0, "w1": 0, "w2": 0}, sweep.logs()
    kids = check_one_finished_run_per_trial(sweep.uri)
    assert len(kids) == 6
    assert "chief: serving the oracle on 127.0.0.1:" in (tmp_path / "chief.log").read_text()

    assert sweeps_main(["best-export", "--experiment", "dist", "--export-dir", str(tmp_path / "exports"),
                        "--tracking-uri", sweep.uri]) == 0
    out = capsys.readouterr().out
    assert "parity: the export reproduces test_accuracy=" in out
    assert (tmp_path / "exports" / "dist" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_restarted_and_the_sweep_finishes(sweep):
    sweep.chief()
    w1 = sweep.worker("w1")
    sweep.worker("w2")
    client = MlflowClient(sweep.uri)
    victim = running_trial(sweep, client, "w1")  # kill w1 while it runs a trial
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    # The same command again: the chief gives w1 its unfinished trial back (well within the worker timeout;
    # a grid search's next points may wait on that trial's result meanwhile, and w2 waits with them).
    sweep.worker("w1")
    codes = sweep.wait()
    assert codes == {"chief": 0, "w1": 0, "w2": 0}, sweep.logs()
    kids = check_one_finished_run_per_trial(sweep.uri)
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["tlsweep.closed_by"] == "resume: its process died"
    assert len(kids) == 7, "six finished trials and the killed attempt"
    rerun = [k for k in kids if k.info.status == "FINISHED" and k.data.tags[TRIAL_ID] == victim.data.tags[TRIAL_ID]]
    assert [k.data.tags[WORKER] for k in rerun] == ["w1"], "the restarted worker got its own trial back"


@pytest.mark.slow
def test_a_worker_killed_mid_trial_and_not_restarted_has_its_trial_given_to_another(sweep, monkeypatch, tmp_path,
                                                                                     capsys):
    # Short heartbeat and timeout (defaults 30 s and 600 s), read by the chief and the workers.
    monkeypatch.setenv("TLSWEEP_HEARTBEAT_SECONDS", "2")
    monkeypatch.setenv("TLSWEEP_WORKER_TIMEOUT", "15")
    sweep.configure(trial_process="auto", max_trials=4)  # fine-tuning trials in fresh processes: they die with w1
    sweep.chief()
    w1 = sweep.worker("w1")
    sweep.worker("w2")
    client = MlflowClient(sweep.uri)
    victim = running_trial(sweep, client, "w1", "and tags.`tlsweep.heartbeat` != ''")  # after its first heartbeat
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    del sweep.procs["w1"]
    codes = sweep.wait()
    assert codes == {"chief": 0, "w2": 0}, sweep.logs()
    kids = check_one_finished_run_per_trial(sweep.uri, trials=4)
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["tlsweep.closed_by"].startswith("chief: worker w1 sent no heartbeat for ")
    rerun = [k for k in kids if k.info.status == "FINISHED" and k.data.tags[TRIAL_ID] == victim.data.tags[TRIAL_ID]]
    assert [k.data.tags[WORKER] for k in rerun] == ["w2"]
    assert "trial %s goes to the next worker that asks" % victim.data.tags[TRIAL_ID] in sweep.logs()
    logs = "".join(log.read_text() for log in tmp_path.glob("*.log"))
    assert "\nTrue\n" not in logs, "keras-tuner's stray print of conditional hyperparameters is silenced"
    assert not trial_processes_under(sweep.tmp), "w1's trial process outlived it"

    assert sweeps_main(["best-export", "--experiment", "dist", "--export-dir", str(tmp_path / "exports"),
                        "--tracking-uri", sweep.uri]) == 0
    assert "parity: the export reproduces test_accuracy=" in capsys.readouterr().out


def trial_processes_under(folder: Path) -> list:
    """Trial processes (pool workers) of a sweep whose environment names ``folder``."""
    from support import trial_workers

    return trial_workers(under=folder)
