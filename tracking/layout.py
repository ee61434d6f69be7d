"""The MLflow run layout: every tag, param, metric and artifact name tlsweep writes, in one place.

A sweep is one parent run (``KIND`` = ``sweep``) with one nested child run per trial (``KIND`` =
``trial``). Other modules use these names, never literals (``tests/integration/test_layout.py`` checks that the
names below agree with what the pipeline produces). It imports nothing heavy: a trial's fresh process
and the plot helper process use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping

from pipeline.hparams import DEFAULTS

PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own tag for nested runs
# the experiment's tag that MLflow 3's UI reads to show it as model training (runs, charts), not GenAI (traces)
EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"

# -- tags ----------------------------------------------------------------------------------------
KIND = "tlsweep.kind"  # SWEEP for parents, TRIAL for children, ENSEMBLE for the sweep's ensemble of trials, REFIT
# REFIT: best-export --refit's model; EXPORT: what best-export made of a FINISHED run (a SavedModel built from its
# checkpoint, a TFLite file), in a run of its own: a run is written once
SWEEP, TRIAL, ENSEMBLE, REFIT, EXPORT = "sweep", "trial", "ensemble", "refit", "export"
SWEEP_KEY = "tlsweep.sweep"  # identifies a sweep across restarts: "<experiment>:<sweep name>"
TRIAL_ID = "kt.trial_id"
WORKER = "kt.tuner_id"  # which Keras Tuner process ran the trial
PROCESS = "tlsweep.process"  # where the trial ran: "sweep" (the sweep's process) or "pool" (a fresh pool worker)
TUNER = "tlsweep.tuner"
STAGE = "tlsweep.stage"  # "1" or "2" in a staged search
HEARTBEAT = "tlsweep.heartbeat"  # a distributed worker's last sign of life on its trial's run (epoch seconds)
CLOSED_BY = "tlsweep.closed_by"  # why a run was closed by another process (resume, the chief's monitor)
BEST_RUN_ID = "tlsweep.best_run_id"  # on the parent
RESUMED = "tlsweep.resumed"  # on the parent, when a sweep was started again
MODEL_URI = "tlsweep.model_uri"  # the trial's logged pyfunc model
ERROR = "error"  # why a trial failed (its traceback is ERROR_FILE)
PRUNED = "tlsweep.pruned"  # the epoch (from 1) after which a trial behind the earlier ones stopped; run FINISHED
COST_OF = "tlsweep.cost_of"  # what SIZE_MB and LATENCY_MS measured: COST_SAVEDMODEL or COST_KERAS
COST_SAVEDMODEL, COST_KERAS = "savedmodel", "keras"
# on an ENSEMBLE run: its member trials' run ids, each as often as it was picked ("<run id>,<run id>,...")
ENSEMBLE_MEMBERS = "tlsweep.ensemble_members"
REFIT_OF = "tlsweep.refit_of"  # on a REFIT run: the trial run whose configuration it trained again
EXPORT_OF = "tlsweep.export_of"  # on an EXPORT run: the run (trial, ensemble or refit) whose model it exported
TAGS = (KIND, SWEEP_KEY, TRIAL_ID, WORKER, PROCESS, TUNER, STAGE, HEARTBEAT, CLOSED_BY, BEST_RUN_ID, RESUMED, MODEL_URI,
        ERROR, PRUNED, COST_OF, ENSEMBLE_MEMBERS, REFIT_OF, EXPORT_OF)

# -- params --------------------------------------------------------------------------------------
HYPERPARAMETERS = tuple(DEFAULTS)  # each under its own name
SEED = "seed"
SPLIT = "split"
RESOLVED_IMAGE_SIZE = "resolved_image_size"  # image_size 0 resolved to the backbone's native size
FEATURE_CACHE = "feature_cache"  # whether the head trained on cached frozen-backbone features
RUN_CONFIG = "run_config"  # the trial's RunConfig as JSON: best-export rebuilds the model from it
LINEAGE_PARAMS = ("data_name", "data_source", "split_spec", "class_names", "num_classes", "train_size",
                  "validation_size", "test_size", "skipped_files", "data_fingerprint")  # DataSplits.lineage()
DEVICE = "device"  # what the trial computed on: "GPU:0 <name> (CUDA_VISIBLE_DEVICES=1)", "CPU (...)"
PRECISION = "precision"  # the Keras dtype policy it used: mixed_precision resolved on that device
TRAINED_ON = "trained_on"  # on a REFIT run: the splits its model learned from ("train+validation") and how many images
TRIAL_PARAMS = (*HYPERPARAMETERS, SEED, SPLIT, RESOLVED_IMAGE_SIZE, FEATURE_CACHE, RUN_CONFIG, *LINEAGE_PARAMS,
                DEVICE, PRECISION)
# Where a trial's values go: as MLflow params only the hyperparameters its sweep searched (what MLflow's compare page
# lines up, see docs/mlflow.md); every other value of TRIAL_PARAMS (fixed hyperparameters, seed, split, the lineage
# with class_names, run_config, device, ...) and Keras Tuner's own "tuner/..." values as a tag PARAM_TAG + name.
# ``place`` splits them, ``trial_params`` reads them back as one mapping.
PARAM_TAG = "tlsweep.param."
# the parent's: the sweep settings
SWEEP_PARAMS = ("dataset", "sweep", "tuner", "max_trials", "objective", "seed", "split", "log_models", "trial_process",
                "mixed_precision", "xla", "prune", "ensemble")

# -- metrics -------------------------------------------------------------------------------------
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")  # per epoch, both phases on one step axis
LOSS, ACCURACY, VAL_LOSS, VAL_ACCURACY = EPOCH_METRICS
OBJECTIVE = VAL_ACCURACY
TEST_ACCURACY = "test_accuracy"
TEST_LOSS = "test_loss"
HEAD_TEST_ACCURACY = "head_test_accuracy"  # before fine-tuning (measured, never used to choose)
TRAINABLE_PARAMS = "trainable_params"
TRAIN_SECONDS = "train_seconds"  # data, features, training and evaluation
WALL_SECONDS = "wall_seconds"  # the whole trial as the sweep waits for it
HEAD_SECONDS = "head_seconds"
FINE_TUNE_SECONDS = "fine_tune_seconds"
FEATURE_SECONDS = "feature_seconds"
RSS_MB = "rss_mb"  # the trial process's resident memory at its end
BEST_VAL_ACCURACY = "best_val_accuracy"  # on the parent
TFLITE_METRICS = ("tflite_size_bytes", "tflite_agreement", "tflite_test_accuracy", "tflite_max_abs_diff",
                  "tflite_latency_ms")
SIZE_MB = "size_mb"  # the model's size (the SavedModel export, or its weights: see COST_OF)
TOTAL_PARAMS = "total_params"  # parameters of the whole classifier (backbone and head)
LATENCY_MS = "latency_ms"  # CPU, batch 1, median of repeated calls after warm-up (see COST_OF)
COST_METRICS = (SIZE_MB, TOTAL_PARAMS, LATENCY_MS)
# 95 % Wilson intervals of the final val/test accuracy, from validation_size/test_size (pipeline.stats)
VAL_ACCURACY_LOW, VAL_ACCURACY_HIGH = "val_accuracy_low", "val_accuracy_high"
TEST_ACCURACY_LOW, TEST_ACCURACY_HIGH = "test_accuracy_low", "test_accuracy_high"
INTERVAL_METRICS = (VAL_ACCURACY_LOW, VAL_ACCURACY_HIGH, TEST_ACCURACY_LOW, TEST_ACCURACY_HIGH)
# k-fold cross-validation of a head on cached features over train+validation (cv_folds > 0; pipeline.crossval)
CV_ACCURACY, CV_ACCURACY_STD, CV_SECONDS = "cv_accuracy", "cv_accuracy_std", "cv_seconds"
CV_METRICS = (CV_ACCURACY, CV_ACCURACY_STD, CV_SECONDS)
TRIAL_METRICS = (*EPOCH_METRICS, TEST_ACCURACY, TEST_LOSS, HEAD_TEST_ACCURACY, TRAINABLE_PARAMS, TRAIN_SECONDS,
                 WALL_SECONDS, HEAD_SECONDS, FINE_TUNE_SECONDS, FEATURE_SECONDS, RSS_MB, *COST_METRICS,
                 *INTERVAL_METRICS, *CV_METRICS)
# a trial's run logs these first: MLflow lists a run's metrics in the order they were first logged, and its compare
# page charts the first one by default (beside the searched hyperparameters)
FIRST_METRICS = (VAL_ACCURACY, TEST_ACCURACY)
EVAL_SECONDS = "eval_seconds"  # in evaluation steps: test predictions (and the test score before fine-tuning)
TRACE_SECONDS = "trace_seconds"  # of head_seconds + fine_tune_seconds: first steps beyond typical ones (tracing)
EVAL_TRACE_SECONDS = "eval_trace_seconds"  # the same, of eval_seconds
STEP_SECONDS = "step_seconds"  # in the training, validation and prediction steps themselves (first ones included)
FINE_TUNE_START = "fine_tune_start_epoch"  # the first fine-tuning epoch on the two-phase axis (pruning aligns on it)

# -- artifacts -----------------------------------------------------------------------------------
PLOTS_DIR = "plots"
LEARNING_CURVES = "learning_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
PREDICTIONS = "predictions.png"
TRIAL_PLOTS = (LEARNING_CURVES, CONFUSION_MATRIX, PREDICTIONS)  # under PLOTS_DIR
BY_BACKBONE = "val_accuracy_by_backbone.png"
PARALLEL_COORDINATES = "parallel_coordinates.png"
PARETO_LATENCY = "pareto_latency.png"  # val_accuracy against latency_ms, Pareto front drawn
PARETO_SIZE = "pareto_size.png"  # val_accuracy against size_mb
SWEEP_PLOTS = (BY_BACKBONE, PARALLEL_COORDINATES, PARETO_LATENCY, PARETO_SIZE)  # the parent's, under PLOTS_DIR
ERROR_FILE = "error.txt"
SAVEDMODEL_DIR = "savedmodel"  # the export's folder; a run's artifact only if logged before MODEL_EXPORT held it
MODEL_DIR = "model"  # the pyfunc model
CHECKPOINT_DIR = "checkpoint"  # the trial's checkpoint (head.keras, weights.npz or model.keras: pipeline.recipe)
TFLITE_DIR = "tflite_{mode}"
SEARCH_SPACE = "search_space.json"  # the parent's
DOCTOR = "doctor.json"  # the parent's: `tlsweep doctor`'s checks on the machine that started the sweep (sweeps.doctor)
SWEEP_FILE_DIR = "sweep"  # the parent's copy of the sweep YAML
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MD = "leaderboard.md"
MODEL_EXPORT = "export"  # the pyfunc model's artifact holding the trial's SavedModel export (its only copy)
# beside a logged model or checkpoint: the final model's class probabilities on the validation and test splits
# (arrays val_labels, val_probs, test_labels, test_probs), from which the sweep chooses its ensemble
PROBABILITIES_DIR, PROBABILITIES = "probabilities", "probabilities.npz"
ARTIFACTS = (PLOTS_DIR, *TRIAL_PLOTS, *SWEEP_PLOTS, ERROR_FILE, SAVEDMODEL_DIR, MODEL_DIR, CHECKPOINT_DIR,
             SEARCH_SPACE, DOCTOR, SWEEP_FILE_DIR, LEADERBOARD_CSV, LEADERBOARD_MD, MODEL_EXPORT, PROBABILITIES_DIR,
             PROBABILITIES)

# -- inputs (MLflow 3 datasets, one per split; tracking/datasets.py) -----------------------------
DATASET_CONTEXT = "mlflow.data.context"  # MLflow's own input tag naming a dataset's role
DATASET_CONTEXTS = ("training", "validation", "test")  # its values, for the train, validation and test splits


def place(values: dict[str, Any], searched: Collection[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` as (the run's params: the ``searched`` ones, its tags: the others under ``PARAM_TAG``)."""
    return ({k: v for k, v in values.items() if k in searched},
            {PARAM_TAG + k: v for k, v in values.items() if k not in searched})


def trial_params(params: Mapping[str, str], tags: Mapping[str, str]) -> dict[str, str]:
    """A run's values as one mapping: its params and the values ``place`` put in its tags."""
    return {**{k[len(PARAM_TAG):]: v for k, v in tags.items() if k.startswith(PARAM_TAG)}, **params}


@dataclasses.dataclass
class Record:
    """What one finished trial's run holds. ``files``: artifact path -> file relative to the record folder;
    ``model``: a folder there with ``export/`` (a SavedModel), ``sample.npz`` and ``probs.npy``, logged as the
    run's pyfunc model."""

    params: dict[str, Any]
    metrics: list[tuple[str, float, int]]
    tags: dict[str, str]
    files: dict[str, str]
    model: str | None = None
