"""tlsweep installed from its wheel, run from a folder outside the checkout: the code comes from the wheel.

The wheel is built from a copy of the sources (so the checkout gets no build/ folder) and installed
without dependencies into a fresh venv that sees this environment's packages through a ``.pth`` line
(a plain path line: the checkout's editable-install hook in that folder is not run, so ``pipeline``,
``sweeps`` and ``tracking`` can only come from the wheel; the test checks that they do).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "pipeline", "sweeps", "tracking")
TINY = """\
tuner: random
max_trials: 1
log_models: all
trial_process: fresh
space:
  backbone: {fixed: efficientnet_lite0}
  weights: {fixed: none}
  image_size: {fixed: 32}
  fine_tune: {fixed: false}
  epochs: {fixed: 1}
  batch_size: {fixed: 8}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with tlsweep installed from its wheel; returns the venv's folder."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "wheel"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp / "wheel").glob("tlsweep-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "tlsweep-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the dependencies
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    return venv


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return {**env, "TLSWEEP_CACHE": str(tmp / "cache")}


def test_the_wheel_ships_the_sweeps_and_one_command(installed, tmp_path):
    run = lambda *args: subprocess.run([str(installed / "bin" / "tlsweep"), *args], cwd=tmp_path,  # noqa: E731
                                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import pipeline, sweeps, tracking; print(pipeline.__file__, sweeps.__file__, "
                            "tracking.__file__)"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    assert all(str(installed) in path for path in where.stdout.split()), where.stdout
    out = run("--help")
    assert out.returncode == 0
    for command in ("train", "predict", "sweep", "best-export", "report", "ui", "server"):
        assert command in out.stdout
    found = subprocess.run([str(installed / "bin" / "python"), "-c", "from sweeps.config import load_sweep, "
                            "resolve_path; print(resolve_path('quick')); print(load_sweep('quick').max_trials)"],
                           cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(Path(where.stdout.split()[1]).parent / "quick.yaml"), "3"]


@pytest.mark.slow
def test_an_installed_sweep_runs_outside_the_checkout(installed, class_folder, tmp_path):
    """A trial in a fresh process, its plots drawn by the helper process and its pyfunc model logged, all
    from the installed code, with the working directory outside the checkout."""
    tlsweep = str(installed / "bin" / "tlsweep")
    out = subprocess.run([tlsweep, "sweep", "--dataset", str(tmp_path / "missing"), "--sweep", "nosuch"],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert "known sweeps: cats_vs_dogs, default, quick, tf_flowers" in out.stderr, out.stderr
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = subprocess.run([tlsweep, "sweep", "--dataset", str(class_folder), "--sweep",
                          "tiny.yaml", "--experiment", "installed", "--quiet"], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "leaderboard of 'installed' (1 trials" in out.stdout
    import mlflow

    from tracking import layout

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("installed")
    (trial,) = client.search_runs([exp.experiment_id], "tags.`tlsweep.kind` = 'trial'")
    assert trial.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(trial.info.run_id, layout.PLOTS_DIR)} == {
        f"{layout.PLOTS_DIR}/{name}" for name in layout.TRIAL_PLOTS}
    assert layout.MODEL_URI in trial.data.tags
    assert "system/cpu_utilization_percentage" in trial.data.metrics and len(trial.inputs.dataset_inputs) == 3
