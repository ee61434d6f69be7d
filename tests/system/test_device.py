"""Never silently on the CPU: with a GPU listed (a fake ``nvidia-smi`` on PATH listing two H100s) and a TensorFlow
that sees none (this machine's: no CUDA libraries), ``train`` and ``sweep`` stop before any work with one line that
names the cause and the fix; ``--device cpu`` runs; a trial meant for a GPU fails. Without a GPU nothing changes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline import device
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"
TWO_GPUS = f"nvidia-smi lists 2 GPUs (0: {H100}, 1: {H100})"
# What TensorFlow 2.21 is built for (tf.sysconfig.get_build_info() here) and has not got here
BUILD = {"tensorflow": "2.21.0", "is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9"}
NO_LIBRARIES = {"libcudart.so.12": None, "libcublas.so.12": None, "libcudnn.so.9": None}
INSTALL = ("install the gpu extra: make install GPU=1 (or pip install 'tlsweep[gpu]', which brings "
           "tensorflow[and-cuda])")


def fake_nvidia_smi(folder: Path, gpus: int = 2, driver: str = "550.54.15", compute_cap: bool = True) -> Path:
    """A ``nvidia-smi`` that lists ``gpus`` H100s (``-L`` and ``--query-gpu``); returns its folder, for PATH.
    ``compute_cap=False``: an old driver's, which refuses that field (as drivers before 510 do)."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = "".join(f'echo "GPU {i}: {H100} (UUID: GPU-{i})"; ' for i in range(gpus))
    rows = "".join(f'echo "{i}, GPU-{i}, {H100}, 81559, {driver}$cap"; ' for i in range(gpus))
    refuse = "" if compute_cap else ('*compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\'; '
                                     "exit 2;; ")
    script = folder / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
# A fake nvidia-smi for tests on machines without a GPU.
cap=""
case "$*" in *compute_cap*) cap=", 9.0";; esac
case "$*" in
  {refuse}*-L*) {listing};;
  *--query-gpu=*) {rows};;
  *) echo "fake nvidia-smi: unsupported arguments: $*" >&2; exit 2;;
esac
""")
    script.chmod(0o755)
    return folder


def env_with(folder: Path | None, **extra: str) -> dict[str, str]:
    """This environment with ``folder`` first on PATH, as a user's shell (no TF_CPP_MIN_LOG_LEVEL, no pin)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", device.ENV, "MLFLOW_TRACKING_URI", "GPU")}
    if folder is not None:
        env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    """This process with the fake nvidia-smi on PATH."""
    folder = fake_nvidia_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(device.ENV, raising=False)
    device._query.cache_clear()
    yield folder
    device._query.cache_clear()


# -- the pure decisions ----------------------------------------------------------------------------------


def _gpu(index: str = "0", driver: str = "550.54.15") -> device.ListedGpu:
    return device.ListedGpu(index, f"GPU-{index}", H100, 81559, driver, "9.0")


def test_a_gpu_listed_but_not_seen_is_refused_with_the_missing_libraries_and_the_install_fix():
    gpus = [_gpu("0"), _gpu("1")]
    line = device.refusal(device.meant_for_gpu("auto", gpus), [], device.causes(gpus, BUILD, NO_LIBRARIES))
    assert line == (f"{TWO_GPUS}, but TensorFlow sees no GPU: the CUDA 12.5.1 / cuDNN 9 libraries TensorFlow 2.21.0 "
                    "needs are not installed (libcudart.so.12, libcublas.so.12, libcudnn.so.9 not found). Fix: "
                    f"{INSTALL}; or run on the CPU on purpose with --device cpu (make ... DEVICE=cpu)")


@pytest.mark.parametrize("gpus,build,libraries,expected", [
    ([_gpu(driver="470.82.01")], BUILD, {"libcudnn.so.9": "/x"},
     [("NVIDIA driver 470.82.01 is older than 525.60.13, the oldest for CUDA 12",
       "update the NVIDIA driver to 525.60.13 or later")]),
    ([_gpu()], {**BUILD, "is_cuda_build": False}, NO_LIBRARIES,
     [("this TensorFlow 2.21.0 is built without CUDA (a CPU-only package)", INSTALL)]),
    ([], BUILD, NO_LIBRARIES,
     [("nvidia-smi lists no GPU for this process", "run on a machine with an NVIDIA GPU and its driver (nvidia-smi "
       "must list it), and check CUDA_VISIBLE_DEVICES")]),
    ([_gpu()], BUILD, {"libcudnn.so.9": "/site-packages/nvidia/cudnn/lib/libcudnn.so.9"}, []),
], ids=["old-driver", "cpu-build", "no-gpu", "nothing-found"])
def test_each_cause_and_its_fix(gpus, build, libraries, expected):
    assert device.causes(gpus, build, libraries) == expected


def test_an_unknown_cause_points_at_the_doctor():
    line = device.refusal("--device gpu asks for a GPU", [], [])
    assert line == ("--device gpu asks for a GPU, but TensorFlow sees no GPU: TensorFlow could not initialize them "
                    "(its start-up lines above say why). Fix: run `tlsweep doctor` (make doctor) and fix what it marks "
                    "as a problem; or run on the CPU on purpose with --device cpu (make ... DEVICE=cpu)")


def test_what_counts_as_meant_for_a_gpu():
    assert device.meant_for_gpu("auto", []) == ""  # a machine without GPUs: nothing changes
    assert device.meant_for_gpu("cpu", [_gpu()], "0") == ""
    assert device.meant_for_gpu("auto", [], "0,1") == "--gpus 0,1 asks for GPUs"
    assert device.meant_for_gpu("gpu", []) == "--device gpu asks for a GPU"
    assert device.meant_for_gpu("auto", [_gpu()]) == f"nvidia-smi lists 1 GPU (0: {H100})"
    assert device.refusal("nvidia-smi lists 1 GPU", [{"device_type": "GPU"}], []) is None  # TensorFlow sees it


