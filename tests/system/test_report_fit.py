"""The HTML report on a screen, and quiet CLI output, on a store of logged trials (no training needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param
from PIL import Image

from tracking import layout

ROOT = Path(__file__).resolve().parents[2]
BACKBONES = ("efficientnet_v2_b0", "convnext_tiny", "mobilenet_v3_large", "efficientnet_lite0")


def log_trials(experiment: str, n: int = 12) -> list[str]:
    """``n`` finished trial runs as a sweep logs them (params, metrics, plots), some with tied scores."""
    from tracking import store

    client = mlflow.tracking.MlflowClient()
    exp = store.experiment_id(experiment)
    parent = client.create_run(exp, tags={layout.KIND: layout.SWEEP}, run_name="sweep-fake").info.run_id
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        run = client.create_run(exp, run_name=f"trial-{i}", tags={layout.KIND: layout.TRIAL, layout.TRIAL_ID: f"{i:02d}",
                                                                  layout.PARENT_RUN_ID: parent}).info.run_id
        fine_tune = i % 3 != 0
        params = {"backbone": BACKBONES[i % 4], "fine_tune": fine_tune, "fine_tune_at": 0.75 if fine_tune else None,
                  "dropout": round(0.1 * (i % 5), 1), "batch_size": 32, "learning_rate": float(10 ** rng.uniform(-4, -2)),
                  "fine_tune_learning_rate": float(10 ** rng.uniform(-6, -4)), "epochs": 3 + i % 6,
                  "fine_tune_epochs": 2 + i % 4, "augment": bool(i % 2), "image_size": 224}
        metrics = {layout.VAL_ACCURACY: 0.9 if i < 3 else float(rng.uniform(0.5, 0.89)),
                   layout.TEST_ACCURACY: float(rng.uniform(0.5, 0.95)), layout.WALL_SECONDS: float(rng.uniform(5, 900)),
                   layout.TRAIN_SECONDS: 12.5, layout.VAL_LOSS: 0.5 - 0.01 * i}
        client.log_batch(run, params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        if i < 3:
            plots = Path(os.environ["TMP_PLOTS"]) / run
            plots.mkdir(parents=True)
            for name in layout.TRIAL_PLOTS:
                Image.new("RGB", (64, 48), (200, 30, 40)).save(plots / name)
            client.log_artifacts(run, str(plots), layout.PLOTS_DIR)
        client.set_terminated(run)
        ids.append(run)
    client.set_terminated(parent)
    return ids


@pytest.fixture
def fake_sweep(tracking_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TMP_PLOTS", str(tmp_path / "plots"))
    return log_trials("fake")


def test_report_and_best_export_print_no_progress_bars(fake_sweep, tracking_store, tmp_path):
    """MLflow draws a "Downloading artifacts" bar per download unless told not to; every entry point tells it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-m", "sweeps.main", "report", "--experiment", "fake", "--out-dir",
                          str(tmp_path / "reports")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("leaderboard of 'fake' (12 trials, best first by val_accuracy, and the trials tied with the best by the "
            "steadier estimate in ranked_by; [95 % Wilson interval]; tied: inside the best's val interval; "
            "docs/selection.md):") in out.stdout
    assert (tmp_path / "reports" / "fake" / "learning_curves.png").is_file(), "the report downloaded the plots"
    assert "Downloading artifacts" not in out.stderr + out.stdout and "it/s]" not in out.stderr, out.stderr
    probe = subprocess.run([sys.executable, "-c", "import os, tracking; "
                            "print(os.environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'])"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "false", "benchmarks and every CLI import tracking"


def test_the_report_leaderboard_fits_1400_px(fake_sweep, tracking_store, tmp_path, chromium):
    from support import headless
    from tracking.report import write_report

    page = write_report("fake", out_dir=tmp_path / "reports")
    text = page.read_text()
    for run_id in fake_sweep:
        assert f'title="{run_id}"' in text and f"/runs/{run_id}" in text, "short id shown, full id in the link"
    assert "Same in every trial: batch_size 32" in text
    # measure in the browser: the page's script writes the widths into the DOM that --dump-dom prints
    probe = page.with_name("probe.html")
    probe.write_text(text.replace("</body>", "<script>const t = document.querySelector('table.board');"
                                  "document.body.setAttribute('data-fit', JSON.stringify({table: t.scrollWidth, "
                                  "right: t.getBoundingClientRect().right, page: document.documentElement.clientWidth,"
                                  " scroll: document.documentElement.scrollWidth}));</script></body>"))
    dom = headless(chromium, tmp_path / "chrome", "--window-size=1400,1000", "--dump-dom", probe.as_uri())
    fit = json.loads(dom.split("data-fit='", 1)[1].split("'", 1)[0]) if "data-fit='" in dom else json.loads(
        dom.split('data-fit="', 1)[1].split('"', 1)[0].replace("&quot;", '"'))
    assert fit["page"] <= 1400 and fit["table"] <= fit["page"] and fit["right"] <= fit["page"], fit
    assert fit["scroll"] <= 1400, f"the page scrolls sideways: {fit}"
    shot = Path(os.environ.get("TLSWEEP_SHOTS", tmp_path)) / "report_1400.png"
    headless(chromium, tmp_path / "chrome", "--window-size=1400,1000", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1400, 1000)
