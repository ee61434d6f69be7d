"""One trial: build, train, evaluate and journal it, in the sweep's process or in a fresh one.

TensorFlow keeps part of every model built in a process (keras-tuner #395, #873; here ~60 MB per
fine-tuned EfficientNet-Lite0, and ``clear_session`` does not give it back). A trial that builds the
whole network can therefore run in its own process (``python -m sweeps.trial``), which returns all
of it when it exits. ``TrialSpec`` is everything a trial needs, as JSON; the trial writes its
journal entry (``tracking.journal.write_entry``) and the sweep's process sends it to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

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
from pipeline.tfstart import STARTUP_NOISE
from pipeline.training import TrainResult, predictions, train
from sweeps.config import SweepConfig
from tracking.entry import write_entry

CHECKPOINT = "model.keras"
HEAD_CHECKPOINT = "head.keras"
GRID_SIZE = 16  # test images in each trial's prediction grid
REQUEST, ANSWER = "request.json", "answer.json"  # a fresh process's input and output, in the trial's folder


@dataclasses.dataclass
class TrialSpec:
    """Everything one trial needs; JSON, so that a fresh process can run it."""

    config: SweepConfig
    dataset: str
    split: str | None
    feature_cache: bool
    verbose: int | str
    trial_dir: str  # Keras Tuner's folder of the trial: checkpoints, a fresh process's request/answer
    values: dict[str, Any]  # the hyperparameters, defaults filled in
    tuner_values: dict[str, Any]  # Keras Tuner's own (tuner/epochs, tuner/trial_id, ...)
    export_metadata: dict[str, Any]  # written into an export next to the hyperparameters
    run_spec: dict[str, Any]  # the MLflow run to create if the trial is journaled before it exists
    params: dict[str, Any]
    journal: str  # the journal folder
    run_id: str | None = None
    previous: str | None = None  # Hyperband promotion: the earlier trial's checkpoint, continued
    start_from: str | None = None  # stage 2: the stage-1 checkpoint whose trained head it starts from
    best: float | None = None  # the best objective before this trial (log_models: improving)
    checkpoint: bool = False  # keep the trained model in trial_dir (Hyperband, stage 1, log_models: best)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrialSpec":
        raw = json.loads(text)
        return cls(**{**raw, "config": SweepConfig(**raw["config"])})


@dataclasses.dataclass
class TrialOutput:
    val_accuracy: float
    entry: str  # the journal entry to write to MLflow
    head_only: bool  # trained a head on cached features (no network built, nothing to free)
    export_seconds: float
    journal_seconds: float  # writing the journal entry (tracking time on the trial's path)


@dataclasses.dataclass
class Outcome:
    result: TrainResult
    model: keras.Model  # the full classifier, or the head alone when it trained on cached features
    data: DataSplits
    image_size: int
    trained_at: float  # perf_counter() when training and evaluation ended


def run(spec: TrialSpec, data_cache: dict[int, DataSplits], run_id: Callable[[], str] | None = None) -> TrialOutput:
    """Train the trial and journal it. Failures raise Keras Tuner's errors: ``FailedTrialError`` (the
    sweep goes on) or ``FatalError`` (the data set is unusable: the sweep stops)."""
    start = time.perf_counter()
    with trial_errors():
        outcome = _train(spec, data_cache)
    return _finish(spec, outcome, start, run_id or (lambda: spec.run_id))


@contextlib.contextmanager
def trial_errors() -> Iterator[None]:
    """Turn a trial's failures into Keras Tuner's errors: ``FailedTrialError`` (the sweep goes on) or
    ``FatalError`` (the data set is unusable: the sweep stops)."""
    try:
        yield
    except DataError as e:  # no trial can run on this data
        raise kt.errors.FatalError(str(e)) from e
    except (UserError, ValueError) as e:
        raise kt.errors.FailedTrialError(f"impossible configuration: {e}") from e
    except tf.errors.ResourceExhaustedError as e:
        raise kt.errors.FailedTrialError(f"out of memory: {e.message[:500]}") from e


def data_for(spec: TrialSpec, image_size: int, data_cache: dict[int, DataSplits]) -> DataSplits:
    """The data set at one image size, decoded once per process."""
    if image_size not in data_cache:
        data_cache[image_size] = load_data(spec.dataset, image_size, seed=spec.config.seed, split=spec.split)
    return data_cache[image_size]


def trains_network(spec: TrialSpec, data_cache: dict[int, DataSplits]) -> bool:
    """Whether the trial runs the whole network: it fine-tunes, augments, continues a full model, or its frozen
    features are not cached yet. Otherwise it trains a head of a few KB on cached features (and exporting
    it builds the network once: ~6 MB kept per trial, measured, against ~60 MB for fine-tuning)."""
    values = spec.values
    if spec.start_from or values["augment"] or not spec.feature_cache:
        return True
    if values["fine_tune"] and int(values["fine_tune_epochs"] or 0) > 0:
        return True
    if spec.previous:
        return not spec.previous.endswith(HEAD_CHECKPOINT)
    backbone = get_spec(values["backbone"])
    data = data_for(spec, int(values["image_size"]) or backbone.native_size, data_cache)
    key = features.key_for(backbone, values["weights"], data.image_size, data, spec.config.mixed_precision)
    return key is None or not (features.cache_root() / f"{key}.npz").exists()


# -- a fresh process -------------------------------------------------------------------------------


def run_fresh(spec: TrialSpec) -> TrialOutput:
    """Run the trial in a new process and wait for it; its memory is all returned when it exits."""
    folder = Path(spec.trial_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REQUEST).write_text(spec.to_json())
    answer = folder / ANSWER
    answer.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.trial", str(folder), str(os.getpid())], env=env,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    relay = threading.Thread(target=_relay_stderr, args=(proc.stderr,), daemon=True)
    relay.start()
    try:
        code = proc.wait()
        relay.join(10)
    finally:
        if proc.poll() is None:  # the sweep was interrupted: the trial goes with it
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    reply = json.loads(answer.read_text()) if answer.exists() else {}
    if "output" in reply:
        return TrialOutput(**reply["output"])
    if "error" in reply:
        kind, message = reply["error"]["kind"], reply["error"]["message"]
        if kind == "fatal":  # the data set is unusable (the only fatal error a trial raises)
            raise kt.errors.FatalError(message) from DataError(message)
        if kind == "failed":
            raise kt.errors.FailedTrialError(message)
        raise RuntimeError(f"{message}\n(in the trial's process)\n{reply['error']['traceback']}")
    if code < 0:
        name = signal.Signals(-code).name
        hint = "; the kernel kills a process this way when memory runs out" if -code == signal.SIGKILL else ""
        raise kt.errors.FailedTrialError(f"the trial's process was killed by {name}{hint}")
    raise kt.errors.FailedTrialError(f"the trial's process exited with code {code} and no result")


# What TensorFlow prints whenever a process starts it on a machine without a GPU.
_STARTUP_NOISE = STARTUP_NOISE


def _relay_stderr(stream: Any) -> None:
    for line in stream:
        if not _STARTUP_NOISE.match(line):
            sys.stderr.write(line)
            sys.stderr.flush()


def main(argv: list[str]) -> int:
    """``python -m sweeps.trial <trial folder> <sweep pid>``: run ``request.json``, write ``answer.json``."""
    folder, parent = Path(argv[0]), int(argv[1])
    _exit_with(parent)
    spec = TrialSpec.from_json((folder / REQUEST).read_text())
    try:
        reply: dict[str, Any] = {"output": dataclasses.asdict(run(spec, {}))}
        code = 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every error goes back to the sweep, which records it
        kind = "fatal" if isinstance(e, kt.errors.FatalError) else "failed" if isinstance(
            e, kt.errors.FailedTrialError) else "error"
        message = str(e) if kind != "error" else f"{type(e).__name__}: {e}"
        reply, code = {"error": {"kind": kind, "message": message, "traceback": traceback.format_exc()}}, 1
    tmp = folder / f".{ANSWER}"
    tmp.write_text(json.dumps(reply))
    os.replace(tmp, folder / ANSWER)
    return code


def _exit_with(parent: int) -> None:
    """End this process if the sweep's process dies (``kill -9``): no orphan keeps training."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(137)

    threading.Thread(target=watch, daemon=True, name="tlsweep-parent-watch").start()


