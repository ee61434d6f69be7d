"""Run (or continue) a sweep: parent run first, then the tuner's trials, then the leaderboard."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.backbones import get_spec
from pipeline.data import check_dataset, skipped_lines, unreadable_files
from pipeline.errors import DataError, UserError, typed
from pipeline.hparams import FINE_TUNE_ONLY
from pipeline.settings import environment
from sweeps import doctor, ktpatches, signals, workers
from sweeps.ktpatches import distributed_role
from sweeps import space as space_module
from sweeps.config import SweepConfig, check_experiment_name, default_sweep_for, load_sweep, safe_experiment_name
from sweeps.state import SweepState, check_places
from sweeps.tuner import TransferTuner, sweep_dir
from tracking import leaderboard as lb
from tracking import layout, report
from tracking import runs, store


def experiment_name(dataset: str, experiment: str | None) -> str:
    """``experiment`` checked to be a plain name, else one made from the data folder's (or tfds) name."""
    if experiment is not None:
        return check_experiment_name(experiment)
    return safe_experiment_name(Path(os.path.abspath(os.path.expanduser(dataset))).name)


def run_sweep(
    dataset: str,
    sweep: str | None = None,
    experiment: str | None = None,
    max_trials: int | None = None,
    tuner: str | None = None,
    seed: int | None = None,
    split: str | None = None,
    state_dir: str = "sweeps_state",
    tracking_uri: str | None = None,
    verbose: int | str = 2,
    feature_cache: bool = True,
    log_models: str | None = None,
    trial_process: str | None = None,
    mixed_precision: str | None = None,
    progress: bool = True,
    on_change: str = "error",
    tracebacks: bool = False,
) -> str:
    """Search, tracking every trial; running it again continues the same search. Returns the parent run id.

    With Keras Tuner's distributed mode (``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP``,
    ``KERASTUNER_ORACLE_PORT``; see ``distributed_role``) the chief creates the parent run, serves the
    oracle and writes the leaderboard when every trial is done; each worker runs trials under that
    parent. Point all of them at one ``mlflow server``.

    Before any run exists: the data set is found, the space is fitted to this machine and checked
    (``sweeps.space.check``), and the saved search, if any, must be the same search on the same data
    (``sweeps.state``; ``on_change``: ``error``, ``continue`` or ``restart``). ``tracebacks`` (``--verbose``): a
    failed trial prints its traceback, not only its reason.
    """
    config = load_sweep(sweep or default_sweep_for(dataset)).with_overrides(
        max_trials=max_trials, tuner=tuner, seed=seed, log_models=log_models, trial_process=trial_process,
        mixed_precision=mixed_precision)
    role = distributed_role()
    if role != "single" and config.stage2:
        raise UserError("a staged search (stage2: in the sweep file) runs in one process; remove stage2 to run it "
                        "with a chief and workers")
    experiment = experiment_name(dataset, experiment)
    check_places(dataset, state_dir, experiment, tracking_uri)  # where it writes: folders of its own, not the data's
    check_dataset(dataset, split, config.seed)  # these fail before any run exists (layout, SPLIT=, seed too)
    space_module.check_sweep(config)  # cheap: before the images are read
    for line in skipped_lines(unreadable_files(dataset)):  # named here: trials only count them
        print(line, flush=True)
    timeout = workers.worker_timeout() if role == "chief" else None
    heartbeat = workers.heartbeat_seconds() if role == "worker" else None
    chief_wait = workers.chief_timeout() if role == "worker" else None
    store.configure(tracking_uri)  # a store that cannot be used is one line, before any state is written
    directory = sweep_dir(state_dir, experiment)
    search = SweepState(directory, config, dataset, split)
    with search.locked() if role != "worker" else contextlib.nullcontext():
        note, config = search.check(on_change) if role != "worker" else (None, config)
        if note:
            print(note, flush=True)
        config = space_module.fit_to_machine(config)  # the saved search's identity stays the sweep file's space
        exp_id = store.experiment_id(experiment)
        key = f"{experiment}:{config.name}"  # not a path: the project may move, workers run elsewhere
        if role == "worker":  # the chief creates the parent (and the experiment) before any worker writes
            parent = runs.wait_for_parent(exp_id, key, timeout=environment().parent_timeout)
        else:
            if note and on_change == "restart":  # the old search's parent keeps its runs under another key
                runs.retire_parent(exp_id, key)
            elif search.trials_saved() and runs.find_parent(exp_id, key) is None:
                raise UserError(
                    f"the saved search in {search.folder} has {search.trials_saved()} trial(s), but the MLflow store "
                    f"{store.resolve_uri(tracking_uri)} has no run of sweep {key!r}: the store is new or was wiped. Point "
                    f"MLFLOW_TRACKING_URI at the store this sweep logged to, or start over with "
                    f"{typed('--on-change restart', 'ON_CHANGE=restart')}")
            parent = runs.start_parent(exp_id, key, run_name=f"sweep-{config.name}")
            _log_settings(parent, config, dataset, split)
        staged = bool(config.stage2)
        if staged:  # stage 1 sweeps heads only (cheap on cached features); stage 2 fine-tunes the best
            config = dataclasses.replace(config, space={**config.space, "fine_tune": {"fixed": False}})
        tuner_obj = TransferTuner(config, dataset, directory, exp_id, parent, split=split, verbose=verbose,
                                  feature_cache=feature_cache, stage="1" if staged else "", progress=progress,
                                  heartbeat=heartbeat, tracebacks=tracebacks)
        tuners = [tuner_obj]
        _recover(tuner_obj, exp_id, parent, role)
        if role == "worker":  # a chief that dies is waited for (bounded) and carried on with when it is back
            since = time.time()  # a parent FINISHED before this worker began is an earlier end of the same sweep
            ktpatches.reconnecting(tuner_obj.oracle, chief_wait, finished=lambda: runs.finished_since(parent, since))
        if role == "chief":  # no worker leaves while another's trial may still be requeued to it
            ktpatches.wait_for_running_trials(tuner_obj.oracle)
        if role == "chief" and (kept := ktpatches.keep_ongoing(tuner_obj.oracle)):  # started again after it died
            print(f"chief: trial(s) {', '.join(kept)} still run on their workers and stay theirs", flush=True)
        if role == "chief":
            print(f"chief: serving the oracle on {os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
                  f" for sweep {key!r} (parent run {parent}); start workers with `make sweep-worker`", flush=True)
        status = "FAILED"
        with signals.stop_on_signals():  # Ctrl-C / SIGTERM close the runs as KILLED, even inside TensorFlow
            try:
                with (workers.WorkerMonitor(tuner_obj.oracle, exp_id, parent, timeout) if timeout
                      else contextlib.nullcontext()):  # the chief requeues the trials of workers that died
                    tuner_obj.search(verbose=1 if verbose else 0)  # also sets Keras Tuner's own trial display
                if role == "chief":  # Keras Tuner's chief saves its oracle before it drops the last trial from the
                    tuner_obj.oracle.save()  # ongoing ones; without this save, the same command again reran that trial
                if staged:
                    for stage2 in stage2_tuners(tuner_obj, config, dataset, directory, exp_id, parent, split, verbose,
                                                feature_cache):
                        tuners.append(stage2)
                        _recover(stage2, exp_id, parent, role)
                        stage2.search(verbose=1 if verbose else 0)
                status = "FINISHED"
            except ktpatches.ChiefFinished as e:  # a worker that waited for a chief which ended the sweep meanwhile
                print(e, flush=True)
                status = "FINISHED"
            except BaseException as e:
                if (stop := signals.interruption(e)) is not None:
                    status = "KILLED"
                    raise stop
                if (fatal := tuners[-1].fatal) is not None:  # found while loading the data in a trial
                    raise DataError(str(fatal)) from None
                if tuners[-1].failures_in_a_row < config.max_consecutive_failed_trials:
                    raise
                last = tuners[-1].last_failure
                search.stopped(config.max_consecutive_failed_trials, last)
                raise UserError(
                    f"sweep stopped: {config.max_consecutive_failed_trials} trials failed in a row; last error: "
                    f"{last}. Each failed trial's run in MLflow has the error; fix the space in "
                    f"{config.source or config.name} and run the same command again with "
                    f"{typed('--on-change restart', 'ON_CHANGE=restart')}"
                ) from e
            finally:
                for t in tuners:
                    t.pool.close()  # no trial process outlives the sweep
                    try:
                        t.recorder.close()  # finished trials reach MLflow before the sweep ends
                    except Exception as e:  # the store failed: the records stay journaled for the next start
                        print(f"warning: finished trials could not all be written to MLflow ({type(e).__name__}: {e}); "
                              f"they stay in {t.recorder.folder} and are written when the sweep starts again",
                              file=sys.stderr)
                if any(t.recorder.store_down for t in tuners):  # the server did not come back (TLSWEEP_STORE_WAIT):
                    pass  # the leaderboard and the parent wait for the next start, which writes the journal out first
                elif role != "worker":  # workers leave the leaderboard and the parent to the chief
                    try:
                        if config.ensemble and status == "FINISHED":
                            _ensemble(experiment, parent, config.ensemble)
                        summarize(experiment, parent)
                    finally:  # the parent is closed even if the leaderboard cannot be written
                        runs.end_parent(parent, status)
        for t in tuners:
            if t.recorder.gone is not None:  # the server never came back: one error line, no leaderboard to read
                raise t.recorder.gone
        return parent


