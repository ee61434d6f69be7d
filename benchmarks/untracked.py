"""The same sweep without MLflow: for ``make bench``, which measures what tracking costs.

``run_untracked`` runs the tuner of ``sweeps.run.run_sweep`` on the same trials (same oracle, same trial
processes, same feature and cut caches) with a recorder that keeps nothing: the trials make none of a run's files
(plots, cost, checkpoint, SavedModel), and there are no system metrics, no parent run and no leaderboard.
Tracking overhead = the tracked sweep's wall time minus this one's. Internal: a user's sweep is always tracked, so this is not in the CLI.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Mapping

from pipeline.data import check_dataset
from pipeline.errors import UserError
from sweeps import space as space_module
from sweeps.config import load_sweep
from sweeps.tuner import TransferTuner, sweep_dir
from tracking.recorder import Record, Recorder, Run


class NullRecorder(Recorder):
    """The tuner's recorder without a store: trials make no record (no plots, cost, checkpoint or SavedModel: they
    exist only for the run), and runs get made-up ids."""

    records = False

    def __init__(self, folder: Path):
        super().__init__(folder)
        self._runs = 0

    def open(self, experiment_id: str, parent_id: str, name: str, tags: Mapping[str, str]) -> Run:
        self._runs += 1
        return Run({"name": name}, f"untracked-{self._runs}")

    def finish(self, run: Run, record: Record, folder: Path) -> Future:
        shutil.rmtree(folder, ignore_errors=True)
        done: Future = Future()
        done.set_result(None)
        return done

    def fail(self, *args: object, **kwargs: object) -> None:
        pass

    def replay(self) -> list[str]:
        return []


def run_untracked(dataset: str, sweep: str, state_dir: str, verbose: int | str = 0,
                  feature_cache: bool = True) -> TransferTuner:
    """Run the sweep file's search on ``dataset`` without any MLflow call; returns its tuner (oracle, timings)."""
    config = load_sweep(sweep)
    if config.stage2 or config.prune:
        raise UserError("an untracked sweep runs neither stage2 nor pruning (pruning reads the finished runs from "
                        "MLflow); remove them from the sweep file")
    check_dataset(dataset)
    space_module.check_sweep(config)
    config = space_module.fit_to_machine(config)
    before = os.environ.get("TLSWEEP_SYSTEM_METRICS_SECONDS")
    os.environ["TLSWEEP_SYSTEM_METRICS_SECONDS"] = "0"  # MLflow's system metrics are tracking too
    try:
        tuner = TransferTuner(config, dataset, sweep_dir(state_dir, "untracked"), experiment_id="", parent_run_id="",
                              verbose=verbose, feature_cache=feature_cache, progress=False)
        tuner.recorder = NullRecorder(tuner.recorder.folder)
        try:
            tuner.search(verbose=1 if verbose else 0)
        finally:
            tuner.pool.close()
    finally:
        if before is None:
            os.environ.pop("TLSWEEP_SYSTEM_METRICS_SECONDS", None)
        else:
            os.environ["TLSWEEP_SYSTEM_METRICS_SECONDS"] = before
    return tuner


def drawn(tuner: Any) -> list[dict[str, Any]]:
    """The hyperparameters each trial of a finished search drew, in trial order (Keras Tuner's own keys dropped)."""
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: int(t.trial_id))
    return [{k: v for k, v in t.hyperparameters.values.items() if not k.startswith("tuner/")} for t in trials]


def saved_search(state_dir: str | Path) -> Any:
    """A finished search as its state folder keeps it: ``.oracle.trials`` (Keras Tuner's saved trials), as
    ``drawn`` and the bench read a tuner."""
    import types

    import keras_tuner as kt

    trials = [kt.engine.trial.Trial.load(str(p)) for p in sorted(Path(state_dir).rglob("trial.json"))]
    return types.SimpleNamespace(oracle=types.SimpleNamespace(trials={t.trial_id: t for t in trials}))
