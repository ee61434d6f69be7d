"""k-fold cross-validation of heads on cached features, and early stopping of the head phase."""

import numpy as np
import pytest

from pipeline import crossval, recipe
from pipeline.errors import UserError
from pipeline.hparams import RunConfig
from pipeline.training import evaluate


def test_stratified_folds_partition_the_data_and_keep_the_class_mix():
    labels = np.array([0] * 40 + [1] * 25 + [2] * 12)
    folds = crossval.stratified_folds(labels, 5, seed=42)
    joined = np.concatenate(folds)
    assert len(joined) == len(labels) and set(joined) == set(range(len(labels)))  # disjoint, covering
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for c, total in ((0, 40), (1, 25), (2, 12)):
        counts = [int(np.sum(labels[f] == c)) for f in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == total, (c, counts)
    again = crossval.stratified_folds(labels, 5, seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again)), "seeded"
    other = crossval.stratified_folds(labels, 5, seed=7)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other))


def test_bad_fold_counts_are_user_errors():
    with pytest.raises(UserError, match=r"cv_folds must be 0 \(off\) or at least 2, got 1; 5 is usual"):
        recipe.plan(RunConfig(cv_folds=1))
    with pytest.raises(UserError, match="cv_folds 5 is more than the 3 train\\+validation images; use at most 3"):
        crossval.stratified_folds(np.array([0, 1, 0]), 5, seed=0)


@pytest.mark.slow
def test_cross_validation_scores_separable_features_high_and_noise_at_chance():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    centres = rng.normal(size=(3, 8)) * 4
    x = (centres[y] + rng.normal(size=(120, 8))).astype(np.float32)
    split = lambda x, y: {"train": (x[:90], y[:90]), "validation": (x[90:], y[90:])}  # noqa: E731
    perm = rng.permutation(120)
    args = dict(folds=4, epochs=30, learning_rate=0.05, dropout=0.0, batch_size=16, seed=1)
    good = crossval.cross_validate(split(x[perm], y[perm]), 3, **args)
    assert len(good.accuracies) == 4 and good.mean >= 0.9 and good.std >= 0
    noise = crossval.cross_validate(split(rng.normal(size=(120, 8)).astype(np.float32), y[perm]), 3, **args)
    assert noise.mean < 0.6, "labels unrelated to the features: about 1/3"
    assert crossval.cross_validate(split(x[perm], y[perm]), 3, **args).accuracies == good.accuracies, "seeded"


@pytest.mark.slow
def test_a_head_run_with_cv_and_early_stopping_keeps_its_best_epoch(class_folder):
    config = RunConfig(image_size=32, fine_tune=False, epochs=40, learning_rate=0.05, batch_size=8,
                       early_stopping_patience=2, cv_folds=3)
    plan = recipe.plan(config)
    data = recipe.load_data_for(plan, str(class_folder), None)
    outcome = recipe.train_run(plan, data, verbose=0)
    history = outcome.result.history
    assert len(history["val_loss"]) < 40, "stopped early"
    assert history["val_loss"][-1] == min(history["val_loss"]), "the history ends at the epoch whose weights it kept"
    features = outcome.result.features
    assert evaluate(outcome.model, data, "validation", 8, features)[1] == pytest.approx(outcome.result.val_accuracy)
    cv = outcome.cv
    assert cv is not None and len(cv.accuracies) == 3 and 0 <= cv.mean <= 1 and cv.seconds > 0

    tuned = recipe.train_run(recipe.plan(RunConfig(image_size=32, epochs=40, learning_rate=0.05, batch_size=8,
                                                   early_stopping_patience=2, cv_folds=3, fine_tune_at=120,
                                                   fine_tune_epochs=1)), data, verbose=0)
    assert tuned.result.fine_tune_start == len(tuned.result.history["loss"]) - 1, "fine-tuning follows the kept epochs"
    assert tuned.cv is None, "a fine-tuning run is scored on validation only"
