"""k-fold cross-validation of a head on cached features: a steadier score than one validation split.

A head on cached frozen-backbone features trains in seconds, so it can be trained k times: the
train and validation splits are pooled, cut into k stratified folds (seeded), and the head is trained
on k-1 folds and scored on the one left out, k times. The mean accuracy over the folds uses every
pooled image once for scoring (550 validation images become 3,300 on flower_photos) and the spread
says how much the score moves with the split. The test split is never touched.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from pipeline.errors import UserError


@dataclasses.dataclass(frozen=True)
class CVResult:
    accuracies: tuple[float, ...]  # one per fold, in fold order
    seconds: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """The spread over folds (population standard deviation of the fold accuracies)."""
        return float(np.std(self.accuracies))


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index arrays covering ``labels``, each with (as near as can be) the class mix of the whole:
    each class's shuffled (seeded) indices are dealt round-robin to the folds."""
    labels = np.asarray(labels)
    check_folds(k, len(labels))
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for j, i in enumerate(idx):
            folds[(start + j) % k].append(int(i))
        start = (start + len(idx)) % k  # the next class starts where this one stopped: fold sizes stay even
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def check_folds(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise UserError(f"cv_folds must be 0 (off) or at least 2, got {k!r}; 5 is usual")
    if n < k:
        raise UserError(f"cv_folds {k} is more than the {n} train+validation images; use at most {n} folds")


def cross_validate(features: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int, *, folds: int,
                   epochs: int, learning_rate: float, dropout: float, batch_size: int, seed: int,
                   label_smoothing: float = 0.0, weight_decay: float = 0.0) -> CVResult:
    """Train a fresh head (``pipeline.model.build_head``, the run's own head, with its loss and optimizer) for
    ``epochs`` on k-1 folds of train+validation features and score it on the fold left out, for each of ``folds``
    folds."""
    from pipeline.features import feature_batches
    from pipeline.model import build_head, compile_model
    from pipeline.training import build_optimizer

    x = np.concatenate([features["train"][0], features["validation"][0]])
    y = np.concatenate([features["train"][1], features["validation"][1]])
    start = time.perf_counter()
    accuracies = []
    parts = stratified_folds(y, folds, seed)
    for held_out in parts:
        train = np.setdiff1d(np.arange(len(y)), held_out, assume_unique=True)
        head = build_head(x.shape[1], num_classes, dropout, seed=seed)
        compile_model(head, learning_rate, label_smoothing=label_smoothing, weight_decay=weight_decay)
        build_optimizer(head)  # the train step traced once per fold, not twice
        head.fit(feature_batches((x[train], y[train]), batch_size, shuffle=True, seed=seed), epochs=epochs,
                 verbose=0, shuffle=False)
        probs = np.asarray(head(x[held_out], training=False))  # no predict(): a new head per fold would retrace it
        accuracies.append(float(np.mean(probs.argmax(axis=1) == y[held_out])))
    return CVResult(tuple(accuracies), time.perf_counter() - start)
