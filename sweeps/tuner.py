"""The tuner: Keras Tuner's oracles choose, the pipeline trains, every trial lands in MLflow.

``TransferTuner`` is a ``BaseTuner`` whose ``run_trial`` opens the trial's MLflow child run, runs
the two-phase trial (``sweeps.trial``) in this process or a fresh pool worker (``sweeps.executor``), and
hands its record to the recorder (``tracking.recorder``). Hyperband promotions continue the previous
trial's saved model (with its trainable flags and optimizer state) on the same two-phase epoch axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import keras
import keras_tuner as kt
import mlflow

from pipeline import recipe
from pipeline.data import DataSplits
from pipeline.hparams import RunConfig
from sweeps import ktpatches
from sweeps import prune as pruning
from sweeps import signals
from sweeps import space as space_module
from sweeps import tpe
from sweeps import trial as trials
from sweeps.executor import TrialPool
from sweeps.config import SweepConfig
from sweeps.workers import Heartbeat
from tracking import layout, runs, system_metrics
from tracking.recorder import Recorder, store_answers
from tracking.runs import param_text, tag_text

ZERO_SEED = 2**31 - 1  # the oracle's seed for a sweep with seed 0
ktpatches.apply()


class SpaceHyperModel(kt.HyperModel):
    """Declares the space; ``build`` returns the trial's values (models are built in ``run_trial``)."""

    def __init__(self, space: dict[str, dict[str, Any]]):
        super().__init__(name="transfer")
        self.space = space

    def build(self, hp: kt.HyperParameters) -> dict[str, Any]:
        return space_module.define(hp, self.space)


class RandomSearchOracle(ktpatches.DefaultFirst, kt.oracles.RandomSearchOracle):
    """Keras Tuner's random search, starting from the default point."""


class BayesianOptimizationOracle(ktpatches.DefaultFirst, kt.oracles.BayesianOptimizationOracle):
    """Keras Tuner's Bayesian optimization, starting from the default point (one of its random initial points)."""


class TPEOracle(ktpatches.DefaultFirst, tpe.TPEOracle):
    """Optuna's TPE (sweeps.tpe), starting from the default point (one of its random initial points)."""


def make_oracle(config: SweepConfig) -> kt.Oracle:
    objective = kt.Objective(config.objective, direction="max")
    # Keras Tuner takes seed 0 for "no seed" and draws a random one: a sweep with seed 0 would draw other
    # hyperparameters each time it starts. 0 stands for a fixed seed of its own instead.
    seed = config.seed if config.seed != 0 else ZERO_SEED
    common = dict(objective=objective, seed=seed, max_consecutive_failed_trials=config.max_consecutive_failed_trials)
    if config.tuner == "random":
        return RandomSearchOracle(max_trials=config.max_trials, **common)
    if config.tuner == "bayesian":
        return BayesianOptimizationOracle(max_trials=config.max_trials, **common)
    if config.tuner == "tpe":
        return TPEOracle(max_trials=config.max_trials, **common)
    if config.tuner == "grid":
        return kt.oracles.GridSearchOracle(max_trials=config.max_trials, **common)
    hb = config.hyperband
    return kt.oracles.HyperbandOracle(
        max_epochs=int(hb.get("max_epochs", 8)), factor=int(hb.get("factor", 3)),
        hyperband_iterations=int(hb.get("iterations", 1)), **common,
    )


