"""The same sweep without MLflow: for ``make bench``, which measures what tracking costs.

``run_untracked`` runs the tuner of ``sweeps.run.run_sweep`` on the same trials (same oracle, same trial
processes, same feature and cut caches) with a journal that writes nothing anywhere, no model exports, no
system metrics, no parent run and no leaderboard. Tracking overhead = the tracked sweep's wall time minus
this one's. Internal: a user's sweep is always tracked, so this is not in the CLI.
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
from sweeps.trial import close_spare
from sweeps.tuner import TransferTuner, sweep_dir


class NullJournal:
    """The tuner's journal without a store: trials still write their entries (on their own path, as in a tracked
    sweep), which are then deleted; runs get made-up ids."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).absolute()
        self.blocked = self.busy = 0.0
        self._runs = 0

    def start(self, experiment_id: str, parent_id: str, name: str, tags: Mapping[str, str]) -> Future:
        future: Future = Future()
        self._runs += 1
        future.set_result(f"untracked-{self._runs}")
        future.spec = {"experiment_id": experiment_id, "parent_id": parent_id, "name": name, "tags": dict(tags)}
        return future

    def submit(self, entry: Path, run: Future) -> Future:
        shutil.rmtree(entry, ignore_errors=True)
        done: Future = Future()
        done.set_result(None)
        return done

    def fail(self, run: Future, status: str, error: str, trace: str | None = None,
             params: Mapping[str, object] | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def replay(self) -> list[str]:
        return []


def run_untracked(dataset: str, sweep: str, state_dir: str, verbose: int | str = 0, feature_cache: bool = True,
                  tuner_out: list | None = None) -> TransferTuner:
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
        tuner.journal = NullJournal(tuner.journal.folder)
        tuner.exports = None
        if tuner_out is not None:
            tuner_out.append(tuner)
        try:
            tuner.search(verbose=1 if verbose else 0)
        finally:
            close_spare()
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
