"""One trial's process protocol and journaling: run it here or in a fresh process, journal what it gave.

What a trial trains is ``pipeline.recipe`` (the same recipe as ``make train``); this module decides
nothing about training. TensorFlow keeps part of every model built in a process (keras-tuner #395,
#873; here ~60 MB per fine-tuned EfficientNet-Lite0, and ``clear_session`` does not give it back), so
a trial that builds the whole network can run in its own process (``python -m sweeps.trial``), which
returns all of it when it exits. ``TrialSpec`` is everything a trial needs, as JSON; the trial writes
its journal entry (``tracking.entry.write_entry``) and the sweep's process sends it to MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import re
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

from pipeline import cost, precision, prebuilt, recipe
from pipeline.data import DataSplits
from pipeline.errors import DataError, UserError
from pipeline.hparams import RunConfig
from pipeline.model import is_head
from pipeline.pruning import PruneCallback
from pipeline.tfstart import STARTUP_NOISE
from pipeline.training import predictions
from tracking import layout
from tracking.entry import write_entry
from tracking.intervals import interval_metrics

GPU_FAILURE = re.compile(r"CUDA|cuDNN|CUDNN|cuBLAS|CUBLAS|GPU|NCCL|ECC|device ordinal")  # in TensorFlow's errors
GRID_SIZE = 16  # test images in each trial's prediction grid
REQUEST, ANSWER = "request.json", "answer.json"  # a fresh process's input and output, in the trial's folder


@dataclasses.dataclass
class TrialSpec:
    """Everything one trial needs; JSON, so that a fresh process can run it."""

    run: RunConfig  # what to train
    dataset: str
    split: str | None
    log_models: str  # which trials log a SavedModel (sweeps.config.LOG_MODELS)
    verbose: int | str
    trial_dir: str  # Keras Tuner's folder of the trial: checkpoints, a fresh process's request/answer
    export_metadata: dict[str, Any]  # written into an export next to the hyperparameters
    run_spec: dict[str, Any]  # the MLflow run to create if the trial is journaled before it exists
    params: dict[str, Any]
    journal: str  # the journal folder
    run_id: str | None = None
    initial_epoch: int = 0  # Hyperband: the slice of the two-phase epoch axis this trial trains
    stop_epoch: int | None = None
    previous: str | None = None  # Hyperband promotion: the earlier trial's checkpoint, continued
    start_from: str | None = None  # stage 2: the stage-1 checkpoint whose trained head it starts from
    best: float | None = None  # the best objective before this trial (log_models: improving)
    checkpoint: bool = False  # keep the trained model as .keras in trial_dir, for a later trial (Hyperband, stage 1)
    prune: dict[int, float] | None = None  # pruning thresholds by epoch (pipeline.pruning; None: never stop early)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrialSpec":
        raw = json.loads(text)
        return cls(**{**raw, "run": RunConfig(**raw["run"])})

    def plan(self) -> recipe.Plan:
        return recipe.plan(self.run)


@dataclasses.dataclass
class TrialOutput:
    val_accuracy: float
    entry: str  # the journal entry to write to MLflow
    head_only: bool  # trained a head on cached features (no network built, nothing to free)
    export_seconds: float
    journal_seconds: float  # writing the journal entry (tracking time on the trial's path)
    curve: list[float] = dataclasses.field(default_factory=list)  # val_accuracy per epoch (from first_epoch)
    first_epoch: int = 0
    pruned_at: int | None = None  # the epoch at which the trial stopped, behind the earlier trials
    export_pending: bool = False  # its model is to be exported and logged off the training path (sweeps.exports)
    fine_tune_start: int | None = None  # the first fine-tuning epoch of the axis (None: it did not fine-tune)


def run(spec: TrialSpec, data_cache: dict[int, DataSplits], run_id: Callable[[], str] | None = None) -> TrialOutput:
    """Train the trial (``pipeline.recipe``) and journal it. Failures raise Keras Tuner's errors:
    ``FailedTrialError`` (the sweep goes on) or ``FatalError`` (the data set is unusable: the sweep stops)."""
    start = time.perf_counter()
    pruner = PruneCallback(spec.prune) if spec.prune else None
    with trial_errors():
        plan = spec.plan()
        data = recipe.load_data_for(plan, spec.dataset, spec.split, data_cache)
        outcome = recipe.train_run(
            plan, data, verbose=spec.verbose, previous=spec.previous, start_from=spec.start_from,
            initial_epoch=spec.initial_epoch, stop_epoch=spec.stop_epoch,
            checkpoint_dir=spec.trial_dir if spec.checkpoint else None, callbacks=[pruner] if pruner else ())
    return _finish(spec, outcome, start, run_id or (lambda: spec.run_id), pruner.pruned_at if pruner else None)


@contextlib.contextmanager
def trial_errors() -> Iterator[None]:
    """Turn the user's mistakes into Keras Tuner's errors: ``FailedTrialError`` (the sweep goes on) or
    ``FatalError`` (the data set is unusable: the sweep stops). Any other exception is a bug and passes
    through with its traceback (the tuner records it as one)."""
    try:
        yield
    except DataError as e:  # no trial can run on this data
        raise kt.errors.FatalError(str(e)) from e
    except recipe.Diverged as e:
        raise kt.errors.FailedTrialError(str(e)) from e
    except UserError as e:
        raise kt.errors.FailedTrialError(f"impossible configuration: {e}") from e
    except tf.errors.ResourceExhaustedError as e:
        raise kt.errors.FailedTrialError(f"out of memory: {e.message[:500]}") from e
    except (tf.errors.InternalError, tf.errors.UnknownError, tf.errors.UnavailableError) as e:
        if not GPU_FAILURE.search(e.message or ""):
            raise
        # A GPU that fails (Xid, ECC, illegal address, lost device) fails this trial, not the sweep or the worker.
        first = (e.message or "").strip().splitlines()[0][:300]
        raise kt.errors.FailedTrialError(f"the GPU failed ({precision.this_device()}): {first}") from e


def trains_network(spec: TrialSpec, data_cache: dict[int, DataSplits]) -> bool:
    """Whether the trial runs the whole network (``pipeline.recipe.trains_network``): such trials run in
    a fresh process under ``trial_process: auto``."""
    plan = spec.plan()
    return recipe.trains_network(plan, lambda: recipe.load_data_for(plan, spec.dataset, spec.split, data_cache),
                                 previous=spec.previous, start_from=spec.start_from)


# -- a fresh process -------------------------------------------------------------------------------


def run_fresh(spec: TrialSpec) -> TrialOutput:
    """Run the trial in a new process and wait for it; its memory is all returned when it exits."""
    folder = Path(spec.trial_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REQUEST).write_text(spec.to_json())
    answer = folder / ANSWER
    answer.unlink(missing_ok=True)
    proc, relay = _take_spare()
    proc.stdin.write(f"{folder}\n")  # the spare reads its request from there
    proc.stdin.close()
    if os.environ.get("TLSWEEP_SPARE", "1") != "0":
        _start_spare(hint=folder)  # the next trial's process gets ready while this one trains
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


# -- a warm spare process --------------------------------------------------------------------------

_spare: tuple[subprocess.Popen, threading.Thread] | None = None


def _start_spare(hint: Path | None = None) -> None:
    """Start the next trial's process now: it imports TensorFlow, gets ready for a trial like ``hint`` (a trial
    folder: ``_prepare``) and waits on stdin for its trial folder."""
    global _spare
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    args = ["--spare", str(os.getpid()), *([str(hint)] if hint is not None else [])]
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.trial", *args], env=env,
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    relay = threading.Thread(target=_relay_stderr, args=(proc.stderr,), daemon=True)
    relay.start()
    _spare = (proc, relay)


def _take_spare() -> tuple[subprocess.Popen, threading.Thread]:
    """The waiting spare process if it is still alive, else a new one."""
    global _spare
    if _spare is None or _spare[0].poll() is not None:
        _start_spare()
    taken, _spare = _spare, None
    return taken


def close_spare() -> None:
    """End the waiting spare; called when a sweep ends and at exit."""
    global _spare
    if _spare is not None:
        proc, relay = _spare
        _spare = None
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        proc.terminate()  # it may still be importing TensorFlow; it holds no work
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        relay.join(5)


atexit.register(close_spare)


# What TensorFlow prints whenever a process starts it on a machine without a GPU.
_STARTUP_NOISE = STARTUP_NOISE


def _relay_stderr(stream: Any) -> None:
    for line in stream:
        if not _STARTUP_NOISE.match(line):
            sys.stderr.write(line)
            sys.stderr.flush()


def main(argv: list[str]) -> int:
    """``python -m sweeps.trial <trial folder> <sweep pid>``: run ``request.json``, write ``answer.json``."""
    ready: tuple[TrialSpec, dict[int, DataSplits]] | None = None
    if argv[0] == "--spare":  # started ahead of its trial: TensorFlow is imported, wait for the folder
        parent = int(argv[1])
        _exit_with(parent)
        if len(argv) > 2:
            ready = _prepare(Path(argv[2]))
        line = sys.stdin.readline().strip()
        if not line:  # the sweep ended without needing it
            return 0
        folder = Path(line)
    else:
        folder, parent = Path(argv[0]), int(argv[1])
        _exit_with(parent)
    spec = TrialSpec.from_json((folder / REQUEST).read_text())
    data_cache = ready[1] if ready is not None and _same_data(ready[0], spec) else {}
    try:
        reply: dict[str, Any] = {"output": dataclasses.asdict(run(spec, data_cache))}
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


def _prepare(hint: Path) -> tuple[TrialSpec, dict[int, DataSplits]] | None:
    """What a spare does before its trial is known, for a trial like the one in folder ``hint`` (the trial the
    sweep was starting; the next one most often has the same backbone and data): map the data set's decoded
    images and build the backbone with its pretrained weights (``pipeline.prebuilt``) when such a trial builds
    the network. Only a guess: a trial that differs ignores it; a failure here is left to the trial itself."""
    try:
        spec = TrialSpec.from_json((hint / REQUEST).read_text())
        plan, cache = spec.plan(), {}
        # the memory-mapped images, as run() loads them; never decoded here beside the trial that decodes them
        recipe.load_data_for(plan, spec.dataset, spec.split, cache, decode=False)
        if trains_network(spec, cache):
            prebuilt.prebuild(plan)
        return spec, cache
    except Exception:  # noqa: BLE001 - a guess that failed costs nothing; the trial reports its own errors
        return None


def _same_data(hint: TrialSpec, spec: TrialSpec) -> bool:
    """Whether data loaded for ``hint`` is ``spec``'s (``recipe.load_data_for`` keys its cache by image size)."""
    return (hint.dataset, hint.split, hint.run.seed) == (spec.dataset, spec.split, spec.run.seed)


