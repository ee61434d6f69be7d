"""Where a sweep's pruning thresholds come from: its finished trials' ``val_accuracy`` curves.

Before each trial the sweep's process (or a distributed worker) gathers the curves of the sweep's
finished, unpruned trials: those this process ran (known at once, before their runs reach MLflow
through the background journal) and the sibling runs in MLflow (other workers' trials, earlier runs
of a resumed sweep), each read once. ``pipeline.pruning.thresholds`` turns them into one number per
epoch, which travels in the trial's ``TrialSpec`` to whichever process trains it.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import pruning
from tracking import layout
from tracking.recorder import store_answers


class Curves:
    """The sweep's finished, unpruned trials' ``val_accuracy`` by epoch (keys: ``pipeline.pruning.aligned``), keyed
    by trial id."""

    def __init__(self, experiment_id: str, parent_id: str, settings: Mapping[str, Any], stage: str = ""):
        self.experiment_id, self.parent_id = experiment_id, parent_id
        # A staged search compares stage-2 trials (fine-tuning from trained heads) only with each other, not with
        # stage 1's heads, whose epochs reach onto the same axis.
        self.stage = stage
        self.min_trials = int(settings["min_trials"])
        self.warmup_epochs = int(settings["warmup_epochs"])
        self.head = bool(settings.get("head", True))  # false: fine-tuning epochs only (pipeline.pruning)
        self.curves: dict[str, dict[int, float]] = {}
        self.pruned: set[str] = set()  # trials known to be pruned (not compared against)
        self._read: set[str] = set()  # MLflow runs already looked at
        self._store_down = False  # the tracking server did not answer at the last refresh (said once)

    def add(self, trial: str, values: list[float], first_epoch: int, pruned_at: int | None,
            fine_tune_start: int | None = None) -> None:
        """A trial this process just finished (its run may not be in MLflow yet)."""
        if pruned_at is not None:
            self.pruned.add(trial)
            self.curves.pop(trial, None)
        else:
            self.curves[trial] = pruning.aligned_curve(values, first_epoch, fine_tune_start)

    def refresh(self) -> None:
        """Read the sweep's finished sibling runs that are new since the last call (one query, plus one
        metric history per new run)."""
        client = MlflowClient()
        query = f"tags.`{layout.PARENT_RUN_ID}` = '{self.parent_id}' and attributes.status = 'FINISHED'"
        for run in client.search_runs([self.experiment_id], query, max_results=5000):
            run_id, tags = run.info.run_id, run.data.tags
            trial = tags.get(layout.TRIAL_ID, run_id)
            if run_id in self._read:
                continue
            self._read.add(run_id)
            if tags.get(layout.KIND) != layout.TRIAL or tags.get(layout.STAGE, "") != self.stage:  # not an ensemble
                continue
            if layout.PRUNED in tags:
                self.pruned.add(trial)
                self.curves.pop(trial, None)
                continue
            if trial in self.curves or trial in self.pruned:
                continue
            history = client.get_metric_history(run_id, layout.VAL_ACCURACY)
            start = run.data.metrics.get(layout.FINE_TUNE_START)  # absent: it did not fine-tune
            if history:
                self.curves[trial] = {pruning.aligned(int(m.step), None if start is None else int(start)): float(m.value)
                                      for m in history}

    def limits(self) -> dict[int, float]:
        """The thresholds for the next trial: ``{key: median best-so-far val_accuracy}``, empty while fewer
        than ``min_trials`` trials finished. While the tracking server does not answer, from what this process knows
        (its own trials), so that the sweep goes on (its trials are journaled meanwhile)."""
        if store_answers(mlflow.get_tracking_uri()):
            self._store_down = False
            self.refresh()
        elif not self._store_down:
            self._store_down = True
            print("[sweep] pruning compares with this process's own finished trials until the tracking server "
                  "answers again", file=sys.stderr, flush=True)
        curves = [c for t, c in self.curves.items() if t not in self.pruned]
        return pruning.thresholds(curves, self.min_trials, self.warmup_epochs, self.head)
