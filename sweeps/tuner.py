"""The tuner: Keras Tuner's oracles choose, the pipeline trains, every trial lands in MLflow.

``TransferTuner`` is a ``BaseTuner`` whose ``run_trial`` runs one two-phase trial through the
pipeline inside an MLflow child run. Hyperband promotions continue the previous trial's saved
model (with its trainable flags and optimizer state) on the same two-phase epoch axis.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from pipeline import features
from pipeline.backbones import get_spec
from pipeline.data import DataSplits, load_data
from pipeline.errors import UserError
from pipeline.export import export_model, load_keras_model
from pipeline.hparams import DEFAULTS
from pipeline.model import build_model, resolve_fine_tune_at
from pipeline.training import TrainResult, backbone_trainable, train
from sweeps import space as space_module
from sweeps.config import SweepConfig
from tracking import plots, pyfunc, runs

CHECKPOINT = "model.keras"


class SpaceHyperModel(kt.HyperModel):
    """Declares the space; ``build`` returns the trial's values (models are built in ``run_trial``)."""

    def __init__(self, space: dict[str, dict[str, Any]]):
        super().__init__(name="transfer")
        self.space = space

    def build(self, hp: kt.HyperParameters) -> dict[str, Any]:
        return space_module.define(hp, self.space)


def make_oracle(config: SweepConfig) -> kt.Oracle:
    objective = kt.Objective(config.objective, direction="max")
    common = dict(objective=objective, seed=config.seed, max_consecutive_failed_trials=config.max_consecutive_failed_trials)
    if config.tuner == "random":
        return kt.oracles.RandomSearchOracle(max_trials=config.max_trials, **common)
    if config.tuner == "bayesian":
        return kt.oracles.BayesianOptimizationOracle(max_trials=config.max_trials, **common)
    if config.tuner == "grid":
        return kt.oracles.GridSearchOracle(max_trials=config.max_trials, **common)
    hb = config.hyperband
    return kt.oracles.HyperbandOracle(
        max_epochs=int(hb.get("max_epochs", 8)), factor=int(hb.get("factor", 3)),
        hyperband_iterations=int(hb.get("iterations", 1)), **common,
    )


