"""The GPU-runner recipes: the CI workflow (linted by actionlint) and the Dockerfile (parsed) install, check with
the doctor and run a sweep on every GPU through Makefile targets that exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "gpu-sweep.yml"
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


def _make_targets(command: str) -> list[str]:
    """The targets a shell line runs with make (``make install``, ``make sweep DATASET=...``)."""
    return [m for m in re.findall(r"\bmake\s+((?:[a-z][a-z-]*\s*)+)", command) for m in m.split() if "=" not in m]


def test_the_workflow_passes_actionlint():
    actionlint = shutil.which("actionlint", path=os.path.dirname(sys.executable))
    assert actionlint, "actionlint is missing: `make install` (the test extra ships it)"
    out = subprocess.run([actionlint, str(WORKFLOW.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # cwd: .github/actionlint.yaml names the runner's gpu label
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_workflow_installs_checks_sweeps_on_every_gpu_reports_and_uploads():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert "workflow_dispatch" in workflow[True]  # YAML 1.1 reads the key `on` as True
    (job,) = workflow["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert [t for run in runs for t in _make_targets(run)] == ["install", "doctor", "sweep", "report"]
    assert all(t in TARGETS for run in runs for t in _make_targets(run)), TARGETS
    sweep = next(run for run in runs if "make sweep" in run)
    assert "GPUS=all" in sweep and 'SWEEP="$SWEEP"' in sweep
    assert next(s for s in job["steps"] if "make sweep" in s.get("run", ""))["env"]["SWEEP"] == "${{ inputs.sweep }}"
    assert workflow[True]["workflow_dispatch"]["inputs"]["sweep"]["default"] == "quick"
    uses = [step["uses"] for step in job["steps"] if "uses" in step]
    assert uses[0].startswith("actions/checkout@") and uses[-1].startswith("actions/upload-artifact@")
    uploaded = job["steps"][-1]["with"]["path"].split()
    assert uploaded == ["mlflow.db", "mlartifacts/", "reports/"]  # the store beside its artifacts, and the report
    assert job["env"]["MLFLOW_TRACKING_URI"] == "sqlite:///${{ github.workspace }}/mlflow.db"


def test_the_dockerfile_installs_the_gpu_extra_on_tensorflows_gpu_image_and_runs_make_sweep():
    import json

    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(DOCKERFILE))
    assert parser.baseimage == "tensorflow/tensorflow:2.21.0-gpu"
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    runs = [value for kind, value in instructions if kind == "RUN"]
    assert any(re.search(r'pip install "\.\[gpu\]"', run) for run in runs), runs
    copied = [name for kind, value in instructions if kind == "COPY" for name in value.split()[:-1]]
    assert {"pipeline", "sweeps", "tracking", "pyproject.toml", "Makefile"} <= set(copied)
    assert all((ROOT / name).exists() for name in copied), copied
    entrypoint = json.loads(next(value for kind, value in instructions if kind == "ENTRYPOINT"))
    command = json.loads(next(value for kind, value in instructions if kind == "CMD"))
    assert entrypoint == ["make", "-f", "/app/Makefile", "PY=python3"]
    assert command[0] == "sweep" and command[0] in TARGETS and "GPUS=all" in command
    # The image has no .venv: PY=python3 on make's command line is what every target runs
    dry = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), *entrypoint[3:], *command], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert " ".join(dry.stdout.splitlines()[-1].split()) == ("python3 -m sweeps.main sweep --dataset '/data' --sweep "
                                                            "'quick' --gpus 'all'"), dry.stdout
