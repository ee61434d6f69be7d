"""One trial, start to finish, in the process that holds its model: train, evaluate, draw, cost, export.

What a trial trains is ``pipeline.recipe`` (the same recipe as ``make train``); this module decides nothing
about training. It runs in the sweep's process (a head on cached features) or in a pool worker
(``sweeps.executor``), and returns one picklable ``TrialResult`` whose ``record`` folder holds everything its
MLflow run gets (``tracking.recorder`` writes it once). Nothing here talks to MLflow or Keras Tuner: a
trial's own failures are ``TrialFailed`` (the sweep goes on) and ``DataUnusable`` (it stops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import keras
import numpy as np
import tensorflow as tf

from pipeline import cost, device, precision, recipe
from pipeline.data import DataSplits
from pipeline.errors import DataError, UserError
from pipeline.export import export_model, input_names
from pipeline.hparams import RunConfig
from pipeline.model import is_head
from pipeline.pruning import PruneCallback
from pipeline.stats import tied
from pipeline.training import predictions
from tracking import layout, plots
from tracking.intervals import interval_metrics
from tracking.layout import Record

GPU_FAILURE = re.compile(r"CUDA|cuDNN|CUDNN|cuBLAS|CUBLAS|GPU|NCCL|ECC|device ordinal")  # in TensorFlow's errors
GRID_SIZE = 16  # test images in each trial's prediction grid
MODEL = "model"  # the record's folder of the SavedModel to log as the run's model


class TrialFailed(Exception):
    """This trial cannot run as configured (diverged, out of memory, an impossible value): the sweep goes on."""


class DataUnusable(Exception):
    """No trial can run on this data set: the sweep stops."""


@dataclasses.dataclass
class TrialSpec:
    """Everything one trial needs; picklable, so that a pool worker can run it."""

    run: RunConfig  # what to train
    dataset: str
    split: str | None
    log_models: str  # which trials log a SavedModel (sweeps.config.LOG_MODELS)
    verbose: int | str
    trial_dir: str  # Keras Tuner's folder of the trial: checkpoints a later trial continues
    record_dir: str  # where the trial writes its run's files (``tracking.recorder.Recorder.folder_for``)
    params: dict[str, Any]  # the run's params from the sweep (hyperparameters, seed, split)
    state_dir: str | None = None  # the sweep's state folder: costs measured once per architecture per sweep
    initial_epoch: int = 0  # Hyperband: the slice of the two-phase epoch axis this trial trains
    stop_epoch: int | None = None
    previous: str | None = None  # Hyperband promotion: the earlier trial's checkpoint, continued
    start_from: str | None = None  # stage 2: the stage-1 checkpoint whose trained head it starts from
    best: float | None = None  # the best objective before this trial (log_models: improving)
    checkpoint: bool = False  # keep the trained model as .keras in trial_dir, for a later trial (Hyperband, stage 1)
    prune: dict[int, float] | None = None  # pruning thresholds by epoch (pipeline.pruning; None: never stop early)
    record: bool = True  # False: only the score and curve the search needs, no run's files (benchmarks.untracked)

    def plan(self) -> recipe.Plan:
        return recipe.plan(self.run)


@dataclasses.dataclass
class TrialResult:
    val_accuracy: float
    record: Record  # the run's params, metrics, tags and files
    head_only: bool  # trained a head on cached features (no network built, nothing to free)
    curve: list[float] = dataclasses.field(default_factory=list)  # val_accuracy per epoch (from first_epoch)
    first_epoch: int = 0
    pruned_at: int | None = None  # the epoch at which the trial stopped, behind the earlier trials
    fine_tune_start: int | None = None  # the first fine-tuning epoch of the axis (None: it did not fine-tune)


def run(spec: TrialSpec, data_cache: dict[int, DataSplits]) -> TrialResult:
    """Train the trial (``pipeline.recipe``) and write its run's files. Raises ``TrialFailed`` or ``DataUnusable``
    for the user's mistakes; any other exception is a bug and keeps its traceback."""
    start = time.perf_counter()
    pruner = PruneCallback(spec.prune) if spec.prune else None
    Path(spec.trial_dir).mkdir(parents=True, exist_ok=True)  # its checkpoints
    with trial_errors():
        device.check_trial()  # a trial meant for a GPU that would run on the CPU fails instead
        plan = spec.plan()
        data = recipe.load_data_for(plan, spec.dataset, spec.split, data_cache)
        outcome = recipe.train_run(
            plan, data, verbose=spec.verbose, previous=spec.previous, start_from=spec.start_from,
            initial_epoch=spec.initial_epoch, stop_epoch=spec.stop_epoch,
            checkpoint_dir=spec.trial_dir if spec.checkpoint else None, callbacks=[pruner] if pruner else ())
        return _finish(spec, outcome, start, pruner.pruned_at if pruner else None)