class TransferTuner(kt.engine.base_tuner.BaseTuner):
    def __init__(
        self,
        config: SweepConfig,
        dataset: str,
        directory: str,
        experiment_id: str,
        parent_run_id: str,
        split: str | None = None,
        verbose: int | str = 2,
        feature_cache: bool = True,
        stage: str = "",
        start_from: str | None = None,
        data_cache: dict[int, DataSplits] | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            oracle=make_oracle(config), hypermodel=SpaceHyperModel(config.space), directory=directory,
            project_name=config.name, overwrite=False, **kwargs,
        )
        self.stage = stage  # "", "1" or "2" (staged search)
        self.start_from = start_from  # stage 2: the stage-1 model (trained head) every trial starts from
        self.config = config
        self.dataset = dataset
        self.split = split
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.verbose = verbose
        self.feature_cache = feature_cache
        self.data_cache: dict[int, DataSplits] = {} if data_cache is None else data_cache  # shared across stages
        self._best: float | None = None  # best objective logged by this process (for log_models: improving)
        self.timings = {"trials": 0.0, "tracking": 0.0, "export": 0.0}  # seconds, summed over trials

    # -- data, shared by all trials of the same image size (decoded once, cached in memory) --------

    def data_for(self, image_size: int) -> DataSplits:
        if image_size not in self.data_cache:
            self.data_cache[image_size] = load_data(self.dataset, image_size, seed=self.config.seed, split=self.split)
        return self.data_cache[image_size]

    # -- one trial -----------------------------------------------------------------------------

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        hp = trial.hyperparameters
        values = self.hypermodel.build(hp)
        tuner_values = {k: v for k, v in hp.values.items() if k.startswith("tuner/")}
        tags = {runs.TRIAL_ID: self.trial_key(trial.trial_id), "tlsweep.tuner": self.config.tuner}
        if self.stage:
            tags["tlsweep.stage"] = self.stage
        start = time.perf_counter()
        try:
            with runs.child_run(self.experiment_id, self.parent_run_id, f"trial-{tags[runs.TRIAL_ID]}", tags) as run_id:
                try:
                    result, model, data, image_size = self._train(trial, values, tuner_values)
                except (UserError, ValueError) as e:
                    raise kt.errors.FailedTrialError(f"impossible configuration: {e}") from e
                except tf.errors.ResourceExhaustedError as e:
                    raise kt.errors.FailedTrialError(f"out of memory: {e.message[:500]}") from e
                finally:
                    runs.log_params(run_id, {**values, **tuner_values, "seed": self.config.seed,
                                             "split": self.split or "default"})  # best-export reloads the data
                self._log_trial(run_id, trial, values, result, model, data, image_size, time.perf_counter() - start)
                runs.log_metrics(run_id, {"wall_seconds": time.perf_counter() - start})  # the whole trial
        finally:
            keras.backend.clear_session(free_memory=True)  # failed trials must not keep their memory
            self.timings["trials"] += time.perf_counter() - start
        return {self.config.objective: result.val_accuracy}

    def trial_key(self, trial_id: str) -> str:
        """The trial id as tracked: unique across the tuners of a staged search."""
        return f"{self.config.name}/{trial_id}" if self.stage == "2" else trial_id

    def checkpoint(self, trial_id: str) -> str:
        return str(Path(self.get_trial_dir(trial_id)) / CHECKPOINT)

    def _train(self, trial, values: dict[str, Any], tuner_values: dict[str, Any]):
        spec = get_spec(values["backbone"])
        image_size = int(values["image_size"]) or spec.native_size
        unfreeze_from = resolve_fine_tune_at(values["fine_tune_at"], spec) if values["fine_tune"] else None
        data = self.data_for(image_size)
        keras.utils.set_random_seed(self.config.seed)
        previous = tuner_values.get("tuner/trial_id")
        initial_epoch = int(tuner_values.get("tuner/initial_epoch", 0))
        if previous:  # Hyperband promotion: continue the earlier trial's model where it stopped
            model = load_keras_model(Path(self.get_trial_dir(previous)) / CHECKPOINT)
        elif self.start_from:  # staged search, stage 2: fine-tune the stage-1 trial's trained head
            model = load_keras_model(self.start_from)
            initial_epoch = int(values["epochs"])
        else:
            model = build_model(
                values["backbone"], data.num_classes, image_size, dropout=float(values["dropout"]),
                augment=bool(values["augment"]), weights=values["weights"], seed=self.config.seed,
                mixed_precision=self.config.mixed_precision,
            )
        cached, feature_seconds = (
            features.for_model(model, data, spec, values["weights"], image_size) if self.feature_cache else (None, 0.0))
        result = train(
            model, data, features=cached, epochs=int(values["epochs"]), fine_tune_epochs=int(values["fine_tune_epochs"] or 0),
            unfreeze_from=unfreeze_from, learning_rate=float(values["learning_rate"]),
            fine_tune_learning_rate=float(values["fine_tune_learning_rate"] or DEFAULTS["fine_tune_learning_rate"]),
            batch_size=int(values["batch_size"]), seed=self.config.seed, verbose=self.verbose,
            initial_epoch=initial_epoch,
            stop_epoch=tuner_values.get("tuner/epochs"), jit_compile=self.config.xla,
        )
        if any(math.isnan(v) or math.isinf(v) for v in result.history["loss"]):
            raise kt.errors.FailedTrialError("loss became NaN/inf; lower the learning rate")
        if self.config.tuner == "hyperband" or self.stage == "1":  # promoted / fine-tuned later
            model.save(Path(self.get_trial_dir(trial.trial_id)) / CHECKPOINT)
        result.feature_seconds = feature_seconds
        return result, model, data, image_size

    def _log_trial(self, run_id: str, trial, values, result: TrainResult, model, data: DataSplits,
                   image_size: int, seconds: float) -> None:
        import mlflow

        tracking = time.perf_counter()
        runs.log_params(run_id, {**data.lineage(), "resolved_image_size": image_size,
                                 "feature_cache": result.used_feature_cache})
        runs.log_history(run_id, result.history, first_epoch=result.first_epoch)
        runs.log_metrics(run_id, {
            "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
            "head_test_accuracy": result.head_test_accuracy, "trainable_params": result.trainable_params,
            "head_seconds": result.head_seconds, "fine_tune_seconds": result.fine_tune_seconds,
            "feature_seconds": result.feature_seconds, "train_seconds": seconds,
        })
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            plots.learning_curves(result.history, result.fine_tune_start, tmp_path / "learning_curves.png",
                                  first_epoch=result.first_epoch)
            plots.confusion_matrix(confusion(model, data, result), data.class_names, tmp_path / "confusion_matrix.png")
            mlflow.log_artifacts(tmp, "plots")
            improving = self._best is None or result.val_accuracy > self._best
            self._best = result.val_accuracy if improving else self._best
            if self.config.log_models == "all" or improving:
                exporting = time.perf_counter()
                export = export_model(model, tmp_path / "savedmodel", data.class_names, metadata={
                    "run_id": run_id, "trial_id": self.trial_key(trial.trial_id), **values, **data.lineage()})
                self.timings["export"] += time.perf_counter() - exporting
                tracking += time.perf_counter() - exporting  # shift the start: exporting is pipeline work
                mlflow.log_artifacts(str(export), "savedmodel")
                sample = next(iter(data.batches("test" if data.sizes["test"] else "validation", 2)))[0].numpy()
                uri = pyfunc.log_pyfunc(str(export), sample, model.predict(sample, verbose=0))
                mlflow.set_tag("tlsweep.model_uri", uri)
        self.timings["tracking"] += time.perf_counter() - tracking


def confusion(model: keras.Model, data: DataSplits, result: TrainResult | None = None, split: str = "test",
              batch_size: int = 64) -> np.ndarray:
    """Counts per (true, predicted) class; on cached features while the backbone is frozen."""
    n = data.num_classes
    matrix = np.zeros((n, n), dtype=np.int64)
    if result is not None and result.features is not None and not backbone_trainable(model):
        x, y = result.features[split]
        predicted = features.head(model).predict(x, batch_size=batch_size, verbose=0).argmax(axis=1)
        np.add.at(matrix, (y, predicted), 1)
        return matrix
    for x, y in data.batches(split, batch_size):
        predicted = model.predict_on_batch(x).argmax(axis=1)
        np.add.at(matrix, (y.numpy(), predicted), 1)
    return matrix


def sweep_dir(state_dir: str, experiment: str) -> str:
    path = Path(state_dir) / experiment
    path.mkdir(parents=True, exist_ok=True)
    return str(path)