class TransferTuner(ktpatches.WaitsWhenIdle, kt.engine.base_tuner.BaseTuner):
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
        heartbeat: float | None = None,
        tracebacks: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            oracle=make_oracle(config), hypermodel=SpaceHyperModel(config.space), directory=directory,
            project_name=config.name, overwrite=False, **kwargs,
        )
        self.progress = progress  # one line per trial: i/N, time, ETA, best so far
        self.heartbeat = heartbeat  # a distributed worker stamps its trial's run this often (seconds)
        self.tracebacks = tracebacks  # --verbose: a failed trial's traceback on the screen too, not only in MLflow
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
        # Each finished trial's run is written once, off the training path, through a journal beside the state.
        self.recorder = Recorder(Path(self.project_dir) / f"journal-{self.tuner_id}",
                                 searched=space_module.searched(config.space))  # the runs' params; the rest tags
        # Trials that build the whole network run in a fresh process each (trial_process: auto, fresh).
        self.pool = TrialPool(dataset, split, Path(self.project_dir) / f"next-trial-{self.tuner_id}.json")
        # Pruning: thresholds from the sweep's finished trials, given to each trial before it starts.
        self.curves = pruning.Curves(experiment_id, parent_run_id, config.prune, stage) if config.prune else None
        self._first_trial = True  # the first trial handed to this process may have finished before (_finished_before)
        self.failures_in_a_row, self.last_failure = 0, ""  # the sweep stops at max_consecutive_failed_trials
        self.fatal: Exception | None = None  # the data set is unusable (a trial found it): the sweep stops

    # -- one trial -----------------------------------------------------------------------------

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        hp = trial.hyperparameters
        values = self.hypermodel.build(hp)
        tuner_values = {k: v for k, v in hp.values.items() if k.startswith("tuner/")}
        key = self.trial_key(trial.trial_id)
        tags = {layout.TRIAL_ID: key, layout.WORKER: self.tuner_id, layout.TUNER: self.config.tuner}
        if self.stage:
            tags[layout.STAGE] = self.stage
        params = {**values, **tuner_values, layout.SEED: self.config.seed, layout.SPLIT: self.split or "default"}
        if self._first_trial:
            self._first_trial = False
            kept = self._finished_before(key, params)
            if kept is not None:
                return kept
        start = time.perf_counter()
        output, in_process, failure = None, True, None
        run = record_dir = None
        try:
            with signals.held():  # a signal lands once the run exists and is known: it is then closed KILLED below
                run = self.recorder.open(self.experiment_id, self.parent_run_id, f"trial-{key}", tags)
                record_dir = self.recorder.folder_for(run)
            spec = self._spec(trial, values, tuner_values, params, record_dir)
            with trials.trial_errors():  # deciding may load the data set
                in_process = not self._fresh(spec)
            samples: list = []  # CPU, memory (GPU) while it trains, written with its record
            with Heartbeat(run, self.heartbeat) if self.heartbeat else contextlib.nullcontext(), \
                    system_metrics.sampled(samples):
                output = trials.run(spec, self.data_cache) if in_process else self.pool.run(spec)
            output.record.tags[layout.PROCESS] = "sweep" if in_process else "pool"
            output.record.metrics += samples
            self.recorder.finish(run, output.record, Path(spec.record_dir))
            self._pruned(key, output)
        except BaseException as e:
            if run is None:  # the run could not be opened: nothing to close
                raise
            # A signal inside TensorFlow may surface as another error: it still stops the sweep.
            if (stop := signals.interruption(e)) is not None:
                self._record_end(run, "KILLED", "interrupted (Ctrl-C or SIGTERM)", params=params)
                raise stop
            # the trial's own failures as Keras Tuner's: the sweep goes on (FailedTrialError) or stops (FatalError)
            kt_error = (kt.errors.FatalError(str(e)) if isinstance(e, trials.DataUnusable) else
                        kt.errors.FailedTrialError(str(e)) if isinstance(e, trials.TrialFailed) else None)
            shown = kt_error or e
            self._record_end(run, "FAILED", f"{type(shown).__name__}: {shown}", traceback.format_exc(), params=params)
            failure = one_line(e)
            if self.tracebacks:  # --verbose: the traceback here too, not only in MLflow
                traceback.print_exc()
            self.failures_in_a_row, self.last_failure = self.failures_in_a_row + 1, failure
            if isinstance(e, trials.DataUnusable):
                self.fatal = e
            if kt_error is not None:
                raise kt_error from e
            print(f"[sweep] trial {key} failed on an internal error, not on its configuration (a bug in tlsweep: "
                  f"please report it): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                  f"; its traceback is in the run's {layout.ERROR_FILE} in MLflow", file=sys.stderr, flush=True)
            raise
        finally:
            if output is None and record_dir is not None:  # nothing to record but the failure
                shutil.rmtree(record_dir, ignore_errors=True)
            if run is not None:
                self._progress(key, time.perf_counter() - start, output.val_accuracy if output else None, failure)
            if in_process:  # free the trial's memory; a garbage collection pass (~0.25 s) only after a network
                keras.backend.clear_session(free_memory=not (output and output.head_only))
        self._best = output.val_accuracy if self._best is None else max(self._best, output.val_accuracy)
        self.failures_in_a_row = 0
        return {self.config.objective: output.val_accuracy}

    def _finished_before(self, key: str, params: Mapping[str, Any]) -> dict[str, float] | None:
        """The score of a trial that already has a FINISHED run in this sweep with these ``params``, else None.

        A sweep stopped after a trial finished but before the oracle heard of it hands that trial out again when
        it resumes: first, to the process that ran it. Seen with ``GPUS=``: SIGTERM reached the chief first, and a
        worker whose trial had just finished (its run written, or its entry journaled) could not report it. Its
        run is in MLflow by then (``_recover`` replays the journal first), so its logged score is reported instead
        of training it a second time, which left the trial with two finished runs. Only the first trial of a
        process is asked about: the ones after it were handed out while this process ran. The run must have logged
        the same hyperparameters (a search whose saved state was deleted, its store kept, numbers its trials from 0
        again). A store that does not answer now, or fails to, is not waited for: the trial is trained, as before.
        """
        if self.recorder.store_down or not store_answers(mlflow.get_tracking_uri()):
            return None
        try:
            found = runs.finished_child(self.experiment_id, self.parent_run_id, key)
        except Exception:  # noqa: BLE001 - a lookup that fails costs a retraining, never the trial
            return None
        score = found.data.metrics.get(self.config.objective) if found is not None else None
        if score is None or any(runs.values(found).get(k) not in (param_text(v), tag_text(v))  # params and tags
                                for k, v in params.items()):
            return None
        self._best = score if self._best is None else max(self._best, score)
        if self.progress:
            print(f"[sweep] trial {key} had finished before the sweep was stopped (run {found.info.run_id}, "
                  f"{self.config.objective} {score:.4f}): its result is kept, it is not trained again", flush=True)
        return {self.config.objective: float(score)}

    def _spec(self, trial: kt.engine.trial.Trial, values: dict[str, Any], tuner_values: dict[str, Any],
              params: dict[str, Any], record_dir: Path) -> trials.TrialSpec:
        previous = tuner_values.get("tuner/trial_id")
        config = self.config
        return trials.TrialSpec(
            run=RunConfig.from_values(values, seed=config.seed, mixed_precision=config.mixed_precision,
                                      xla=config.xla, feature_cache=self.feature_cache),
            dataset=self.dataset, split=self.split, log_models=config.log_models, verbose=self.verbose,
            trial_dir=self.get_trial_dir(trial.trial_id), record_dir=str(record_dir),
            params={**params, layout.TRIAL_ID: self.trial_key(trial.trial_id)}, state_dir=self.project_dir,
            initial_epoch=int(tuner_values.get("tuner/initial_epoch", 0)), stop_epoch=tuner_values.get("tuner/epochs"),
            previous=self.checkpoint(previous) if previous else None, start_from=self.start_from, best=self._best,
            checkpoint=config.tuner == "hyperband" or self.stage == "1",  # a later trial continues it
            record=self.recorder.records,
            prune=self.curves.limits() if self.curves else None,
        )

    def _record_end(self, run: Any, status: str, error: str, trace: str | None = None,
                    params: Mapping[str, object] | None = None) -> None:
        """Close the trial's run as FAILED or KILLED. A store that cannot be written (the tracking server gone past
        TLSWEEP_STORE_WAIT) must not hide the signal or the trial's own error: it is said in one line, and the
        same command run again closes the runs left RUNNING (``runs.close_orphans``)."""
        try:
            self.recorder.fail(run, status, error, trace, params=params)
        except Exception as e:  # noqa: BLE001 - the store's error is not the trial's
            print(f"warning: trial run not closed as {status} in MLflow ({one_line(e)})", file=sys.stderr, flush=True)

    def _pruned(self, key: str, output: trials.TrialOutput) -> None:
        """Remember the trial's curve for the next trials' thresholds; say when it was pruned."""
        if self.curves is None:
            return
        self.curves.add(key, output.curve, output.first_epoch, output.pruned_at, output.fine_tune_start)
        if output.pruned_at is not None and self.progress:
            print(f"[sweep] trial {key} pruned after epoch {output.pruned_at + 1}: behind the median of the earlier "
                  f"trials there; it counts with the val_accuracy it reached", flush=True)

    def _fresh(self, spec: trials.TrialSpec) -> bool:
        """Whether the trial runs in its own process (``trial_process`` of the sweep)."""
        if self.config.trial_process != "auto":
            return self.config.trial_process == "fresh"
        return trials.trains_network(spec, self.data_cache)

    def on_search_begin(self) -> None:
        self._search_start = time.perf_counter()
        self._durations: list[float] = []
        super().on_search_begin()

    def _progress(self, key: str, seconds: float, value: float | None, failure: str | None = None) -> None:
        """One line per trial: where the sweep is, how long it has left, the best so far."""
        self._durations.append(seconds)
        if not self.progress or signals.interrupted():  # stopping: a worker would ask a chief that may be gone
            return  # already, and wait for it (TLSWEEP_CHIEF_TIMEOUT) until the launcher kills it
        trials = getattr(self.oracle, "trials", None)  # None on a worker: the chief's oracle has them
        if trials is None:
            done, total = len(self._durations), None
        else:
            done = sum(t.status in ("COMPLETED", "FAILED", "INVALID") for t in trials.values()) + 1
            total = self.planned_trials
        elapsed = time.perf_counter() - self._search_start
        best = [t for t in self.oracle.get_best_trials(1) if t.score is not None]
        parts = [f"trial {key} ({done}/{total if total else '?'})",
                 f"{'val_accuracy ' + format(value, '.4f') if value is not None else 'FAILED'} in {_clock(seconds)}"
                 + (f" ({failure})" if failure and value is None else "")]
        if best or value is not None:
            top = max([b.score for b in best] + ([value] if value is not None else []))
            parts.append(f"best {top:.4f}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total:
            left = max(total - done, 0)
            parts.append(f"ETA {_clock(left * sum(self._durations) / len(self._durations))}" if left else "last trial")
        print("[sweep] " + " | ".join(parts), flush=True)

    @property
    def planned_trials(self) -> int | None:
        """The trials the search runs when its space lasts: ``max_trials`` (Hyperband plans its own)."""
        return self.config.max_trials if self.config.tuner != "hyperband" else None

    def on_search_end(self) -> None:
        self.recorder.flush()  # every finished trial is in MLflow before the sweep reports
        super().on_search_end()
        trials = getattr(self.oracle, "trials", None)  # None on a worker: the chief says it
        if self.progress and trials is not None and self.planned_trials and len(trials) < self.planned_trials:
            print(f"[sweep] the search ended after {len(trials)} of max_trials {self.config.max_trials}: the "
                  f"{self.config.tuner} tuner found no configuration of the space it had not tried. Widen the space in "
                  f"{self.config.source or self.config.name} for more, or lower max_trials", flush=True)

    def trial_key(self, trial_id: str) -> str:
        """The trial id as tracked: unique across the tuners of a staged search."""
        return f"{self.config.name}/{trial_id}" if self.stage == "2" else trial_id

    def checkpoint(self, trial_id: str) -> str:
        """The trial's checkpoint (``recipe.checkpoint_in``): ``head.keras`` (a head trained on features),
        ``weights.npz`` or ``model.keras``."""
        return str(recipe.checkpoint_in(self.get_trial_dir(trial_id)))


def one_line(error: BaseException) -> str:
    """An error's reason on one line (its traceback goes to MLflow's error.txt, and to the screen with --verbose)."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def sweep_dir(state_dir: str, experiment: str) -> str:
    path = Path(state_dir) / experiment
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
