"""TensorFlow's start-up lines on a CPU machine (absl's pre-init warning, oneDNN, missing CUDA drivers,
cuInit) do not reach the user from the CLIs; every other line written to stderr still does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import make_class_folder
from pipeline.tfstart import STARTUP_NOISE, filtered_stderr

ROOT = Path(__file__).resolve().parents[2]
# What TF 2.21 printed on this machine before (python -m pipeline.cli predict, TF_CPP_MIN_LOG_LEVEL=2)
SEEN = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795528042.556241   10812 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. To turn "
    "them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1795528042.556596   10812 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1795527354.548518    3489 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
]
MARKERS = ("absl::InitializeLog", "oneDNN", "cuda drivers", "cuInit", "I0000", "E0000", "W0000")


def test_the_filter_holds_back_the_startup_lines_and_nothing_else(capfd):
    with filtered_stderr(STARTUP_NOISE):
        for line in SEEN:
            os.write(2, (line + "\n").encode())
        os.write(2, b"E0000 00:00:1.0 1 jpeg_mem.cc:331] Premature end of JPEG data\n")
        os.write(2, b"a line of our own\n")
    err = capfd.readouterr().err
    assert err == "E0000 00:00:1.0 1 jpeg_mem.cc:331] Premature end of JPEG data\na line of our own\n"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell: the CLI sets it, not the test suite
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command,error", [
    (["pipeline.cli", "predict", "--model", "missing", "--images", "x.jpg"],
     "error: missing is not an export: expected saved_model.pb and labels.txt in it"),
    pytest.param(["sweeps.cli", "best-export", "--experiment", "nope"], "error: no MLflow experiment named 'nope'",
                 marks=pytest.mark.slow, id="best-export"),
    pytest.param(["sweeps.cli", "sweep", "--dataset", "one", "--sweep", "quick"],
                 "error: folder one has a single class ('blue'); classification needs at least two class subfolders",
                 marks=pytest.mark.slow, id="sweep"),
], ids=["predict", "best-export", "sweep"])
def test_no_tensorflow_startup_lines_reach_the_user(tmp_path, command, error):
    make_class_folder(tmp_path / "one", per_class=6, classes=("blue",))
    good = (tmp_path / "one" / "blue" / "blue_000.jpg").read_bytes()
    (tmp_path / "one" / "blue" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # TF decodes, libjpeg speaks
    proc = _run(command, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert error in proc.stderr.splitlines()[-1], proc.stderr
    assert not [m for m in MARKERS if m in proc.stderr], proc.stderr


def test_only_the_image_libraries_own_lines_are_held_back_while_decoding():
    from pipeline.tfstart import DECODER_NOISE

    for line in ("Improper call to JPEG library in state 201\n", "Premature end of JPEG file\n",
                 "Corrupt JPEG data: 42 extraneous bytes before marker 0xd9\n", "Not a JPEG file: starts with 0x89 0x50\n",
                 "libpng warning: iCCP: known incorrect sRGB profile\n"):
        assert DECODER_NOISE.match(line), line
    for line in ("skipped (not a readable image): /data/roses/1.jpeg\n", "warning: JPEG files in train/ are large\n",
                 "Corrupted checkpoint in /tmp/x\n", "Traceback (most recent call last):\n"):
        assert not DECODER_NOISE.match(line), line


WORKER = """
import os, multiprocessing
from concurrent.futures import ProcessPoolExecutor
from sweeps import executor
pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=executor._warm,
                           initargs=(os.getpid(), "/nonexistent/closed", "data", None, "/nonexistent/hint"))
print(pool.submit(os.getpid).result())
pool.shutdown()
"""


def test_a_sweeps_trial_worker_holds_back_the_startup_lines_too():
    """A pool worker (sweeps.executor) imports TensorFlow, Keras and matplotlib at several moments: none of their
    start-up lines reach a QUIET=1 sweep (`cudart_stub.cc:31] Could not find cuda drivers`, `oneDNN custom
    operations are on`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    proc = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().isdigit()
    assert not [m for m in MARKERS if m in proc.stderr], proc.stderr


def test_where_nvidia_smi_lists_a_gpu_the_cuda_lines_are_not_held_back(tmp_path, monkeypatch):
    """They are the diagnosis there (why TensorFlow sees no GPU); the doctor's test sees them reach the user."""
    from pipeline import device, tfstart
    from test_device import fake_nvidia_smi

    assert tfstart.startup_noise() is tfstart.CPU_NOISE or device.listed_gpus()
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    device._query.cache_clear()
    try:
        noise = tfstart.startup_noise()
        assert noise is tfstart.GPU_NOISE
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a GPU sweep's chief: no GPU of its own, nothing to diagnose
        assert tfstart.startup_noise() is tfstart.CPU_NOISE
    finally:
        device._query.cache_clear()
    cuda, other = SEEN[2:], SEEN[:2]
    assert not [line for line in cuda if noise.match(line)]
    assert [line for line in other if noise.match(line)] == other
    assert noise.match("E0000 00:00:1.0 1 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to register "
                       "factory for plugin cuDNN when one has already been registered")
