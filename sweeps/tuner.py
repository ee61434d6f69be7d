"""The tuner: Keras Tuner's oracles choose, the pipeline trains, every trial lands in MLflow.

``TransferTuner`` is a ``BaseTuner`` whose ``run_trial`` runs one two-phase trial through the
pipeline inside an MLflow child run. Hyperband promotions continue the previous trial's saved
model (with its trainable flags and optimizer state) on the same two-phase epoch axis.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from pipeline import features
from pipeline.backbones import get_spec
from pipeline.data import DataSplits, load_data
from pipeline.errors import DataError, UserError
from pipeline.export import export_model, load_keras_model
from pipeline.hparams import DEFAULTS
from pipeline.model import build_head, build_model, is_head, resolve_fine_tune_at
from pipeline.training import TrainResult, predictions, train
from sweeps import signals
from sweeps import space as space_module
from sweeps.config import SweepConfig
from tracking import runs
from tracking.journal import TrialJournal

CHECKPOINT = "model.keras"
HEAD_CHECKPOINT = "head.keras"
GRID_SIZE = 16  # test images in each trial's prediction grid


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
        progress: bool = True,
        **kwargs: Any,
    ):
        super().__init__(
            oracle=make_oracle(config), hypermodel=SpaceHyperModel(config.space), directory=directory,
            project_name=config.name, overwrite=False, **kwargs,
        )
        self.progress = progress  # one line per trial: i/N, time, ETA, best so far
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
        self.timings = {"trials": 0.0, "export": 0.0}  # seconds, summed over trials
        self.memory: list[tuple[str, float]] = []  # (trial, resident MB after it was cleaned up)
        # MLflow writes happen on a background thread, through a journal kept beside the tuner's state.
        self.journal = TrialJournal(Path(self.project_dir) / f"journal-{self.tuner_id}")

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
        key = self.trial_key(trial.trial_id)
        tags = {runs.TRIAL_ID: key, runs.WORKER: self.tuner_id, "tlsweep.tuner": self.config.tuner}
        if self.stage:
            tags["tlsweep.stage"] = self.stage
        params = {**values, **tuner_values, "seed": self.config.seed, "split": self.split or "default"}
        start = time.perf_counter()
        head_only, outcome = False, None
        run = self.journal.start(self.experiment_id, self.parent_run_id, f"trial-{key}", tags)
        try:
            try:
                outcome = self._train(trial, values, tuner_values)
                head_only = is_head(outcome.model)
            except DataError as e:  # no trial can run on this data: stop the sweep
                raise kt.errors.FatalError(str(e)) from e
            except (UserError, ValueError) as e:
                raise kt.errors.FailedTrialError(f"impossible configuration: {e}") from e
            except tf.errors.ResourceExhaustedError as e:
                raise kt.errors.FailedTrialError(f"out of memory: {e.message[:500]}") from e
            self._finish(run, trial, values, params, outcome, start)
        except BaseException as e:
            # A signal inside TensorFlow may surface as another error: it still stops the sweep.
            if isinstance(e, KeyboardInterrupt) or signals.interrupted():
                self.journal.fail(run, "KILLED", "interrupted (Ctrl-C or SIGTERM)", params=params)
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise KeyboardInterrupt(f"interrupted; TensorFlow reported it as {type(e).__name__}: {e}") from e
            self.journal.fail(run, "FAILED", f"{type(e).__name__}: {e}", traceback.format_exc(), params=params)
            raise
        finally:
            self._progress(key, time.perf_counter() - start, outcome.result.val_accuracy if outcome else None)
            # Free the trial's memory (also of failed trials); a garbage collection pass costs ~0.25 s,
            # worth it after a full model, not after a head of a few KB.
            keras.backend.clear_session(free_memory=not head_only)
            self.memory.append((key, resident_mb()))
            self.timings["trials"] += time.perf_counter() - start
        return {self.config.objective: outcome.result.val_accuracy}

    def on_search_begin(self) -> None:
        self._search_start = time.perf_counter()
        self._durations: list[float] = []
        super().on_search_begin()

    def _progress(self, key: str, seconds: float, value: float | None) -> None:
        """One line per trial: where the sweep is, how long it has left, the best so far."""
        self._durations.append(seconds)
        if not self.progress:
            return
        trials = getattr(self.oracle, "trials", None)  # None on a worker: the chief's oracle has them
        if trials is None:
            done, total = len(self._durations), None
        else:
            done = sum(t.status in ("COMPLETED", "FAILED", "INVALID") for t in trials.values()) + 1
            total = self.config.max_trials if self.config.tuner != "hyperband" else None
        elapsed = time.perf_counter() - self._search_start
        best = [t for t in self.oracle.get_best_trials(1) if t.score is not None]
        parts = [f"trial {key} ({done}/{total if total else '?'})",
                 f"{'val_accuracy ' + format(value, '.4f') if value is not None else 'FAILED'} in {_clock(seconds)}"]
        if best or value is not None:
            top = max([b.score for b in best] + ([value] if value is not None else []))
            parts.append(f"best {top:.4f}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total:
            left = max(total - done, 0)
            parts.append(f"ETA {_clock(left * sum(self._durations) / len(self._durations))}" if left else "last trial")
        print("[sweep] " + " | ".join(parts), flush=True)

    def on_search_end(self) -> None:
        self.journal.flush()  # every finished trial is in MLflow before the sweep reports
        super().on_search_end()

    def trial_key(self, trial_id: str) -> str:
        """The trial id as tracked: unique across the tuners of a staged search."""
        return f"{self.config.name}/{trial_id}" if self.stage == "2" else trial_id

    def checkpoint(self, trial_id: str) -> str:
        """The trial's saved model: ``head.keras`` (a head trained on features) or ``model.keras``."""
        folder = Path(self.get_trial_dir(trial_id))
        head = folder / HEAD_CHECKPOINT
        return str(head if head.exists() else folder / CHECKPOINT)

    def _train(self, trial, values: dict[str, Any], tuner_values: dict[str, Any]) -> "Outcome":
        spec = get_spec(values["backbone"])
        image_size = int(values["image_size"]) or spec.native_size
        unfreeze_from = resolve_fine_tune_at(values["fine_tune_at"], spec) if values["fine_tune"] else None
        fine_tune_epochs = int(values["fine_tune_epochs"] or 0)
        data = self.data_for(image_size)
        keras.utils.set_random_seed(self.config.seed)
        key = None
        if self.feature_cache and not values["augment"]:  # augmentation runs before the backbone: no cache
            key = features.key_for(spec, values["weights"], image_size, data, self.config.mixed_precision)
        cached, feature_seconds = (features.load(key) if key else None), 0.0
        previous = tuner_values.get("tuner/trial_id")
        initial_epoch = int(tuner_values.get("tuner/initial_epoch", 0))
        if previous:  # Hyperband promotion: continue the earlier trial's model where it stopped
            model = load_keras_model(self.checkpoint(previous))
        elif self.start_from:  # staged search, stage 2: fine-tune the stage-1 trial's trained head
            model = self._full(values, data, image_size, load_keras_model(self.start_from))
            initial_epoch = int(values["epochs"])
        elif cached is not None and (unfreeze_from is None or fine_tune_epochs == 0):
            # Head only, on cached features: the full model is built only if it is exported.
            model = build_head(cached["train"][0].shape[1], data.num_classes, float(values["dropout"]),
                               seed=self.config.seed, mixed_precision=self.config.mixed_precision)
        else:
            model = self._full(values, data, image_size)
        if key and cached is None and not is_head(model):
            cached, feature_seconds = features.load_or_compute(model, data, key)
        result = train(
            model, data, features=cached, epochs=int(values["epochs"]), fine_tune_epochs=fine_tune_epochs,
            unfreeze_from=unfreeze_from, learning_rate=float(values["learning_rate"]),
            fine_tune_learning_rate=float(values["fine_tune_learning_rate"] or DEFAULTS["fine_tune_learning_rate"]),
            batch_size=int(values["batch_size"]), seed=self.config.seed, verbose=self.verbose,
            initial_epoch=initial_epoch,
            stop_epoch=tuner_values.get("tuner/epochs"), jit_compile=self.config.xla,
        )
        if any(math.isnan(v) or math.isinf(v) for v in result.history["loss"]):
            raise kt.errors.FailedTrialError("loss became NaN/inf; lower the learning rate")
        if self.config.tuner == "hyperband" or self.stage == "1" or self.config.log_models == "best":
            model.save(Path(self.get_trial_dir(trial.trial_id)) / (HEAD_CHECKPOINT if is_head(model) else CHECKPOINT))
        result.feature_seconds = feature_seconds
        return Outcome(result, model, data, image_size, time.perf_counter())

    def _full(self, values: dict[str, Any], data: DataSplits, image_size: int,
              head: keras.Model | None = None) -> keras.Model:
        """The trial's full classifier (taking a trained head's weights); a full model is returned as is."""
        if head is not None and not is_head(head):
            return head
        return build_model(
            values["backbone"], data.num_classes, image_size, dropout=float(values["dropout"]),
            augment=bool(values["augment"]), weights=values["weights"], seed=self.config.seed,
            mixed_precision=self.config.mixed_precision, head=head,
        )

    def _finish(self, run, trial, values: dict[str, Any], params: dict[str, Any], outcome: "Outcome",
                start: float) -> None:
        """Journal the finished trial (MLflow gets it in the background); export its model if logged."""
        result, model, data = outcome.result, outcome.model, outcome.data
        params = {**params, **data.lineage(), "resolved_image_size": outcome.image_size,
                  "feature_cache": result.used_feature_cache}
        metrics = [(k, v, result.first_epoch + i) for k, vs in result.history.items() for i, v in enumerate(vs)]
        metrics += [(k, v, 0) for k, v in {
            "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
            "head_test_accuracy": result.head_test_accuracy, "trainable_params": result.trainable_params,
            "head_seconds": result.head_seconds, "fine_tune_seconds": result.fine_tune_seconds,
            "feature_seconds": result.feature_seconds, "rss_mb": resident_mb()}.items()]
        split = "test" if data.sizes["test"] else "validation"
        labels, probs = predictions(model, data, split, features=result.features)
        matrix = np.zeros((data.num_classes, data.num_classes), dtype=np.int64)
        np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
        grid = next(iter(data.batches(split, GRID_SIZE)))[0].numpy()  # batches are unshuffled: same order
        plot_data = {"history": result.history, "fine_tune_start": result.fine_tune_start,
                     "first_epoch": result.first_epoch, "confusion": matrix, "class_names": data.class_names,
                     "grid_images": grid, "grid_labels": labels[: len(grid)],
                     "grid_predicted": probs[: len(grid)].argmax(axis=1)}
        improving = self._best is None or result.val_accuracy > self._best
        self._best = result.val_accuracy if improving else self._best
        files, exported = {}, None
        staging = Path(tempfile.mkdtemp(prefix="trial-", dir=self.journal.folder.parent))
        if self.config.log_models == "all" or (self.config.log_models == "improving" and improving):
            exporting = time.perf_counter()
            full = self._full(values, data, outcome.image_size, model)
            export = export_model(full, staging / "savedmodel", data.class_names, metadata={
                "run_id": run.result(), "trial_id": self.trial_key(trial.trial_id), **values, **data.lineage()})
            sample = grid[:2]
            exported = (export, sample, full.predict(sample, verbose=0))
            self.timings["export"] += time.perf_counter() - exporting
        elif self.config.log_models == "best":  # best-export builds the SavedModel from this checkpoint
            name = HEAD_CHECKPOINT if is_head(model) else CHECKPOINT
            shutil.copy(Path(self.get_trial_dir(trial.trial_id)) / name, staging / name)
            files[f"checkpoint/{name}"] = staging / name
        # train: data, features and training; wall: the whole trial as the sweep waits for it
        metrics += [("train_seconds", outcome.trained_at - start, 0), ("wall_seconds", time.perf_counter() - start, 0)]
        self.journal.finish(run, params, metrics, plot_data, files, exported)
        shutil.rmtree(staging, ignore_errors=True)


@dataclasses.dataclass
class Outcome:
    result: TrainResult
    model: keras.Model  # the full classifier, or the head alone when it trained on cached features
    data: DataSplits
    image_size: int
    trained_at: float  # perf_counter() when training and evaluation ended


def resident_mb() -> float:
    """This process's resident memory in MB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def sweep_dir(state_dir: str, experiment: str) -> str:
    path = Path(state_dir) / experiment
    path.mkdir(parents=True, exist_ok=True)
    return str(path)

