"""What tests share besides fixtures (``from support import ...``; ``pythonpath`` in pyproject.toml): the real
flowers' path, generated image folders, the process checks, a sweep by learning rate. Fixtures are in the conftest.py
of the level that uses them (tests/conftest.py for all levels)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Messages name the setting as the user typed it: make's variable under make (pipeline.errors.typed), else the flag.
# `make test` runs the tests under make; they pin the flags, and set MAKELEVEL where they check make's names.
os.environ.pop("MAKELEVEL", None)

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the checkout
FLOWERS = ROOT.parent / "shared" / "data" / "flower_photos"
COLORS = {"blue": (30, 40, 210), "green": (30, 200, 40), "red": (210, 30, 40)}


IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")  # CI runs with CI=true


def missing(reason: str) -> None:
    """A test that cannot run here: skipped on a developer's machine, FAILED in CI (where a skip would hide it)."""
    if IN_CI:
        pytest.fail(f"{reason}; CI (CI={os.environ['CI']}) must provide it: run `make install` (it installs Chromium "
                    "where apt-get exists) and put the data set at ../shared/data", pytrace=False)
    pytest.skip(reason)


def needs_flowers():
    """Mark a test (or a module, in ``pytestmark``) that needs ../shared/data/flower_photos."""
    return pytest.mark.usefixtures("_flowers_present")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def headless(browser: str, profile: Path, *args: str, timeout: float = 120) -> str:
    """Run headless Chromium (``--screenshot=…`` or ``--dump-dom``) and return its standard output."""
    import subprocess

    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", *args],
                         check=True, timeout=timeout, capture_output=True, text=True)
    return out.stdout


# Every process a test starts inherits this (tests pass {**os.environ, ...} to their children): the processes of this
# session are the ones that carry it, whatever their command line (a server's uvicorn worker names no test folder).
SESSION = "TLSWEEP_TEST_SESSION"
os.environ[SESSION] = str(os.getpid())
# What must never outlive its test: MLflow servers and their uvicorn/gunicorn workers and job runners, tlsweep's
# commands, sweeps, chiefs, workers, trial and export processes. (Not yet: the journal's plot renderer, which a test
# that never closes its journal leaves until the session ends.)
SERVERS_AND_SWEEPS = re.compile(r"mlflow|uvicorn|gunicorn|huey|tracking\.server|sweeps\.|/tlsweep\b")


def processes_left(kinds: re.Pattern | None = SERVERS_AND_SWEEPS) -> list:
    """Processes this test session started (directly or not) that are still running (zombies aside), whose command
    line matches ``kinds`` (None: any)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status", "cmdline", "ppid"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if kinds is not None and not kinds.search(" ".join(proc.info["cmdline"] or [])):
            continue
        try:
            if proc.environ().get(SESSION) == os.environ[SESSION]:
                found.append(proc)
        except psutil.Error:  # ended meanwhile, or another user's
            continue
    return found


def no_process_left(grace: float = 20.0) -> str:
    """Wait up to ``grace`` seconds for this session's servers and sweeps to end; kill those that do not (so that the
    next tests run clean) and describe them, or return ""."""
    import time

    import psutil

    deadline = time.monotonic() + grace
    while (left := processes_left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return "; ".join(describe(proc) for proc in left)


def describe(proc) -> str:
    """A process found by ``processes_left``: its pid, parent and command line."""
    return f"pid {proc.pid} (parent {proc.info['ppid']}): {' '.join(proc.info['cmdline'] or [])[:200]}"


# What the product writes in its working directory; a test must write these in its own tmp_path.
WORKING_OUTPUTS = ("mlflow.db", "mlruns", "mlartifacts", "sweeps_state", "exports", "reports")


def saved_trials(state_dir: Path) -> list:
    """Keras Tuner's trials as a sweep's state folder keeps them (``trial.json``), in trial order."""
    import keras_tuner as kt

    trials = [kt.engine.trial.Trial.load(str(p)) for p in Path(state_dir).rglob("trial.json")]
    return sorted(trials, key=lambda t: int(t.trial_id))


def sweep_by_learning_rate(folder: Path, dataset: Path, space: dict, experiment: str, trial_process: str = "auto",
                           max_trials: int = 2):
    """A grid sweep (``log_models: best``) with its file and state in ``folder``: its trial runs by learning
    rate, and Keras Tuner's saved trials."""
    import mlflow
    import yaml

    from sweeps.run import run_sweep

    config = {"tuner": "grid", "max_trials": max_trials, "log_models": "best", "trial_process": trial_process,
              "space": space}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{experiment}.yaml").write_text(yaml.safe_dump(config))
    parent = run_sweep(str(dataset), sweep=str(folder / f"{experiment}.yaml"), experiment=experiment,
                       state_dir=str(folder / "state"), verbose=0, progress=False)
    exp = mlflow.get_experiment_by_name(experiment).experiment_id
    kids = mlflow.tracking.MlflowClient().search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {float(k.data.params["learning_rate"]): k for k in kids}, saved_trials(folder / "state")


