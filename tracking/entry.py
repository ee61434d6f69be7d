"""A finished trial as a journal entry on disk: written whole or not at all, with no MLflow connection.

The trial (in the sweep's process or its own) writes the entry; ``tracking.journal`` writes it to
MLflow and deletes it, or replays it after a kill. This module imports no MLflow: a fresh trial
process starts faster without it.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

ENTRY = "entry.json"
GRID_IMAGES = "grid_images.npy"
MODEL_DIR = "savedmodel"  # an export to log as the run's model (SavedModel files + pyfunc)
MAX_PARAM = 6000  # MLflow's limit on a parameter value's length


def param_text(value: object) -> str:
    """A param's value as MLflow stores it (the journal writes it so too)."""
    return str(value)[:MAX_PARAM]


def write_entry(folder: str | Path, run_id: str | None, run_spec: Mapping[str, Any], params: Mapping[str, object],
                metrics: list[tuple[str, float, int]], plot_data: Mapping[str, Any] | None = None,
                files: Mapping[str, str | Path] | None = None,
                model: tuple[str | Path, np.ndarray, np.ndarray] | None = None,
                tags: Mapping[str, str] | None = None) -> Path:
    """Write a finished trial to the journal folder, whole or not at all; returns the entry's folder.

    ``run_id`` may be None while the run is still being created (``run_spec`` lets a replay create it);
    ``plot_data``: see ``tracking.plots.trial_plots`` (``grid_images`` may be an array);
    ``files`` maps artifact paths to local files or folders (moved into the journal);
    ``model`` is ``(export dir, sample input, its output)`` to log as the run's model;
    ``tags`` are set on the run when it is written (e.g. ``tlsweep.pruned``).
    Needs no MLflow connection: a trial's own process can write it.
    """
    folder = Path(folder)
    key = run_id or f"new-{uuid.uuid4().hex}"
    entry = folder / key
    tmp = folder / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plot_data = dict(plot_data or {})
    if plot_data.get("grid_images") is not None:  # pixels go to a file, not into the JSON
        np.save(tmp / GRID_IMAGES, np.asarray(plot_data["grid_images"], dtype=np.uint8))
        plot_data["grid_images"] = GRID_IMAGES
    record = {"run_id": run_id, "run": dict(run_spec), "params": {k: param_text(v) for k, v in params.items()},
              "metrics": [[k, float(v), int(s)] for k, v, s in metrics if v is not None],
              "timestamp": int(time.time() * 1000), "plots": _jsonable(plot_data), "files": {},
              "tags": {k: str(v) for k, v in (tags or {}).items()}}
    for i, (artifact_path, local) in enumerate((files or {}).items()):
        (tmp / f"file{i}").mkdir()
        shutil.move(str(local), tmp / f"file{i}" / Path(artifact_path).name)
        record["files"][f"file{i}"] = artifact_path
    if model is not None:
        export, sample, output = model
        shutil.move(str(export), tmp / MODEL_DIR)
        np.save(tmp / "sample.npy", sample)
        np.save(tmp / "output.npy", output)
        record["model"] = True
    (tmp / ENTRY).write_text(json.dumps(record))
    tmp.rename(entry)  # atomic: a journal entry is whole or absent
    return entry


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