@contextlib.contextmanager
def trial_errors() -> Iterator[None]:
    """The user's mistakes as ``TrialFailed`` / ``DataUnusable``; anything else passes with its traceback."""
    try:
        yield
    except DataError as e:  # no trial can run on this data
        raise DataUnusable(str(e)) from e
    except recipe.Diverged as e:
        raise TrialFailed(str(e)) from e
    except UserError as e:
        raise TrialFailed(f"impossible configuration: {e}") from e
    except tf.errors.ResourceExhaustedError as e:
        raise TrialFailed(f"out of memory: {e.message[:500]}") from e
    except (tf.errors.InternalError, tf.errors.UnknownError, tf.errors.UnavailableError) as e:
        if not GPU_FAILURE.search(e.message or ""):
            raise
        # A GPU that fails (Xid, ECC, illegal address, lost device) fails this trial, not the sweep or the worker.
        first = (e.message or "").strip().splitlines()[0][:300]
        raise TrialFailed(f"the GPU failed ({precision.this_device()}): {first}") from e


def trains_network(spec: TrialSpec, data_cache: dict[int, DataSplits]) -> bool:
    """Whether the trial runs the whole network (``pipeline.recipe.trains_network``): such trials run in a pool
    worker under ``trial_process: auto``, which returns their memory when it exits."""
    plan = spec.plan()
    return recipe.trains_network(plan, lambda: recipe.load_data_for(plan, spec.dataset, spec.split, data_cache),
                                 previous=spec.previous, start_from=spec.start_from)


