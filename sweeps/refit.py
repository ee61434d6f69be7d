"""``best-export --refit``: the chosen trial's configuration trained again on train+validation, as a run of its own.

On a small data set the validation split holds a sixth of the photos a model could learn from. Once the selection
rule has chosen a trial (docs/selection.md), validation has done its job, and the exported model may learn from it
too. The refit trains the trial's ``RunConfig`` on the same split with its validation images added to training, for
the epochs the trial kept (early stopping has nothing left to watch), and scores it on the same test split. It is
logged once, through the recorder, as a run of its own under the sweep (kind ``refit``, ``tlsweep.refit_of`` = the
trial, ``trained_on`` = what it saw); the trial's run is not touched, and the refit never ranks with the trials (it
has no validation score).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import precision, recipe
from pipeline.errors import UserError, typed
from pipeline.hparams import RunConfig
from sweeps import signals
from tracking import layout, runs
from tracking.intervals import interval_metrics
from tracking.layout import Record
from tracking.recorder import Recorder



def _without() -> str:
    """How to export the trial's own model instead, as the user types it."""
    return typed("without --refit", "without REFIT=1")


def check_refittable(run: mlflow.entities.Run) -> None:
    """One line when the chosen run has no one configuration to train again (before anything reads one)."""
    if layout.ENSEMBLE_MEMBERS in run.data.tags:
        raise UserError(f"the chosen model (run {run.info.run_id}) is an ensemble of trials, which has no one "
                        f"configuration to refit; export it {_without()}")


def refit_config(run: mlflow.entities.Run, config: RunConfig) -> RunConfig:
    """The trial's configuration (``config``, as its run logged it) with the epochs it kept: its head epochs (up to
    the one early stopping kept) and the fine-tuning epochs it ran; no early stopping and no cross-validation (no
    split is left to watch)."""
    check_refittable(run)
    history = MlflowClient().get_metric_history(run.info.run_id, layout.VAL_ACCURACY)
    if not history or min(m.step for m in history) != 0:
        raise UserError(f"trial run {run.info.run_id} continued another trial's model (a staged search's stage 2 or "
                        f"a Hyperband promotion), so its configuration alone does not make its model; export it "
                        f"{_without()}")
    epochs = len({m.step for m in history})
    head = int(run.data.metrics.get(layout.FINE_TUNE_START, epochs))  # absent: the trial's model did not fine-tune
    fine = max(epochs - head, 0)
    return dataclasses.replace(config, epochs=head, fine_tune=bool(config.fine_tune and fine), fine_tune_epochs=fine,
                               early_stopping_patience=0, cv_folds=0)


def refit(run: mlflow.entities.Run, config: RunConfig, verbose: int | str = 2) -> mlflow.entities.Run:
    """Train the trial's configuration (``config``: its logged ``RunConfig``, in the dtype policy it trained with) on
    train+validation and log it as its own FINISHED run with its model; returns that run."""
    from sweeps.trial import MODEL, export_for_record

    start = time.perf_counter()
    values = runs.values(run)
    config = refit_config(run, config)
    plan = recipe.plan(config)
    split = None if values.get(layout.SPLIT, "default") == "default" else values[layout.SPLIT]
    data = recipe.load_data_for(plan, values["data_name"], split)
    if data.fingerprint != values.get("data_fingerprint"):
        raise UserError(f"the data at {values['data_name']} is not what trial run {run.info.run_id} trained on "
                        f"(fingerprint {data.fingerprint}, the run logged {values.get('data_fingerprint')}): files "
                        f"were added, removed or changed since the sweep; export {_without()}, or sweep "
                        "again")
    if not data.sizes["validation"]:
        raise UserError(f"trial run {run.info.run_id} had no validation images, so a refit would train on what it "
                        f"trained on; export {_without()}")
    seen = data.with_validation_in_train()
    print(f"refit: trial {run.data.tags.get(layout.TRIAL_ID)}'s configuration on train+validation "
          f"({seen.sizes['train']} images), {config.epochs} head epochs"
          + (f" + {plan.fine_tune_epochs} fine-tuning epochs" if plan.fine_tunes else "")
          + " (Keras's val_ figures below score validation images the refit trains on: no estimate)", flush=True)
    outcome = recipe.train_run(plan, seen, verbose=verbose)
    result = outcome.result
    parent = run.data.tags[layout.PARENT_RUN_ID]
    kept = {k: v for k, v in values.items() if k in layout.TRIAL_PARAMS or k in run.data.params}
    params = {**kept, **data.lineage(), layout.RUN_CONFIG: config.to_json(), layout.DEVICE: precision.this_device(),
              layout.TRAINED_ON: f"train+validation ({seen.sizes['train']} images)"}
    scores = {layout.TEST_ACCURACY: result.test_accuracy, layout.TEST_LOSS: result.test_loss,
              layout.TRAIN_SECONDS: outcome.trained_at - start,  # data, features, training and evaluation
              **interval_metrics(None, 0, result.test_accuracy, data.sizes["test"])}
    with tempfile.TemporaryDirectory(prefix="tlsweep-refit-") as journal:
        recorder = Recorder(journal, searched=set(run.data.params))
        opened = None
        try:
            with signals.held():  # a Ctrl-C lands once the run exists, and closes it KILLED below
                opened = recorder.open(run.info.experiment_id, parent, f"refit of {run.info.run_name}",
                                       {layout.KIND: layout.REFIT, layout.REFIT_OF: run.info.run_id})
            folder = recorder.folder_for(opened)
            measured = export_for_record(plan, outcome.model, seen, folder / MODEL, None, params)
            scores.update({layout.SIZE_MB: measured.size_mb, layout.TOTAL_PARAMS: measured.total_params,
                           layout.LATENCY_MS: measured.latency_ms})
            record = Record(params, [(k, float(v), 0) for k, v in scores.items() if v is not None],
                            {layout.COST_OF: measured.of}, {}, MODEL)
            run_id = recorder.finish(opened, record, folder).result()
        except BaseException as e:
            if opened is not None and (opened.id is None or _running(opened.id)):  # not written FINISHED
                stopped = signals.interruption(e) is not None
                with signals.held():
                    recorder.fail(opened, "KILLED" if stopped else "FAILED", f"{type(e).__name__}: {e}")
            raise
        finally:
            recorder.close()
    return MlflowClient().get_run(run_id)


def _running(run_id: str) -> bool:
    return MlflowClient().get_run(run_id).info.status == "RUNNING"
