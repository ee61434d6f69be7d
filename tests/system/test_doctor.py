"""``tlsweep doctor``: one line per check, ok / warning / problem with the fix, exit 1 on a problem; the sweep's
parent keeps the same facts as ``doctor.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline import device
from sweeps import doctor
from test_device import H100, INSTALL, TWO_GPUS, env_with, fake_nvidia_smi

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ["python", "tensorflow", "keras", "keras-tuner", "mlflow", "gpus: nvidia-smi", "gpus: tensorflow",
          "cuda libraries", "mixed precision", "tracking store", "cache", "offline weights"]


def _lines(stdout: str) -> dict[str, str]:
    """The doctor's lines by check name (the text after the status and name columns)."""
    found = {}
    for line in stdout.splitlines()[:-1]:
        status, rest = line[:8].strip(), line[9:]
        name = next(n for n in CHECKS if rest.startswith(n + " "))
        found[name] = f"{status} {rest[len(name):].strip()}"
    return found


def test_doctor_names_the_gpu_tensorflow_cannot_see_and_exits_1(tmp_path):
    """A fake nvidia-smi lists two GPUs; this machine's TensorFlow has no CUDA libraries; the store's folder is
    missing."""
    env = env_with(fake_nvidia_smi(tmp_path / "bin"), TLSWEEP_CACHE=str(tmp_path / "cache"))
    store = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "sweeps.main", "doctor", "--tracking-uri", store], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = _lines(proc.stdout)
    assert list(lines) == CHECKS
    assert lines["gpus: nvidia-smi"] == (f"ok 2 listed: 0: {H100} (compute 9.0, 81559 MiB); 1: {H100} (compute 9.0, "
                                         "81559 MiB); driver 550.54.15")
    assert lines["gpus: tensorflow"].startswith(f"problem none seen, but {TWO_GPUS}: the CUDA "), lines
    assert lines["gpus: tensorflow"].endswith(f"not found) | fix: {INSTALL}; or run on the CPU on purpose with "
                                              "--device cpu (make ... DEVICE=cpu)"), lines
    assert lines["cuda libraries"].startswith("problem TensorFlow 2.") and "libcudnn.so.9 missing" in lines[
        "cuda libraries"] and lines["cuda libraries"].endswith(f"| fix: {INSTALL}"), lines
    assert lines["mixed precision"] == "ok auto resolves to float32 on the CPU"
    missing = tmp_path / "missing"
    assert lines["tracking store"] == (f"problem {store} | fix: SQLite tracking store {store}: folder {missing} does "
                                       f"not exist; create it (mkdir -p {missing}) or fix the path, or unset "
                                       "MLFLOW_TRACKING_URI (and --tracking-uri) to use ./mlflow.db")
    assert lines["cache"].startswith(f"ok {tmp_path / 'cache'} (created on first use; "), lines
    assert proc.stdout.splitlines()[-1] == "doctor: 3 problem(s), 0 warning(s)"
    # Where nvidia-smi lists a GPU, TensorFlow's CUDA start-up lines are the diagnosis: shown, not held back
    assert "Could not find cuda drivers" in proc.stderr, proc.stderr
    assert "oneDNN custom operations" not in proc.stderr, proc.stderr


def test_on_a_machine_without_gpus_every_check_is_ok(tmp_path, monkeypatch):
    """In this process (TensorFlow started already), PATH without nvidia-smi, a new store, an empty cache."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(device.ENV, raising=False)
    device._query.cache_clear()
    checks = doctor.collect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    device._query.cache_clear()
    by_name = {c.name: c for c in checks}
    assert list(by_name) == CHECKS
    assert [c.line() for c in checks if c.status != doctor.OK] == []
    assert by_name["gpus: nvidia-smi"].detail == "not found: no NVIDIA GPU here; runs use the CPU"
    assert by_name["gpus: tensorflow"].detail == "none seen; runs use the CPU (TLSWEEP_DEVICE=auto)"
    assert by_name["cuda libraries"].detail.endswith("(not needed without a GPU)")
    assert by_name["tracking store"].detail == f"sqlite:///{tmp_path / 'mlflow.db'} (new: the first sweep creates it)"
    assert not (tmp_path / "mlflow.db").exists(), "the doctor creates no store"
    assert by_name["offline weights"].detail.startswith("efficientnet_lite0 ready, efficientnet_lite1 ready, "
                                                        "efficientnet_lite2 ready")


def test_a_version_outside_tlsweeps_range_is_a_problem_with_its_fix():
    check = doctor._version_check("tensorflow", "2.17.1", "<2.22,>=2.18")
    assert check.line() == ("problem  tensorflow        2.17.1, but tlsweep needs <2.22,>=2.18 | fix: make install (it "
                            "installs the ranges pyproject.toml pins)")
    missing = doctor._version_check("keras", None, ">=3.8")
    assert missing.line() == "problem  keras             not installed | fix: make install"
    assert doctor._version_check("mlflow", "3.17.2", "<4,>=3.1").status == doctor.OK


def test_a_check_that_fails_is_a_problem_line_not_a_traceback(monkeypatch):
    monkeypatch.setattr(doctor, "backbones", lambda: 1 / 0)
    (check,) = [c for c in doctor.collect() if c.name == "offline weights"]
    assert check.line() == ("problem  offline weights   the check failed: ZeroDivisionError: division by zero | fix: "
                            "report it")


def test_the_sweeps_parent_keeps_the_doctors_facts(tracking_store):
    import mlflow

    from sweeps.config import load_sweep
    from sweeps.run import _log_settings
    from tracking import layout, store

    exp = store.experiment_id("doctor")  # its artifacts beside the test's SQLite store
    parent = mlflow.tracking.MlflowClient().create_run(exp).info.run_id
    _log_settings(parent, load_sweep("quick"), "somewhere", None)
    facts = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path=layout.DOCTOR))
                       .read_text())
    assert [f["name"] for f in facts] == CHECKS
    assert {f["status"] for f in facts} <= {doctor.OK, doctor.WARNING, doctor.PROBLEM}
    assert next(f for f in facts if f["name"] == "mixed precision")["detail"].startswith("auto resolves to ")
    mlflow.tracking.MlflowClient().set_terminated(parent)