def _finish(spec: TrialSpec, outcome: recipe.Outcome, start: float, pruned_at: int | None) -> TrialResult:
    """The run's record: params, metrics, plots, checkpoint, and the SavedModel when ``log_models`` asks for it."""
    result, model, data, plan = outcome.result, outcome.model, outcome.data, outcome.plan
    metrics = [(k, v, result.first_epoch + i) for k, vs in result.history.items() for i, v in enumerate(vs)]
    if not spec.record:  # a sweep without tracking: no plots, cost, checkpoint or model, which only a run keeps
        return TrialResult(result.val_accuracy, Record({}, metrics, {}, {}, None), is_head(model),
                           result.history["val_accuracy"], result.first_epoch, pruned_at, result.fine_tune_start)
    folder = Path(spec.record_dir)
    folder.mkdir(parents=True, exist_ok=True)
    params = {**spec.params, **data.lineage(), layout.RESOLVED_IMAGE_SIZE: plan.image_size,
              layout.FEATURE_CACHE: result.used_feature_cache, layout.RUN_CONFIG: spec.run.to_json(),
              layout.DEVICE: precision.this_device(), layout.PRECISION: plan.precision}
    metrics += [(k, v, 0) for k, v in _scores(outcome).items()]
    split = "test" if data.sizes["test"] else "validation"
    if split == "test" and result.test_predictions is not None:
        labels, probs = result.test_predictions
    else:
        labels, probs = predictions(model, data, split, features=result.features)
    files = {f"{layout.PLOTS_DIR}/{p.name}": f"plots/{p.name}" for p in _draw(outcome, labels, probs, split,
                                                                               folder / "plots")}
    # Ties count, statistically: a trial the validation split cannot tell from the best so far may win the selection
    # rule (tracking.leaderboard.ranked), so it keeps its model too.
    improving = spec.best is None or result.val_accuracy >= spec.best or tied(spec.best, data.sizes["validation"],
                                                                            result.val_accuracy)
    exported = spec.log_models == "all" or (spec.log_models == "improving" and improving)
    state_dir = Path(spec.state_dir) if spec.state_dir else None
    if exported:  # the SavedModel, from the model in memory; its cost is the export's own
        measured = export_for_record(plan, model, data, folder / MODEL, state_dir, spec.params)
    else:
        measured = model_cost(plan, model, data.num_classes, state_dir)
    if spec.log_models == "best" or exported:  # best-export and ensembles rebuild the model from it
        kept = recipe.keep_checkpoint(model, spec.trial_dir, kept_by_run=spec.checkpoint)
        _link(kept, folder / kept.name)  # the record keeps this attempt's file, whatever a retry writes later
        files[f"{layout.CHECKPOINT_DIR}/{kept.name}"] = kept.name
        if result.val_predictions is not None and result.test_predictions is not None:  # an ensemble candidate
            np.savez(folder / layout.PROBABILITIES, val_labels=result.val_predictions[0],
                     val_probs=result.val_predictions[1], test_labels=result.test_predictions[0],
                     test_probs=result.test_predictions[1])
            files[f"{layout.PROBABILITIES_DIR}/{layout.PROBABILITIES}"] = layout.PROBABILITIES
    metrics += [(layout.SIZE_MB, measured.size_mb, 0), (layout.TOTAL_PARAMS, measured.total_params, 0),
                (layout.LATENCY_MS, measured.latency_ms, 0),
                (layout.TRAIN_SECONDS, outcome.trained_at - start, 0),  # data, features and training
                (layout.WALL_SECONDS, time.perf_counter() - start, 0)]  # the whole trial in its process
    tags = {layout.COST_OF: measured.of, **({layout.PRUNED: str(pruned_at + 1)} if pruned_at is not None else {})}
    record = Record(params, metrics, tags, files, MODEL if exported else None)
    return TrialResult(result.val_accuracy, record, is_head(model), result.history["val_accuracy"],
                       result.first_epoch, pruned_at, result.fine_tune_start)


def _scores(outcome: recipe.Outcome) -> dict[str, float]:
    """The trial's one-value metrics: test scores, sizes, timings, intervals, cross-validation."""
    result, data, cv = outcome.result, outcome.data, outcome.cv
    return {
        layout.TEST_ACCURACY: result.test_accuracy, layout.TEST_LOSS: result.test_loss,
        layout.HEAD_TEST_ACCURACY: result.head_test_accuracy, layout.TRAINABLE_PARAMS: result.trainable_params,
        layout.HEAD_SECONDS: result.head_seconds, layout.FINE_TUNE_SECONDS: result.fine_tune_seconds,
        layout.FEATURE_SECONDS: result.feature_seconds, layout.RSS_MB: resident_mb(),
        layout.EVAL_SECONDS: result.eval_seconds, layout.TRACE_SECONDS: result.trace_seconds,
        layout.EVAL_TRACE_SECONDS: result.eval_trace_seconds, layout.STEP_SECONDS: result.step_seconds,
        **({layout.FINE_TUNE_START: result.fine_tune_start} if result.fine_tune_start is not None else {}),
        **interval_metrics(result.val_accuracy, data.sizes["validation"], result.test_accuracy, data.sizes["test"]),
        **({layout.CV_ACCURACY: cv.mean, layout.CV_ACCURACY_STD: cv.std, layout.CV_SECONDS: cv.seconds} if cv else {}),
    }


