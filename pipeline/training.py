"""Two-phase training: a head on the frozen backbone, then fine-tuning from ``fine_tune_at``.

Both phases form one history on one epoch axis: phase 2 continues from ``initial_epoch``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Sequence

import keras
import numpy as np

from pipeline.data import DataSplits
from pipeline.errors import UserError
from pipeline.model import compile_model, set_trainable

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
# Folder pipelines drop undecodable files, so their length is unknown to Keras; that is expected.
warnings.filterwarnings("ignore", message="Your input ran out of data")


@dataclasses.dataclass
class TrainResult:
    history: dict[str, list[float]]  # METRICS, one value per epoch over both phases
    fine_tune_start: int | None  # first epoch index of phase 2, None when head only
    head_seconds: float
    fine_tune_seconds: float
    trainable_params: int
    test_loss: float | None = None
    test_accuracy: float | None = None
    head_test_accuracy: float | None = None  # test accuracy before fine-tuning (measured, never used to choose)

    @property
    def val_accuracy(self) -> float:
        """Validation accuracy of the final model (last epoch)."""
        return float(self.history["val_accuracy"][-1])

    @property
    def best_val_accuracy(self) -> float:
        return float(np.max(self.history["val_accuracy"]))


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def train(
    model: keras.Model,
    data: DataSplits,
    *,
    epochs: int = 10,
    fine_tune_epochs: int = 5,
    unfreeze_from: int | None = None,
    learning_rate: float = 1e-3,
    fine_tune_learning_rate: float = 1e-5,
    batch_size: int = 32,
    seed: int = 42,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = 2,
    evaluate_test: bool = True,
) -> TrainResult:
    """Train the head with the backbone frozen, then fine-tune from ``unfreeze_from`` (if not None)."""
    check_positive("epochs", epochs)
    check_positive("fine_tune_epochs", fine_tune_epochs, allow_zero=True)
    check_positive("learning_rate", learning_rate)
    check_positive("fine_tune_learning_rate", fine_tune_learning_rate)
    check_positive("batch_size", batch_size)
    train_ds = data.batches("train", batch_size, shuffle=True, seed=seed)
    val_ds = data.batches("validation", batch_size)

    params = set_trainable(model, None)
    compile_model(model, learning_rate)
    start = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=list(callbacks), verbose=verbose, shuffle=False)
    head_seconds = time.perf_counter() - start
    merged = {k: list(map(float, history.history.get(k, []))) for k in METRICS}

    fine_tune_start, fine_tune_seconds, head_test_accuracy = None, 0.0, None
    if unfreeze_from is not None and fine_tune_epochs > 0:
        if evaluate_test:
            head_test_accuracy = evaluate(model, data, "test", batch_size)[1]
        params = set_trainable(model, unfreeze_from)
        compile_model(model, fine_tune_learning_rate)  # recompile after changing `trainable`
        start = time.perf_counter()
        fine_tune_start = epochs
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=epochs,
            epochs=epochs + fine_tune_epochs,
            callbacks=list(callbacks),
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles, seeded
        )
        fine_tune_seconds = time.perf_counter() - start
        for k in METRICS:
            merged[k] += map(float, history.history.get(k, []))

    result = TrainResult(merged, fine_tune_start, head_seconds, fine_tune_seconds, params)
    if evaluate_test:
        result.test_loss, result.test_accuracy = evaluate(model, data, "test", batch_size)
        result.head_test_accuracy = result.test_accuracy if head_test_accuracy is None else head_test_accuracy
    return result


def evaluate(model: keras.Model, data: DataSplits, split: str, batch_size: int = 32) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on one split."""
    if data.sizes.get(split, 0) == 0:
        return float("nan"), float("nan")
    scores = model.evaluate(data.batches(split, batch_size), verbose=0, return_dict=True)
    return float(scores["loss"]), float(scores["accuracy"])