# -- training and journaling -----------------------------------------------------------------------


def _train(spec: TrialSpec, data_cache: dict[int, DataSplits]) -> Outcome:
    values, tuner_values, config = spec.values, spec.tuner_values, spec.config
    backbone = get_spec(values["backbone"])
    image_size = int(values["image_size"]) or backbone.native_size
    unfreeze_from = resolve_fine_tune_at(values["fine_tune_at"], backbone) if values["fine_tune"] else None
    fine_tune_epochs = int(values["fine_tune_epochs"] or 0)
    data = data_for(spec, image_size, data_cache)
    keras.utils.set_random_seed(config.seed)
    key = None
    if spec.feature_cache and not values["augment"]:  # augmentation runs before the backbone: no cache
        key = features.key_for(backbone, values["weights"], image_size, data, config.mixed_precision)
    cached, feature_seconds = (features.load(key) if key else None), 0.0
    initial_epoch = int(tuner_values.get("tuner/initial_epoch", 0))
    if spec.previous:  # Hyperband promotion: continue the earlier trial's model where it stopped
        model = load_keras_model(spec.previous)
    elif spec.start_from:  # staged search, stage 2: fine-tune the stage-1 trial's trained head
        model = full_model(spec, data, image_size, load_keras_model(spec.start_from))
        initial_epoch = int(values["epochs"])
    elif cached is not None and (unfreeze_from is None or fine_tune_epochs == 0):
        # Head only, on cached features: the full model is built only if it is exported.
        model = build_head(cached["train"][0].shape[1], data.num_classes, float(values["dropout"]),
                           seed=config.seed, mixed_precision=config.mixed_precision)
    else:
        model = full_model(spec, data, image_size)
    if key and cached is None and not is_head(model):
        cached, feature_seconds = features.load_or_compute(model, data, key)
    result = train(
        model, data, features=cached, epochs=int(values["epochs"]), fine_tune_epochs=fine_tune_epochs,
        unfreeze_from=unfreeze_from, learning_rate=float(values["learning_rate"]),
        fine_tune_learning_rate=float(values["fine_tune_learning_rate"] or DEFAULTS["fine_tune_learning_rate"]),
        batch_size=int(values["batch_size"]), seed=config.seed, verbose=spec.verbose,
        initial_epoch=initial_epoch, stop_epoch=tuner_values.get("tuner/epochs"), jit_compile=config.xla,
    )
    if any(math.isnan(v) or math.isinf(v) for v in result.history["loss"]):
        raise kt.errors.FailedTrialError("loss became NaN/inf; lower the learning rate")
    if spec.checkpoint:
        model.save(Path(spec.trial_dir) / (HEAD_CHECKPOINT if is_head(model) else CHECKPOINT))
    result.feature_seconds = feature_seconds
    return Outcome(result, model, data, image_size, time.perf_counter())