def _draw(outcome: recipe.Outcome, labels: np.ndarray, probs: np.ndarray, split: str, folder: Path) -> list[Path]:
    """Learning curves, confusion matrix and prediction grid as PNG files in ``folder``."""
    result, data = outcome.result, outcome.data
    matrix = np.zeros((data.num_classes, data.num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
    grid = data.first(split, GRID_SIZE)[0]  # the order of the unshuffled batches the predictions came from
    folder.mkdir(parents=True, exist_ok=True)
    return plots.trial_plots({"history": result.history, "fine_tune_start": result.fine_tune_start,
                              "first_epoch": result.first_epoch, "confusion": matrix, "class_names": data.class_names,
                              "grid_images": grid, "grid_labels": labels[: len(grid)],
                              "grid_predicted": probs[: len(grid)].argmax(axis=1)}, folder)


def export_for_record(plan: recipe.Plan, model: keras.Model, data: DataSplits, folder: Path,
                      state_dir: Path | None, metadata: Mapping[str, object]) -> cost.Cost:
    """The trained model's SavedModel in ``folder`` (the export, a sample batch and its output for the pyfunc's
    signature; a ``Record``'s model, ``metadata`` its labels) and its cost. The sweep traces each architecture's graph once (``export_model``'s ``graph_cache``) and times
    its latency once: further trials of it write only their weights."""
    architecture = plan.architecture(data.num_classes)
    full = recipe.full_model(plan, data.num_classes, model)
    cache = state_dir / "graphs" / _digest(architecture) if state_dir else None
    export = export_model(full, folder / "export", list(data.class_names), keras_file=False, graph_cache=cache,
                          metadata={k: str(v) for k, v in metadata.items()})
    sample = {name: np.zeros((1, *t.shape[1:]), np.float32) for name, t in zip(input_names(full), full.inputs)}
    probs = np.asarray(full(list(sample.values()) if len(sample) > 1 else sample["image"], training=False))
    np.savez(folder / "sample.npz", **sample)
    np.save(folder / "probs.npy", probs)
    latency = _per_sweep(state_dir, ("savedmodel-latency", *architecture),
                         lambda: {"ms": cost.savedmodel_cost(export, 0).latency_ms})["ms"]
    return cost.Cost(cost.savedmodel_size_mb(export), int(full.count_params()), latency, cost.SAVEDMODEL)


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across file systems)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def model_cost(plan: recipe.Plan, model: keras.Model, num_classes: int, state_dir: Path | None = None) -> cost.Cost:
    """The cost of a trial's classifier without an export: measured on the model in memory, or for a head on the
    full classifier assembled from it, once per architecture per sweep (it does not depend on the trained weights,
    and measuring the latency of a full network took seconds per trial)."""
    key = plan.architecture(num_classes)
    known = _per_sweep(state_dir, key, lambda: dataclasses.asdict(
        cost.cost_of_head(key, lambda: recipe.full_model(plan, num_classes, model))))  # a full model as is
    return cost.cost_of_head(key, None, known=cost.Cost(**known))


def _per_sweep(state_dir: Path | None, key: tuple, compute: Callable[[], dict]) -> dict:
    """``compute()``, once per ``key`` per sweep: kept in a file of the sweep's state folder, which its pool workers
    share (each is a fresh process)."""
    stored = state_dir / f"cost-{_digest(key)}.json" if state_dir is not None else None
    if stored is not None and stored.exists():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(stored.read_text())
    value = compute()
    if stored is not None:
        tmp = stored.with_name(f".{stored.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(value))
            os.replace(tmp, stored)
    return value


def _digest(key: tuple) -> str:
    return hashlib.sha256(json.dumps(list(key), default=str).encode()).hexdigest()[:16]


def resident_mb() -> float:
    """This process's resident memory in MB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")