def test_the_device_setting_comes_from_the_flag_then_the_environment():
    assert device.setting(None, {}) == "auto"
    assert device.setting(None, {device.ENV: "CPU"}) == "cpu"
    assert device.setting("gpu", {device.ENV: "cpu"}) == "gpu"
    with pytest.raises(UserError) as e:
        device.setting(None, {device.ENV: "tpu"})
    assert str(e.value) == ("TLSWEEP_DEVICE='tpu' is not one of auto, cpu, gpu (auto: a GPU when nvidia-smi lists one; "
                            "cpu: the CPU on purpose; gpu: a GPU or stop)")


# -- nvidia-smi, the fake one ----------------------------------------------------------------------------


def test_nvidia_smi_is_read_and_narrowed_by_cuda_visible_devices(two_gpus):
    listed = device.listed_gpus({})
    assert [(g.index, g.name, g.memory_mib, g.driver, g.compute_capability) for g in listed] == [
        ("0", H100, 81559, "550.54.15", "9.0"), ("1", H100, 81559, "550.54.15", "9.0")]
    assert [g.index for g in device.listed_gpus({"CUDA_VISIBLE_DEVICES": "1"})] == ["1"]
    assert [g.index for g in device.listed_gpus({"CUDA_VISIBLE_DEVICES": "GPU-0"})] == ["0"]
    assert device.listed_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []  # the GPU sweep's chief
    from sweeps.gpus import available_gpus

    assert available_gpus({}) == ["0", "1"]


def test_an_old_driver_without_compute_cap_is_asked_again(tmp_path, monkeypatch):
    folder = fake_nvidia_smi(tmp_path / "old", gpus=1, driver="470.82.01", compute_cap=False)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    device._query.cache_clear()
    try:
        (gpu,) = device.listed_gpus({})
    finally:
        device._query.cache_clear()
    assert (gpu.driver, gpu.compute_capability, gpu.describe()) == ("470.82.01", None, f"0: {H100} (81559 MiB)")


def test_a_trial_meant_for_a_gpu_fails_instead_of_running_on_the_cpu(two_gpus, tmp_path, monkeypatch):
    from pipeline.hparams import RunConfig
    from sweeps import trial

    spec = trial.TrialSpec(run=RunConfig(), dataset=str(tmp_path / "never-read"), split=None, log_models="none",
                           verbose=0, trial_dir=str(tmp_path / "trial"), record_dir=str(tmp_path / "record"),
                           params={})
    with pytest.raises(trial.TrialFailed) as e:
        trial.run(spec, {})
    assert str(e.value).startswith(f"impossible configuration: this trial was meant for a GPU: {TWO_GPUS}, but "
                                   "TensorFlow sees no GPU: the CUDA"), str(e.value)
    monkeypatch.setenv(device.ENV, "cpu")  # --device cpu: the same trial goes on (to the data set it cannot find)
    with pytest.raises(trial.DataUnusable, match="never-read"):
        trial.run(spec, {})


# -- the commands, real processes -------------------------------------------------------------------------


def _make(target: str, *variables: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), target, *variables], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.slow
def test_make_train_and_make_sweep_refuse_the_cpu_before_any_work(tmp_path, class_folder):
    env = env_with(fake_nvidia_smi(tmp_path / "bin"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    train = _make("train", f"DATASET={class_folder}", "IMAGE_SIZE=32", env=env, cwd=tmp_path)
    line = _one_error_line(train)
    assert line.startswith(f"error: {TWO_GPUS}, but TensorFlow sees no GPU: the CUDA "), line
    assert "libraries TensorFlow" in line and f"Fix: {INSTALL}" in line and line.endswith("DEVICE=cpu)"), line
    assert "data:" not in train.stdout, "stopped before loading the data"
    sweep = _make("sweep", f"DATASET={class_folder}", "SWEEP=quick", "EXPERIMENT=refused", env=env, cwd=tmp_path)
    assert _one_error_line(sweep) == line
    assert not (tmp_path / "mlflow.db").exists(), "stopped before the tracking store was touched"


@pytest.mark.slow  # a TensorFlow start (and a tiny training): ~30 s on 2 shared cores
def test_gpus_on_a_machine_without_gpus_is_refused_without_device_cpu(tmp_path, class_folder):
    env = env_with(None, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    if device.listed_gpus(env):
        pytest.fail("this test needs a machine where nvidia-smi lists no GPU (every CI and developer machine here)")
    sweep = _make("sweep", f"DATASET={class_folder}", "SWEEP=quick", "GPUS=0,1", env=env, cwd=tmp_path)
    assert _one_error_line(sweep) == (
        "error: GPUS=0,1 asks for GPUs, but TensorFlow sees no GPU: nvidia-smi lists no GPU for this process. Fix: run "
        "on a machine with an NVIDIA GPU and its driver (nvidia-smi must list it), and check CUDA_VISIBLE_DEVICES; or "
        "run on the CPU on purpose with --device cpu (make ... DEVICE=cpu)")


@pytest.mark.slow  # a TensorFlow start (and a tiny training): ~30 s on 2 shared cores
def test_device_cpu_trains_on_the_cpu_on_purpose(tmp_path, class_folder):
    env = env_with(fake_nvidia_smi(tmp_path / "bin"))
    out = _make("train", f"DATASET={class_folder}", "DEVICE=cpu", "WEIGHTS=none", "IMAGE_SIZE=32", "EPOCHS=1",
                "FINE_TUNE_EPOCHS=0", "BATCH_SIZE=8", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "val_accuracy=" in out.stdout and "(head only)" in out.stdout