def _recover(tuner: TransferTuner, exp_id: str, parent: str, role: str) -> None:
    """After a crash: write out trials that finished but had not reached MLflow, then close the dead runs.

    A worker closes only its own runs (others may be alive); the chief runs no trials.
    """
    written = tuner.recorder.replay()
    if written:
        print(f"wrote {len(written)} finished trial(s) that had not reached MLflow: {', '.join(written)}")
    if role == "chief":
        return
    closed = runs.close_orphans(exp_id, parent, worker=tuner.tuner_id if role == "worker" else None)
    if closed:
        print(f"closed {len(closed)} trial run(s) left RUNNING by a process that died: {', '.join(closed)}")


def stage2_tuners(stage1: TransferTuner, config: SweepConfig, dataset: str, directory: str, exp_id: str,
                  parent: str, split: str | None, verbose: int | str, feature_cache: bool) -> list[TransferTuner]:
    """One fine-tuning search per top-k stage-1 trial, each starting from that trial's trained head."""
    tuners = []
    for trial in stage1.oracle.get_best_trials(int(config.stage2.get("top_k", 3))):
        values = stage1.hypermodel.build(trial.hyperparameters.copy())
        if get_spec(str(values["backbone"])).is_ensemble:  # it trains its head only: stage 1 was all of it
            print(f"[sweep] stage 2 leaves trial {trial.trial_id} ({values['backbone']}) as it is: an ensemble does "
                  "not fine-tune", flush=True)
            continue
        fixed = {k: {"fixed": v} for k, v in values.items() if k not in FINE_TUNE_ONLY and k != "fine_tune"}
        space = {**fixed, "fine_tune": {"fixed": True}, **(config.stage2.get("space") or {})}
        stage2 = dataclasses.replace(config, name=f"{config.name}-stage2-{trial.trial_id}", tuner="random",
                                     max_trials=int(config.stage2.get("trials_per_config", 2)), space=space, stage2={})
        tuners.append(TransferTuner(stage2, dataset, directory, exp_id, parent, split=split, verbose=verbose,
                                    feature_cache=feature_cache, stage="2", start_from=stage1.checkpoint(trial.trial_id),
                                    data_cache=stage1.data_cache, progress=stage1.progress,
                                    tracebacks=stage1.tracebacks))
    return tuners


