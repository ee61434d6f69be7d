"""Stop a trial that is clearly behind: the median rule, as plain numbers and a Keras callback.

The rule (Optuna's ``MedianPruner``, on best-so-far curves): at epoch ``e`` (0-based, on the two-phase
axis: head epochs then fine-tuning epochs), a trial whose best ``val_accuracy`` so far is below the
median of the best-so-far ``val_accuracy`` at ``e`` of earlier finished trials stops. Not before
``warmup_epochs`` epochs, and only at epochs that at least ``min_trials`` earlier trials reached.

The sweep turns its finished trials' curves into one threshold per epoch (``thresholds``) before a
trial starts; the trial, in any process or on any worker, only compares with those numbers
(``PruneCallback``). This module imports neither MLflow nor Keras Tuner.
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

import keras

RULES = ("median",)


def best_so_far(curve: Mapping[int, float]) -> dict[int, float]:
    """``{epoch: best value up to and including that epoch}`` of one curve ``{epoch: value}``."""
    out, best = {}, float("-inf")
    for epoch in sorted(curve):
        best = max(best, float(curve[epoch]))
        out[epoch] = best
    return out


def thresholds(curves: Sequence[Mapping[int, float]], min_trials: int, warmup_epochs: int) -> dict[int, float]:
    """``{epoch: median of the earlier trials' best-so-far}`` for each epoch from ``warmup_epochs`` on that at
    least ``min_trials`` of ``curves`` (earlier finished, not pruned, trials: ``{epoch: val_accuracy}``) reached."""
    bests = [best_so_far(c) for c in curves]
    epochs = sorted({e for b in bests for e in b if e >= warmup_epochs})
    out = {}
    for epoch in epochs:
        values = [b[epoch] for b in bests if epoch in b]
        if len(values) >= max(min_trials, 1):
            out[epoch] = float(statistics.median(values))
    return out


def should_prune(best: float, epoch: int, limits: Mapping[int, float]) -> bool:
    """Whether a trial whose best value so far at ``epoch`` is ``best`` is behind the threshold there."""
    limit = limits.get(epoch)
    return limit is not None and best < limit


class PruneCallback(keras.callbacks.Callback):
    """Stops training when the epoch's best-so-far ``val_accuracy`` is below its threshold; ``pruned_at`` then
    holds the epoch. ``pipeline.training.train`` ends the run (no further phase) when a callback stopped it."""

    def __init__(self, limits: Mapping[int, float], monitor: str = "val_accuracy"):
        super().__init__()
        self.limits = {int(k): float(v) for k, v in limits.items()}  # JSON keys arrive as strings
        self.monitor = monitor
        self.best = float("-inf")
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.best = max(self.best, float(value))
        if self.pruned_at is None and should_prune(self.best, epoch, self.limits):
            self.pruned_at = epoch
            self.model.stop_training = True
