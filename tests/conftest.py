"""Fixtures for every level (unit/, integration/, system/; each has its own conftest.py): generated image folders,
a per-test MLflow store, the per-session cache, and the checks that no test touches the checkout or reuses a latency."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import ROOT, WORKING_OUTPUTS, make_class_folder, no_process_left


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


@pytest.fixture(scope="session", autouse=True)
def _checkout_untouched():
    """No test leaves a store, tuner state or export in the checkout (they would mix with the user's)."""
    before = {name for name in WORKING_OUTPUTS if (ROOT / name).exists()}
    yield
    created = sorted(name for name in WORKING_OUTPUTS if (ROOT / name).exists() and name not in before)
    assert not created, f"tests wrote {created} into {ROOT}; give them a tmp_path"


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="session")
def split_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    make_class_folder(root / "train", per_class=8, classes=("blue", "red"))
    make_class_folder(root / "validation", per_class=4, classes=("blue", "red"))
    return root


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


@pytest.fixture(scope="module", autouse=True)
def _no_process_left_behind(request):
    """After each test module, no server or sweep process it started is still running (``SERVERS_AND_SWEEPS``; a
    `make test-slow` once left a server's uvicorn running for 14 minutes)."""
    yield
    left = no_process_left()
    assert not left, f"{request.module.__name__} left processes running (now killed): {left}"

