"""One run layout: every name tlsweep writes to MLflow is in tracking/layout.py, and the README agrees."""

import re
from pathlib import Path

from pipeline.hparams import DEFAULTS
from pipeline.training import METRICS
from tracking import layout

README = Path(__file__).resolve().parents[1] / "README.md"


def _names() -> set[str]:
    names = set()
    for key, value in vars(layout).items():
        if key.isupper() and key not in ("SWEEP", "TRIAL", "TFLITE_DIR"):
            names.update([value] if isinstance(value, str) else value)
    return names


def test_the_readme_run_layout_section_names_every_tag_param_metric_and_artifact():
    text = README.read_text()
    section = text[text.index("## Tracking: what lands in MLflow"):]
    section = section[: section.index("\n## ", 3)]
    quoted = set(re.findall(r"`([^`]+)`", section))
    words = {w for q in quoted for w in re.split(r"[\s/(),=]+", q)}
    missing = sorted(n for n in _names() if n not in quoted and n not in words)
    assert not missing, f"README's run-layout section does not name {missing}"
    assert layout.TFLITE_DIR.format(mode="<mode>") in words


def test_the_layout_agrees_with_what_the_pipeline_produces(class_folder):
    from pipeline.data import load_data

    assert layout.EPOCH_METRICS == METRICS
    assert layout.HYPERPARAMETERS == tuple(DEFAULTS)
    assert tuple(load_data(str(class_folder), 16).lineage()) == layout.LINEAGE_PARAMS


def test_no_module_spells_a_run_name_outside_the_layout():
    root = Path(__file__).resolve().parents[1]
    literals = re.compile(r"""["'](tlsweep\.[a-z_]+|kt\.(trial_id|tuner_id)|mlflow\.parentRunId|error\.txt|"""
                          r"""leaderboard\.(csv|md)|search_space\.json|[a-z_]+\.png)["']""")
    offenders = [f"{path.relative_to(root)}:{i}" for folder in ("pipeline", "sweeps", "tracking", "benchmarks")
                 for path in (root / folder).rglob("*.py") if path.name != "layout.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1) if literals.search(line)]
    assert not offenders, offenders
