"""One trial per GPU behind one command (``GPUS=``): the pure logic, then real processes on this GPU-less machine."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import children_sigint, describe, processes_left
from pipeline.errors import UserError
from sweeps import gpus
from test_distributed import SWEEP as DISTRIBUTED_SWEEP
from sweeps.cli import main as sweeps_main
from tracking.layout import DEVICE, PRECISION, TRIAL_ID, WORKER
from tracking.runs import values

ROOT = Path(__file__).resolve().parents[2]


# -- the pure logic (default tier) ----------------------------------------------------------------


@pytest.mark.parametrize("text,available,expected", [
    ("all", ["0", "1", "2", "3"], ["0", "1", "2", "3"]),
    ("ALL", ["1", "3"], ["1", "3"]),  # CUDA_VISIBLE_DEVICES narrowed what the launcher may use
    ("0,1,3", ["0", "1", "2", "3"], ["0", "1", "3"]),
    (" 2 ", ["0", "1", "2"], ["2"]),
    ("0,1", [], ["0", "1"]),  # no GPU here: pinned workers on the CPU (what the tests run)
])
def test_gpus_names_the_workers(text, available, expected):
    assert gpus.parse_gpus(text, available) == expected


@pytest.mark.parametrize("text,available,message", [
    ("abc", ["0", "1"], "--gpus 'abc' is not 'all' or a comma-separated list of GPU ids like 0,1,3 (the numbers "
                        "nvidia-smi shows)"),
    ("0,,1", ["0", "1"], "--gpus '0,,1' is not 'all' or a comma-separated list of GPU ids like 0,1,3 (the numbers "
                         "nvidia-smi shows)"),
    ("-1", ["0", "1"], "--gpus '-1' is not 'all' or a comma-separated list of GPU ids like 0,1,3 (the numbers "
                       "nvidia-smi shows)"),
    ("0,0", ["0", "1"], "--gpus '0,0' names GPU 0 more than once; give each GPU once (one worker per GPU)"),
    ("9", ["0", "1"], "--gpus '9' names GPU 9, but this machine has 2 GPUs (0, 1); give ids among them or --gpus all"),
    ("all", [], "--gpus all, but no GPU is visible on this machine (nvidia-smi lists none); run without --gpus to sweep "
                "on the CPU, or give ids (--gpus 0,1) to run pinned workers on the CPU anyway"),
])
def test_bad_gpus_values_are_one_line_errors(text, available, message, monkeypatch):
    with pytest.raises(UserError) as e:
        gpus.parse_gpus(text, available)
    assert str(e.value) == message
    monkeypatch.setenv("MAKELEVEL", "1")  # `make sweep GPUS=...`: the variable as typed
    with pytest.raises(UserError) as e:
        gpus.parse_gpus(text, available)
    as_make = message
    for flag, variable in (("--gpus '", "GPUS='"), ("--gpus all", "GPUS=all"), ("--gpus 0,1", "GPUS=0,1"),
                           ("--gpus", "GPUS=")):
        as_make = as_make.replace(flag, variable)
    assert str(e.value) == as_make


def test_each_worker_is_pinned_to_its_gpu_with_memory_growth_and_the_chief_sees_none():
    base = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    env = gpus.worker_env("3", base)
    assert env == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                   "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert gpus.chief_env(base)["CUDA_VISIBLE_DEVICES"] == ""
    assert gpus.worker_id("3") == "gpu3"
    assert base["CUDA_VISIBLE_DEVICES"] == "0,1,2,3", "the caller's environment is not changed"


def test_no_nvidia_smi_means_no_gpu():
    assert gpus.available_gpus({"PATH": "/nonexistent"}) == [] or os.path.exists("/usr/bin/nvidia-smi")


def test_gpus_with_a_role_or_a_staged_sweep_is_refused_in_one_line(class_folder, capsys, tmp_path):
    assert sweeps_main(["sweep", "--dataset", str(class_folder), "--gpus", "0", "--role", "chief"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --gpus starts its own chief and workers; drop --role (make sweep-chief / sweep-worker)")
    assert sweeps_main(["sweep", "--dataset", str(class_folder), "--gpus", "0", "--sweep", "tf_flowers_staged"]) == 2
    assert "error: a staged search (stage2: in " in capsys.readouterr().err
    assert sweeps_main(["sweep", "--dataset", str(class_folder), "--gpus", "0,0", "--state-dir", str(tmp_path / "s"),
                        "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --gpus '0,0' names GPU 0 more than once; give each GPU once (one worker per GPU)")


# -- real processes: a chief, two pinned workers and an mlflow server over the user's SQLite store -------

# test_distributed's tiny sweep; random: a finished grid search is not extended by a larger MAX_TRIALS (Keras
# Tuner's grid state); fine-tuning trials in fresh processes under the pinned workers
SWEEP = {**DISTRIBUTED_SWEEP, "tuner": "random", "max_trials": 4, "trial_process": "auto"}


def _command(tmp_path: Path, dataset: Path, **changes) -> list[str]:
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump({**SWEEP, **changes}))
    return [sys.executable, "-m", "sweeps.cli", "sweep", "--dataset", str(dataset), "--sweep",
            str(tmp_path / "gpu.yaml"), "--experiment", "gpus", "--split", "60/20/20", "--state-dir",
            str(tmp_path / "state"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet",
            "--gpus", "0,1", "--device", "cpu"]  # no GPU here: the pinned workers run on the CPU on purpose


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", "TLSWEEP_CACHE": str(tmp_path / "cache")}


def _leftovers(folder: Path) -> list:
    """Processes the launcher started (server and its uvicorn worker, chief, workers, trials) that still run: every
    process of this test session (conftest), a few seconds allowed for the last to exit."""
    deadline = time.monotonic() + 10
    while (left := processes_left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [describe(p) for p in left]


def _runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gpus")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`tlsweep.kind` = 'sweep'")
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, kids


def _check_every_trial_once_on_its_pinned_worker(tmp_path: Path, trials: int) -> list:
    client, parent, kids = _runs(tmp_path)
    assert parent.info.status == "FINISHED"
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert sorted(k.data.tags[TRIAL_ID] for k in finished) == [str(i) for i in range(trials)], "each trial once"
    assert not [k for k in kids if k.info.status == "RUNNING"], "nothing left RUNNING"
    for kid in finished:
        worker = kid.data.tags[WORKER]
        assert worker in ("gpu0", "gpu1")
        assert values(kid)[DEVICE] == f"CPU (CUDA_VISIBLE_DEVICES={worker[3:]})"
        assert values(kid)[PRECISION] == "float32"  # auto on a CPU
        assert [a.path for a in client.list_artifacts(kid.info.run_id, "checkpoint")], "artifacts in the user's store"
    assert parent.data.tags["tlsweep.best_run_id"] in {k.info.run_id for k in finished}
    return kids


@pytest.mark.slow  # about 6 minutes on 2 shared cores: two sweeps of a chief, two workers and a server
def test_gpus_0_1_runs_two_pinned_workers_every_trial_once_and_resumes(tmp_path, class_folder):
    command = _command(tmp_path, class_folder)
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "no GPU visible on this machine; the 2 pinned workers run on the CPU" in done.stderr
    assert "workers: gpu0 on CUDA_VISIBLE_DEVICES=0, gpu1 on CUDA_VISIBLE_DEVICES=1" in done.stdout
    assert done.stdout.count("leaderboard of 'gpus' (4 trials") == 1, "printed once, by the launcher"
    assert "View run" not in done.stdout
    kids = _check_every_trial_once_on_its_pinned_worker(tmp_path, 4)
    assert {k.data.tags[WORKER] for k in kids} == {"gpu0", "gpu1"}, "both workers ran trials"
    assert not _leftovers(tmp_path), "no process left behind"
    print(f"GPUS=0,1 sweep of 4 trials: {seconds:.1f} s")

    # The same command again with one trial more: nothing runs twice, the new trial runs once.
    again = subprocess.run(command[:-4] + ["--max-trials", "5", *command[-4:]], cwd=ROOT, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    _check_every_trial_once_on_its_pinned_worker(tmp_path, 5)
    assert len(_runs(tmp_path)[2]) == 5
    assert not _leftovers(tmp_path)


@pytest.mark.slow
def test_sigterm_stops_every_process_it_started_and_the_same_command_resumes(tmp_path, class_folder):
    # The signal goes out when the launcher relays a worker's first "[sweep] trial ..." line: one trial has
    # finished, so the sweep is mid-way whatever the machine's speed (MAX_TRIALS 4 on two workers: at least two
    # trials are not even handed out yet, and each trains for many epochs), and the chief can only end KILLED. It
    # lands where a worker has just finished a trial and may not have told the chief yet: resume must not run that
    # trial twice. (A trial's run showing RUNNING is no such moment: runs are created on the journal's background
    # thread, and the test's polling raced with the trials.)
    command = _command(tmp_path, class_folder, space={**SWEEP["space"], "epochs": {"fixed": 12},
                                                      "fine_tune": {"fixed": True}, "fine_tune_epochs": {"fixed": 60},
                                                      "learning_rate": {"choice": [0.01, 0.005]}})  # 6 points
    log = (tmp_path / "launcher.log").open("w")
    # Started as a script's background command is (`cmd &` without job control): with SIGINT ignored, which its
    # children inherit. The launcher must stop them anyway (it once sent them SIGINT, and they trained on).
    with children_sigint(signal.SIG_IGN):
        proc = subprocess.Popen(command, cwd=ROOT, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "[sweep] trial " not in (tmp_path / "launcher.log").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "launcher.log").read_text()[-4000:]
        time.sleep(0.1)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 130, (tmp_path / "launcher.log").read_text()[-4000:]
    stopped = time.monotonic() - signalled
    print(f"GPUS=0,1 sweep stopped {stopped:.1f} s after SIGTERM")
    # A clean stop, not the launcher's SIGKILL after STOP_SECONDS (a stopping worker asked the gone chief and waited)
    assert stopped < gpus.STOP_SECONDS, (tmp_path / "launcher.log").read_text()[-4000:]
    assert not _leftovers(tmp_path), "every process it started has ended"
    _, parent, kids = _runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert not [k for k in kids if k.info.status == "RUNNING"]
    done = subprocess.run(command, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    _check_every_trial_once_on_its_pinned_worker(tmp_path, 4)
    assert not _leftovers(tmp_path)
