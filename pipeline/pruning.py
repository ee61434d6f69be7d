"""Stop a trial that is clearly behind: the median rule, as plain numbers and a Keras callback.

The rule (Optuna's ``MedianPruner``, on best-so-far curves): at an epoch of a trial, a trial whose best
``val_accuracy`` so far is below the median of the best-so-far ``val_accuracy`` of earlier finished trials at
the same point stops. Epochs are compared **phase by phase**: head epoch ``i`` with the others' head epoch
``i``, fine-tuning epoch ``j`` with the others' fine-tuning epoch ``j`` (trials whose head phases have different
lengths, searched ``epochs`` or early stopping, fine-tune from different epochs of the one axis). Keys of a
curve: ``aligned(epoch, fine_tune_start)``, head epochs as themselves, fine-tuning epoch ``j`` as ``-(j + 1)``.
Not in the first ``warmup_epochs`` head epochs, and only where at least ``min_trials`` earlier trials reached.
With ``head=False`` not in head epochs at all: fine-tuning epochs are compared only with fine-tuning epochs, and a
trial is never stopped because it drew a slow head (heads on cached features cost seconds).

The sweep turns its finished trials' curves into one threshold per key (``thresholds``) before a
trial starts; the trial, in any process or on any worker, only compares with those numbers
(``PruneCallback``). This module imports neither MLflow nor Keras Tuner.
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

import keras


def aligned(epoch: int, fine_tune_start: int | None) -> int:
    """The key of an epoch of the two-phase axis: a head epoch as itself, fine-tuning epoch ``j`` as ``-(j + 1)``."""
    return epoch if fine_tune_start is None or epoch < fine_tune_start else -(epoch - fine_tune_start + 1)


def aligned_curve(values: Sequence[float], first_epoch: int, fine_tune_start: int | None) -> dict[int, float]:
    """``{key: value}`` of a curve given from ``first_epoch`` on the two-phase axis."""
    return {aligned(first_epoch + i, fine_tune_start): float(v) for i, v in enumerate(values)}


def _in_order(key: int) -> tuple[bool, int]:
    return key < 0, abs(key)  # head epochs, then fine-tuning epochs


def best_so_far(curve: Mapping[int, float]) -> dict[int, float]:
    """``{key: best value up to and including that epoch}`` of one curve ``{key: value}`` (keys: ``aligned``)."""
    out, best = {}, float("-inf")
    for epoch in sorted(curve, key=_in_order):
        best = max(best, float(curve[epoch]))
        out[epoch] = best
    return out


def thresholds(curves: Sequence[Mapping[int, float]], min_trials: int, warmup_epochs: int,
               head: bool = True) -> dict[int, float]:
    """``{key: median of the earlier trials' best-so-far}`` for each head epoch from ``warmup_epochs`` on (none when
    ``head`` is false) and each fine-tuning epoch that at least ``min_trials`` of ``curves`` (earlier finished, not
    pruned, trials: ``{key: val_accuracy}``, keys from ``aligned``) reached."""
    bests = [best_so_far(c) for c in curves]
    epochs = sorted({e for b in bests for e in b if (head and e >= warmup_epochs) or e < 0}, key=_in_order)
    out = {}
    for epoch in epochs:
        values = [b[epoch] for b in bests if epoch in b]
        if len(values) >= max(min_trials, 1):
            out[epoch] = float(statistics.median(values))
    return out


def should_prune(best: float, key: int, limits: Mapping[int, float]) -> bool:
    """Whether a trial whose best value so far at ``key`` (``aligned``) is ``best`` is behind the threshold there."""
    limit = limits.get(key)
    return limit is not None and best < limit


class PruneCallback(keras.callbacks.Callback):
    """Stops training when the epoch's best-so-far ``val_accuracy`` is below its threshold; ``pruned_at`` then
    holds the epoch (of the two-phase axis). ``pipeline.training.train`` ends the run (no further phase) when a
    callback stopped it, and tells it where fine-tuning starts (``on_phase_begin``)."""

    def __init__(self, limits: Mapping[int, float], monitor: str = "val_accuracy"):
        super().__init__()
        self.limits = {int(k): float(v) for k, v in limits.items()}  # JSON keys arrive as strings
        self.monitor = monitor
        self.best = float("-inf")
        self.pruned_at: int | None = None
        self.fine_tune_start: int | None = None

    def on_phase_begin(self, phase: str, phase_start: int) -> None:
        """Called by ``pipeline.training.train`` before each phase: where its epochs start on the axis."""
        self.fine_tune_start = phase_start if phase == "fine_tune" else None

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.best = max(self.best, float(value))
        if self.pruned_at is None and should_prune(self.best, aligned(epoch, self.fine_tune_start), self.limits):
            self.pruned_at = epoch
            self.model.stop_training = True