def full_model(spec: TrialSpec, data: DataSplits, image_size: int, head: keras.Model | None = None) -> keras.Model:
    """The trial's full classifier (taking a trained head's weights); a full model is returned as is."""
    if head is not None and not is_head(head):
        return head
    values = spec.values
    return build_model(
        values["backbone"], data.num_classes, image_size, dropout=float(values["dropout"]),
        augment=bool(values["augment"]), weights=values["weights"], seed=spec.config.seed,
        mixed_precision=spec.config.mixed_precision, head=head,
    )


def _finish(spec: TrialSpec, outcome: Outcome, start: float, run_id: Callable[[], str | None]) -> TrialOutput:
    """Journal the finished trial: metrics, plot data, and its model if it is logged."""
    result, model, data = outcome.result, outcome.model, outcome.data
    params = {**spec.params, **data.lineage(), "resolved_image_size": outcome.image_size,
              "feature_cache": result.used_feature_cache}
    metrics = [(k, v, result.first_epoch + i) for k, vs in result.history.items() for i, v in enumerate(vs)]
    metrics += [(k, v, 0) for k, v in {
        "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
        "head_test_accuracy": result.head_test_accuracy, "trainable_params": result.trainable_params,
        "head_seconds": result.head_seconds, "fine_tune_seconds": result.fine_tune_seconds,
        "feature_seconds": result.feature_seconds, "rss_mb": resident_mb()}.items()]
    split = "test" if data.sizes["test"] else "validation"
    if split == "test" and result.test_predictions is not None:
        labels, probs = result.test_predictions
    else:
        labels, probs = predictions(model, data, split, features=result.features)
    matrix = np.zeros((data.num_classes, data.num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
    grid = next(iter(data.batches(split, GRID_SIZE)))[0].numpy()  # batches are unshuffled: same order
    plot_data = {"history": result.history, "fine_tune_start": result.fine_tune_start,
                 "first_epoch": result.first_epoch, "confusion": matrix, "class_names": data.class_names,
                 "grid_images": grid, "grid_labels": labels[: len(grid)],
                 "grid_predicted": probs[: len(grid)].argmax(axis=1)}
    log_models = spec.config.log_models
    improving = spec.best is None or result.val_accuracy > spec.best
    files, exported, export_seconds = {}, None, 0.0
    staging = Path(tempfile.mkdtemp(prefix="trial-", dir=Path(spec.journal).parent))
    if log_models == "all" or (log_models == "improving" and improving):
        exporting = time.perf_counter()
        full = full_model(spec, data, outcome.image_size, model)
        export = export_model(full, staging / "savedmodel", data.class_names, metadata={
            "run_id": run_id(), **spec.export_metadata, **spec.values, **data.lineage()})
        sample = grid[:2]
        exported = (export, sample, full.predict(sample, verbose=0))
        export_seconds = time.perf_counter() - exporting
    elif log_models == "best":  # best-export builds the SavedModel from this checkpoint
        name = HEAD_CHECKPOINT if is_head(model) else CHECKPOINT
        shutil.copy(Path(spec.trial_dir) / name, staging / name)
        files[f"checkpoint/{name}"] = staging / name
    # train: data, features and training; wall: the whole trial as the sweep waits for it
    metrics += [("train_seconds", outcome.trained_at - start, 0), ("wall_seconds", time.perf_counter() - start, 0)]
    journaling = time.perf_counter()
    entry = write_entry(spec.journal, spec.run_id, spec.run_spec, params, metrics, plot_data, files, exported)
    shutil.rmtree(staging, ignore_errors=True)
    return TrialOutput(result.val_accuracy, str(entry), is_head(model), export_seconds,
                       time.perf_counter() - journaling)


def resident_mb() -> float:
    """This process's resident memory in MB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