def random_oracle(tmp_path: Path):
    """A Keras Tuner random oracle of 3 trials over one choice, saving in ``tmp_path``: what the patch and
    worker tests drive by hand."""
    import keras_tuner as kt

    hp = kt.HyperParameters()
    hp.Choice("dropout", [0.1, 0.2, 0.3])
    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=3, seed=1)
    oracle._set_project_dir(str(tmp_path), "p")
    oracle.update_space(hp)
    return oracle


def trial_workers(under: Path | None = None, of: int | None = None) -> list:
    """Trial processes: the sweep's pool workers (``multiprocessing`` spawn children), those of the sweep process
    ``of`` (its descendants), or those of a sweep whose environment names ``under`` (a test's folder: workers inherit
    the sweep's environment, and outlive a sweep killed with SIGKILL only if something is wrong)."""
    import psutil

    procs = psutil.Process(of).children(recursive=True) if of is not None else psutil.process_iter()
    found = []
    for proc in procs:
        try:
            if "spawn_main" not in " ".join(proc.cmdline()):
                continue
            if under is None or str(under) in " ".join(proc.environ().values()):
                found.append(proc)
        except psutil.Error:  # it ended meanwhile, or is not ours to read
            pass
    return found


def write_image(path: Path, color, size=(40, 48), mode="RGB", seed=0) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.normal(0, 25, (size[0], size[1], 3)), 0, 255).astype("uint8")
    image = Image.fromarray(pixels)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_class_folder(root: Path, per_class: int = 12, classes=("blue", "green", "red")) -> Path:
    """``root/<class>/*.{jpg,png}`` with one colour per class, mixing JPEG, PNG, grayscale and RGBA."""
    for c in classes:
        for i in range(per_class):
            kind = i % 4
            suffix, mode = [(".jpg", "RGB"), (".png", "RGB"), (".png", "RGBA"), (".jpg", "RGB")][kind]
            write_image(root / c / f"{c}_{i:03d}{suffix}", COLORS[c], mode=mode, seed=i)
    return root


@contextlib.contextmanager
def children_sigint(disposition: Any = signal.default_int_handler) -> Iterator[None]:
    """Processes started inside get SIGINT as ``disposition`` gives it: ``default_int_handler`` as from a terminal
    (exec resets a handled signal to its default; background jobs of non-interactive shells, as in CI, inherit it
    ignored), ``SIG_IGN`` as a script's background command (ignored, inherited through exec). Set in this process
    around the fork, not in the child: code run between fork and exec (``preexec_fn``) is unsafe in a process with
    threads (a sweep started that way once died of SIGABRT before its first trial, with gRPC's threads running)."""
    old = signal.signal(signal.SIGINT, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
