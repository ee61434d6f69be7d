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

ROOT = Path(__file__).resolve().parents[2]
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


# -- `make install` picks the gpu extra where nvidia-smi lists a GPU (a dry run: no CUDA is installed here) -------


def _dry_install(tmp_path: Path, gpus: int, *variables: str, environ: dict[str, str] | None = None) -> list[str]:
    """``make -n install`` with a fake nvidia-smi listing ``gpus`` GPUs first on PATH: the lines it would run."""
    from test_device import env_with, fake_nvidia_smi

    env = {**env_with(fake_nvidia_smi(tmp_path / f"bin{gpus}", gpus=gpus)), **(environ or {})}
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "install", *variables], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("gpus,variables,environ,extras,why", [
    (2, (), None, "test,docs,gpu", "nvidia-smi -L lists 2 GPU(s): TensorFlow with its CUDA 12 / cuDNN 9 pip packages"),
    (0, (), None, "test,docs", "nvidia-smi lists no GPU: no CUDA libraries"),
    (2, ("GPU=0",), None, "test,docs", "GPU=0 given: no CUDA libraries"),
    (0, ("GPU=1",), None, "test,docs,gpu", "GPU=1 given: TensorFlow with its CUDA 12 / cuDNN 9 pip packages"),
    (0, (), {"GPU": "1"}, "test,docs,gpu", "GPU=1 given: TensorFlow with its CUDA 12 / cuDNN 9 pip packages"),
], ids=["listed", "none-listed", "GPU=0", "GPU=1", "GPU-in-environment"])
def test_make_install_chooses_the_gpu_extra_and_says_why(tmp_path, gpus, variables, environ, extras, why):
    lines = _dry_install(tmp_path, gpus, *variables, environ=environ)
    assert f'echo "install: .[{extras}] ({why})"' in lines, lines
    assert f'.venv/bin/python -m pip install --quiet -e ".[{extras}]"' in lines, lines


def test_the_gpu_extra_is_tensorflow_and_cuda_in_tensorflows_range():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (tensorflow,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "tensorflow"]
    (gpu,) = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    assert (gpu.name, gpu.extras, gpu.specifier) == ("tensorflow", {"and-cuda"}, tensorflow.specifier)
