"""`tlsweep ui` (`make ui`) on a store with a sweep: the link it prints opens the sweep's runs, not MLflow 3's
GenAI overview, and a trial's page shows its datasets; checked in headless Chromium."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import headless

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_prints_the_runs_link_and_trials_show_their_datasets(tracking_store, tmp_path, monkeypatch, chromium):
    from test_datasets import lineage
    from test_report_fit import log_trials
    from tracking.datasets import dataset_inputs

    import mlflow

    monkeypatch.setenv("TMP_PLOTS", str(tmp_path / "plots"))
    ids = log_trials("flowers", 3)
    client = mlflow.tracking.MlflowClient()
    for run_id in ids:
        client.log_inputs(run_id, datasets=dataset_inputs(lineage("/data/flower_photos")))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.main", "ui", "--tracking-uri", tracking_store, "--port",
                             str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        exp_id = mlflow.get_experiment_by_name("flowers").experiment_id
        link = f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs"
        assert lines[1].split() == ["flowers:", link], lines
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "mlflow ui did not start"
                time.sleep(2)
        budget = "--virtual-time-budget=30000"
        runs = headless(chromium, tmp_path / "chrome", "--window-size=1400,900", budget, "--dump-dom", link)
        assert "Training runs" in runs and "sweep-fake" in runs, "the link lands on the sweep's runs table"
        training = next(d.dataset for d in dataset_inputs(lineage("/data/flower_photos"))
                        if d.tags[0].value == "training")
        for _ in range(3):  # the first page load of a cold server may not finish within the time budget
            page = headless(chromium, tmp_path / "chrome", "--window-size=1400,900", budget, "--dump-dom",
                            f"{link}/{ids[0]}")
            if "Datasets" in page:
                break
        assert f"{training.name} ({training.digest})" in page, "the trial's page lists its training split"
        headless(chromium, tmp_path / "chrome", "--window-size=1400,900", budget,
                 f"--screenshot={tmp_path / 'run.png'}", f"{link}/{ids[0]}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
