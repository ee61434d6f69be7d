"""Runs: a parent per sweep, a child per trial, closed honestly; batched logging."""

from __future__ import annotations

import contextlib
import time
import traceback
from typing import Iterator, Mapping, Sequence

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

KIND = "tlsweep.kind"  # "sweep" for parents, "trial" for children
SWEEP_KEY = "tlsweep.sweep"  # identifies a sweep across restarts
TRIAL_ID = "kt.trial_id"
MAX_PARAM = 6000


def find_parent(experiment_id: str, sweep_key: str) -> str | None:
    """The parent run of a sweep started earlier (for resuming), if any."""
    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{KIND}` = 'sweep' and tags.`{SWEEP_KEY}` = '{sweep_key}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def start_parent(experiment_id: str, sweep_key: str, run_name: str) -> str:
    """Create or reopen the sweep's parent run; returns its id. Call before any worker starts."""
    client = MlflowClient()
    run_id = find_parent(experiment_id, sweep_key)
    if run_id is None:
        run = client.create_run(experiment_id, run_name=run_name, tags={KIND: "sweep", SWEEP_KEY: sweep_key})
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def close_orphans(experiment_id: str, parent_id: str) -> list[str]:
    """Mark children of this sweep still RUNNING from a dead process as KILLED; returns their ids."""
    client = MlflowClient()
    stale = client.search_runs(
        [experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and attributes.status = 'RUNNING'"
    )
    for run in stale:
        client.set_tag(run.info.run_id, "tlsweep.closed_by", "resume: its process died")
        client.set_terminated(run.info.run_id, status="KILLED")
    return [r.info.run_id for r in stale]


@contextlib.contextmanager
def child_run(experiment_id: str, parent_id: str, name: str, tags: Mapping[str, str]) -> Iterator[str]:
    """A nested run, the active run inside the block, closed FINISHED, FAILED (with the error) or KILLED."""
    run = MlflowClient().create_run(
        experiment_id, run_name=name, tags={KIND: "trial", MLFLOW_PARENT_RUN_ID: parent_id, **tags}
    )
    run_id = run.info.run_id
    mlflow.start_run(run_id=run_id)
    try:
        yield run_id
    except KeyboardInterrupt:
        _end(run_id, "KILLED", "interrupted (Ctrl-C)")
        raise
    except BaseException as e:
        _end(run_id, "FAILED", f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    else:
        _end(run_id, "FINISHED")


def _end(run_id: str, status: str, error: str | None = None, trace: str | None = None) -> None:
    client = MlflowClient()
    if error:
        client.set_tag(run_id, "error", error[:5000])
    if trace:
        with contextlib.suppress(Exception):
            mlflow.log_text(trace, "error.txt")
    while mlflow.active_run() is not None:
        mlflow.end_run(status)
    client.set_terminated(run_id, status=status)


def log_params(run_id: str, params: Mapping[str, object]) -> None:
    MlflowClient().log_batch(
        run_id, params=[mlflow.entities.Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(params.items())]
    )


def log_history(run_id: str, history: Mapping[str, Sequence[float]], first_epoch: int = 0) -> None:
    """Per-epoch metrics in one batch; step = epoch index on the continuous two-phase axis."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(v), now, first_epoch + i) for key, values in history.items() for i, v in enumerate(values)
    ]
    log_metrics_batch(run_id, metrics)


def log_metrics(run_id: str, values: Mapping[str, float | None], step: int = 0) -> None:
    now = int(time.time() * 1000)
    log_metrics_batch(run_id, [Metric(k, float(v), now, step) for k, v in values.items() if v is not None])


def log_metrics_batch(run_id: str, metrics: list[Metric]) -> None:
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def end_parent(parent_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(parent_id, status=status)
