"""Shared fixtures: tiny generated image folders, a local TF-Hub SavedModel, the real flowers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from PIL import Image

FLOWERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"
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


@pytest.fixture
def _flowers_present() -> None:
    if not FLOWERS.is_dir():
        missing(f"real data not found at {FLOWERS} (the shared flower_photos data set)")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium() -> str:
    """The headless browser's executable (Debian's chromium; `make install` installs it where apt-get exists)."""
    if CHROMIUM is None:
        missing("needs Chromium (`apt-get install chromium`, which `make install` runs) for a headless screenshot")
    return CHROMIUM


def headless(browser: str, profile: Path, *args: str, timeout: float = 120) -> str:
    """Run headless Chromium (``--screenshot=…`` or ``--dump-dom``) and return its standard output."""
    import subprocess

    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", *args],
                         check=True, timeout=timeout, capture_output=True, text=True)
    return out.stdout


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Converted weights and feature caches go to a per-session directory, never the user's home."""
    os.environ["TLSWEEP_CACHE"] = str(tmp_path_factory.mktemp("tlsweep_cache"))
    yield


@pytest.fixture(autouse=True)
def _fresh_savedmodel_latencies():
    """Each test's exports measure their own SavedModel latency (the export helper keeps one per architecture for
    a whole sweep; a test must not log one an earlier test measured)."""
    import sys

    def clear() -> None:
        if (cost := sys.modules.get("pipeline.cost")) is not None:  # nothing cached before it is imported
            cost._SAVEDMODEL_LATENCY.clear()

    clear()
    yield
    clear()


# What the product writes in its working directory; a test must write these in its own tmp_path.
WORKING_OUTPUTS = ("mlflow.db", "mlruns", "mlartifacts", "sweeps_state", "exports", "reports")


@pytest.fixture(scope="session", autouse=True)
def _checkout_untouched():
    """No test leaves a store, tuner state or export in the checkout (they would mix with the user's)."""
    root = Path(__file__).resolve().parents[1]
    before = {name for name in WORKING_OUTPUTS if (root / name).exists()}
    yield
    created = sorted(name for name in WORKING_OUTPUTS if (root / name).exists() and name not in before)
    assert not created, f"tests wrote {created} into {root}; give them a tmp_path"


def sweep_by_learning_rate(folder: Path, dataset: Path, space: dict, experiment: str, trial_process: str = "auto",
                           max_trials: int = 2):
    """A grid sweep (``log_models: best``) with its file and state in ``folder``: its trial runs by learning
    rate, and its tuner."""
    import mlflow
    import yaml

    from sweeps.run import run_sweep

    config = {"tuner": "grid", "max_trials": max_trials, "log_models": "best", "trial_process": trial_process,
              "space": space}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{experiment}.yaml").write_text(yaml.safe_dump(config))
    tuners: list = []
    parent = run_sweep(str(dataset), sweep=str(folder / f"{experiment}.yaml"), experiment=experiment,
                       state_dir=str(folder / "state"), verbose=0, progress=False, tuner_out=tuners)
    exp = mlflow.get_experiment_by_name(experiment).experiment_id
    kids = mlflow.tracking.MlflowClient().search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {float(k.data.params["learning_rate"]): k for k in kids}, tuners[0]


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


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="session")
def split_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    make_class_folder(root / "train", per_class=8, classes=("blue", "red"))
    make_class_folder(root / "validation", per_class=4, classes=("blue", "red"))
    return root


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory) -> str:
    """A local SavedModel in TF-Hub's reusable format: ``__call__(images in [0,1], training)`` -> [N, 16]."""
    import tensorflow as tf

    class FeatureVector(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(tf.random.stateless_normal([3, 16], seed=[1, 2]), name="kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32), tf.TensorSpec([], tf.bool)])
        def __call__(self, images, training=False):
            features = tf.nn.relu(tf.tensordot(images - 0.5, self.kernel, axes=1))
            return tf.reduce_mean(features, axis=[1, 2])

    path = tmp_path_factory.mktemp("hub") / "feature_vector"
    module = FeatureVector()
    tf.saved_model.save(module, str(path))
    return str(path)


@pytest.fixture
def tracking_store(tmp_path, monkeypatch):
    """Each test gets its own SQLite MLflow store; afterwards no run may be left active or RUNNING."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    leaked = mlflow.active_run()
    while mlflow.active_run() is not None:
        mlflow.end_run("KILLED")
    assert leaked is None, f"run {leaked.info.run_id} leaked as the active run"
    client = mlflow.tracking.MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(exps, "attributes.status = 'RUNNING'") if exps else []
    assert not running, f"runs left RUNNING: {[r.info.run_id for r in running]}"


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
