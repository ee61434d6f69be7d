"""`tlsweep ui` (`make ui`) on a store with a sweep: the link it prints opens the sweep's runs, not MLflow 3's
GenAI overview, and a trial's page shows its datasets; checked in headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import headless, needs_flowers
from tracking.server import free_port, stop_group, wait_until_up

ROOT = Path(__file__).resolve().parents[2]


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
    proc, lines, port = start_ui(tracking_store, tmp_path, printed=2)
    try:
        exp_id = mlflow.get_experiment_by_name("flowers").experiment_id
        link = f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs"
        assert lines[1].split() == ["experiment", "'flowers':", f"{link}?workflowType=machine_learning"], lines
        budget = "--virtual-time-budget=30000"
        for _ in range(3):  # the first page load of a cold server may not finish within the time budget
            runs = headless(chromium, tmp_path / "chrome", "--window-size=1400,900", budget, "--dump-dom",
                            f"{link}?workflowType=machine_learning")
            if "sweep-fake" in runs:
                break
        # the model-training view's runs table (MLflow 3.17 titles it "Runs"), the sweep's parent run in it
        assert "Model training" in runs and ">Runs<" in runs and "sweep-fake" in runs, \
            "the link lands on the sweep's runs table"
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
        stop_group(proc)  # the ui and MLflow's server under it


def start_ui(store: str, folder: Path, printed: int = 3) -> tuple[subprocess.Popen, list[str], int]:
    """`tlsweep ui` on ``store``: its process, the ``printed`` lines it printed before MLflow starts, its port (once
    it answers)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.main", "ui", "--tracking-uri", store, "--port", str(port)],
                            cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines = [proc.stdout.readline() for _ in range(printed)]
    if not wait_until_up(f"http://127.0.0.1:{port}", proc, 300):
        stop_group(proc)
        raise AssertionError("mlflow ui did not start")
    return proc, lines, port


@pytest.mark.slow
@needs_flowers()
def test_the_compare_link_shows_the_sweeps_searched_hyperparameters_and_val_accuracy(tracking_store, tmp_path,
                                                                                      monkeypatch, chromium):
    """A real sweep (heads on flower photos); the compare link `make ui` prints opens MLflow's compare page on its
    trials: the chart's axes and the params table are the searched hyperparameters and val_accuracy; the fixed
    values are tags. The screenshot is docs/img/compare.png's kind."""
    import re

    import yaml

    from sweeps.run import run_sweep
    from test_realdata import flower_subset

    monkeypatch.chdir(tmp_path)
    space = {"backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 64}, "batch_size": {"fixed": 16},
             "epochs": {"fixed": 3}, "fine_tune": {"fixed": False},
             "dropout": {"float": [0.0, 0.5], "step": 0.1, "default": 0.2},
             "learning_rate": {"float": [1e-4, 1e-2], "sampling": "log", "default": 1e-3}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"tuner": "random", "max_trials": 4, "seed": 1,
                                                     "log_models": "best", "trial_process": "same", "space": space}))
    run_sweep(str(flower_subset(tmp_path / "flowers", 20)), sweep=str(tmp_path / "s.yaml"), experiment="flowers",
              state_dir=str(tmp_path / "state"), verbose=0, progress=False)
    proc, lines, port = start_ui(tracking_store, tmp_path)
    try:
        assert lines[2].split()[:6] == ["sweep", "'sweep-s',", "its", "4", "finished", "trial(s)"], lines
        compare = lines[2].split()[-1]
        assert compare.startswith(f"http://127.0.0.1:{port}/#/compare-runs?runs=")
        budget = "--virtual-time-budget=30000"
        for _ in range(3):  # the first page load of a cold server may not finish within the time budget
            page = headless(chromium, tmp_path / "chrome", "--window-size=1500,1000", budget, "--dump-dom", compare)
            if "Show diff only" in page:
                break
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script).*?</\1>", "", page, flags=re.S)))
        assert "Comparing 4 Runs from 1 Experiment" in text
        chart = text[text.index("Parameters:"): text.index("Run details")]
        assert "dropout learning_rate" in chart and "Metrics: val_accuracy" in chart, chart[:300]
        params = text[text.index("Parameters Show diff only"): text.index("Metrics Show diff only")].split()
        assert [p for p in params if not re.fullmatch(r"[\d.e+-]+", p)][4:] == ["dropout", "learning_rate"], params
        assert "tlsweep.param.backbone efficientnet_lite0" in text and "tlsweep.param.class_names" in text
        headless(chromium, tmp_path / "chrome", "--window-size=1500,1000", budget,
                 f"--screenshot={tmp_path / 'compare.png'}", compare)
        assert (tmp_path / "compare.png").stat().st_size > 50_000
    finally:
        stop_group(proc)  # the ui and MLflow's server under it