def _log_settings(parent: str, config: SweepConfig, dataset: str, split: str | None) -> None:
    client = MlflowClient()
    doctor.log_to(parent)  # doctor.json: this machine's facts (GPUs, CUDA, versions) at this start of the sweep
    if client.get_run(parent).data.params:
        client.set_tag(parent, layout.RESUMED, "true")
        return
    settings = (dataset, config.name, config.tuner, config.max_trials, config.objective, config.seed, split or "default",
                config.log_models, config.trial_process, config.mixed_precision, config.xla, config.prune or False,
                config.ensemble)
    runs.log_params(parent, {**dict(zip(layout.SWEEP_PARAMS, settings, strict=True)),
                             **{f"hyperband.{k}": v for k, v in config.hyperband.items()}})
    client.log_dict(parent, {"space": config.space, "source": config.source}, layout.SEARCH_SPACE)
    if config.source:
        client.log_artifact(parent, config.source, layout.SWEEP_FILE_DIR)


def _ensemble(experiment: str, parent: str, size: int) -> None:
    """The sweep's ensemble (sweeps.ensemble). Its trials are all logged by now: an ensemble that cannot be built
    says why in one line and the sweep ends as it would without it."""
    from sweeps import ensemble

    try:
        ensemble.build(experiment, parent, size, say=lambda line: print(line, flush=True))
    except Exception as e:  # noqa: BLE001 - the trials are safe in MLflow; the leaderboard must still be written
        print(f"warning: the sweep's ensemble could not be built ({type(e).__name__}: {e}); the trials are "
              "unaffected; set ensemble: false in the sweep file to skip it", file=sys.stderr, flush=True)


def summarize(experiment: str, parent: str) -> lb.pd.DataFrame:
    """Leaderboard artifacts on the parent, and which trial won (the trials' runs are FINISHED: nothing changes them)."""
    client = MlflowClient()
    table = lb.leaderboard(lb.trial_runs(experiment, parent))
    client.log_text(parent, table.to_csv(index=False), layout.LEADERBOARD_CSV)
    client.log_text(parent, lb.to_markdown(table), layout.LEADERBOARD_MD)
    report.log_sweep_charts(parent, table)
    done = table[table["status"] == "FINISHED"]
    if not done.empty:
        best = done.iloc[0]
        client.set_tag(parent, layout.BEST_RUN_ID, best["run_id"])
        client.log_metric(parent, layout.BEST_VAL_ACCURACY, float(best[layout.OBJECTIVE]))
    return table