def _exit_with(parent: int) -> None:
    """End this process if the sweep's process dies (``kill -9``): no orphan keeps training."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(137)

    threading.Thread(target=watch, daemon=True, name="tlsweep-parent-watch").start()


# -- journaling ------------------------------------------------------------------------------------


def _finish(spec: TrialSpec, outcome: recipe.Outcome, start: float, run_id: Callable[[], str | None],
            pruned_at: int | None = None) -> TrialOutput:
    """Journal the finished trial: metrics, plot data, and its model or checkpoint as ``log_models`` says."""
    result, model, data, plan = outcome.result, outcome.model, outcome.data, outcome.plan
    params = {**spec.params, **data.lineage(), layout.RESOLVED_IMAGE_SIZE: plan.image_size,
              layout.FEATURE_CACHE: result.used_feature_cache, layout.RUN_CONFIG: spec.run.to_json(),
              layout.DEVICE: precision.this_device(), layout.PRECISION: plan.precision}
    metrics = [(k, v, result.first_epoch + i) for k, vs in result.history.items() for i, v in enumerate(vs)]
    metrics += [(k, v, 0) for k, v in {
        layout.TEST_ACCURACY: result.test_accuracy, layout.TEST_LOSS: result.test_loss,
        layout.HEAD_TEST_ACCURACY: result.head_test_accuracy, layout.TRAINABLE_PARAMS: result.trainable_params,
        layout.HEAD_SECONDS: result.head_seconds, layout.FINE_TUNE_SECONDS: result.fine_tune_seconds,
        layout.FEATURE_SECONDS: result.feature_seconds, layout.RSS_MB: resident_mb(),
        layout.EVAL_SECONDS: result.eval_seconds, layout.TRACE_SECONDS: result.trace_seconds,
        layout.EVAL_TRACE_SECONDS: result.eval_trace_seconds, layout.STEP_SECONDS: result.step_seconds,
        **({layout.FINE_TUNE_START: result.fine_tune_start} if result.fine_tune_start is not None else {}),
        **interval_metrics(result.val_accuracy, data.sizes["validation"], result.test_accuracy, data.sizes["test"]),
        **({layout.CV_ACCURACY: outcome.cv.mean, layout.CV_ACCURACY_STD: outcome.cv.std,
            layout.CV_SECONDS: outcome.cv.seconds} if outcome.cv else {}),
    }.items()]
    split = "test" if data.sizes["test"] else "validation"
    if split == "test" and result.test_predictions is not None:
        labels, probs = result.test_predictions
    else:
        labels, probs = predictions(model, data, split, features=result.features)
    matrix = np.zeros((data.num_classes, data.num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
    grid = data.first(split, GRID_SIZE)[0]  # the order of the unshuffled batches the predictions came from
    plot_data = {"history": result.history, "fine_tune_start": result.fine_tune_start,
                 "first_epoch": result.first_epoch, "confusion": matrix, "class_names": data.class_names,
                 "grid_images": grid, "grid_labels": labels[: len(grid)],
                 "grid_predicted": probs[: len(grid)].argmax(axis=1)}
    # ties count: every trial that reaches the best score has its model, so the winner has one whichever of them wins
    improving = spec.best is None or result.val_accuracy >= spec.best
    # A model to log (all; improving and this trial improved) is exported off the training path
    # (sweeps.exports, after the trial's run is written): the trial keeps only its checkpoint, as with best.
    export_pending = spec.log_models == "all" or (spec.log_models == "improving" and improving)
    files, exported, export_seconds = {}, None, 0.0
    staging = Path(tempfile.mkdtemp(prefix="trial-", dir=Path(spec.journal).parent))
    cost_ = model_cost(plan, model, data.num_classes, Path(spec.journal).parent)  # an export replaces it
    if spec.log_models == "best" or export_pending:  # best-export (or the exporter) builds it from this checkpoint
        kept = recipe.keep_checkpoint(model, spec.trial_dir, kept_by_run=spec.checkpoint)
        shutil.copy(kept, staging / kept.name)
        files[f"{layout.CHECKPOINT_DIR}/{kept.name}"] = staging / kept.name
        if result.val_predictions is not None and result.test_predictions is not None:  # an ensemble candidate
            np.savez(staging / layout.PROBABILITIES, val_labels=result.val_predictions[0],
                     val_probs=result.val_predictions[1], test_labels=result.test_predictions[0],
                     test_probs=result.test_predictions[1])
            files[f"{layout.PROBABILITIES_DIR}/{layout.PROBABILITIES}"] = staging / layout.PROBABILITIES
    metrics += [(layout.SIZE_MB, cost_.size_mb, 0), (layout.TOTAL_PARAMS, cost_.total_params, 0),
                (layout.LATENCY_MS, cost_.latency_ms, 0)]
    # train: data, features and training; wall: the whole trial as the sweep waits for it
    metrics += [(layout.TRAIN_SECONDS, outcome.trained_at - start, 0),
                (layout.WALL_SECONDS, time.perf_counter() - start, 0)]
    journaling = time.perf_counter()
    tags = {layout.COST_OF: cost_.of, **({layout.PRUNED: str(pruned_at)} if pruned_at is not None else {})}
    entry = write_entry(spec.journal, spec.run_id, spec.run_spec, params, metrics, plot_data, files, exported,
                        tags=tags)
    shutil.rmtree(staging, ignore_errors=True)
    return TrialOutput(result.val_accuracy, str(entry), is_head(model), export_seconds,
                       time.perf_counter() - journaling, result.history["val_accuracy"], result.first_epoch, pruned_at,
                       export_pending, result.fine_tune_start)


def model_cost(plan: recipe.Plan, model: keras.Model, num_classes: int, state_dir: Path | None = None) -> cost.Cost:
    """The cost of a trial's classifier without an export: measured on the model in memory, or for a head on
    the full classifier assembled from it, once per architecture in this process and, through a file in the
    sweep's state folder, once per architecture per sweep (fresh trial processes share it; the cost does not
    depend on the trained weights, and measuring the latency of a full network took seconds per trial)."""
    key = plan.architecture(num_classes)
    stored = _cost_file(key, state_dir)
    if stored is not None and stored.exists():
        with contextlib.suppress(OSError, ValueError, TypeError):
            return cost.cost_of_head(key, None, known=cost.Cost(**json.loads(stored.read_text())))
    measured = cost.cost_of_head(key, lambda: recipe.full_model(plan, num_classes, model))  # a full model as is
    if stored is not None:
        tmp = stored.with_name(f".{stored.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(dataclasses.asdict(measured)))
            os.replace(tmp, stored)
    return measured


def _cost_file(key: tuple, state_dir: Path | None) -> Path | None:
    """Where a sweep keeps the cost of one architecture (``state_dir``: its state folder, beside its journal)."""
    if state_dir is None:
        return None
    digest = hashlib.sha256(json.dumps(list(key), default=str).encode()).hexdigest()[:16]
    return state_dir / f"cost-{digest}.json"


def resident_mb() -> float:
    """This process's resident memory in MB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # The answer is written and nothing else is pending (the journal entry is on disk): skip the interpreter's
    # teardown of TensorFlow (seconds under load, which the sweep waited for); the kernel frees the memory.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
