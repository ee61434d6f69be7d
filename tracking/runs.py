"""Runs: a parent per sweep, a child per trial, closed honestly; batched logging."""

from __future__ import annotations

import contextlib
import time
from typing import Mapping

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from tracking.layout import (CLOSED_BY, ERROR, ERROR_FILE, HEARTBEAT, KIND, PARENT_RUN_ID, SWEEP, SWEEP_KEY, TRIAL,
                             TRIAL_ID, WORKER, trial_params)


MAX_PARAM = 6000  # MLflow's limit on a parameter value's length
MAX_TAG = 8000  # and on a tag value's


def param_text(value: object) -> str:
    """A param's value as MLflow stores it."""
    return str(value)[:MAX_PARAM]


def tag_text(value: object) -> str:
    """A tag's value as MLflow stores it."""
    return str(value)[:MAX_TAG]


def values(run: mlflow.entities.Run) -> dict[str, str]:
    """A trial's values (searched params and the others, kept as tags: ``layout.place``) as one mapping."""
    return trial_params(run.data.params, run.data.tags)


def find_parent(experiment_id: str, sweep_key: str) -> str | None:
    """The parent run of a sweep started earlier (for resuming), if any."""
    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{KIND}` = '{SWEEP}' and tags.`{SWEEP_KEY}` = '{sweep_key}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def start_parent(experiment_id: str, sweep_key: str, run_name: str) -> str:
    """Create or reopen the sweep's parent run; returns its id. Call before any worker starts."""
    client = MlflowClient()
    run_id = find_parent(experiment_id, sweep_key)
    if run_id is None:
        run = client.create_run(experiment_id, run_name=run_name, tags={KIND: SWEEP, SWEEP_KEY: sweep_key})
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


REPLACED = "@replaced-"  # in a retired parent's SWEEP_KEY


def retire_parent(experiment_id: str, sweep_key: str) -> str | None:
    """A search started over: its old parent keeps its runs under ``<key>@replaced-<time>``, found no more."""
    run_id = find_parent(experiment_id, sweep_key)
    if run_id is not None:
        MlflowClient().set_tag(run_id, SWEEP_KEY, f"{sweep_key}{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}")
    return run_id


def replaced_parents(experiment_id: str) -> set[str]:
    """The parents of searches started over (``retire_parent``): history, no longer candidates to rank or export."""
    parents = MlflowClient().search_runs([experiment_id], f"tags.`{KIND}` = '{SWEEP}'", max_results=50000)
    return {p.info.run_id for p in parents if REPLACED in p.data.tags.get(SWEEP_KEY, "")}


def wait_for_parent(experiment_id: str, sweep_key: str, timeout: float = 300.0) -> str:
    """A worker's parent run: the one its chief created (waits for the chief to create it)."""
    deadline = time.monotonic() + timeout
    while (run_id := find_parent(experiment_id, sweep_key)) is None:
        if time.monotonic() > deadline:
            raise UserError(
                f"no sweep {sweep_key!r} in {mlflow.get_tracking_uri()} after {timeout:.0f} s; start the chief first "
                "(make sweep-chief) with the same DATASET, SWEEP and MLFLOW_TRACKING_URI")
        time.sleep(1.0)
    return run_id


def close_orphans(experiment_id: str, parent_id: str, worker: str | None = None, trial: str | None = None,
                  reason: str = "resume: its process died") -> list[str]:
    """Mark children of this sweep (of one worker, of one trial, if given) still RUNNING as KILLED."""
    client = MlflowClient()
    stale = _running_children(experiment_id, parent_id, worker, trial)
    for run in stale:
        client.set_tag(run.info.run_id, CLOSED_BY, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
    return [r.info.run_id for r in stale]


def stamp(run_id: str) -> None:
    """A heartbeat: the run's process is alive now."""
    MlflowClient().set_tag(run_id, HEARTBEAT, f"{time.time():.0f}")


def last_stamp(experiment_id: str, parent_id: str, worker: str, trial: str) -> float | None:
    """When a worker's run of a trial was last stamped (epoch seconds), if ever."""
    found = _running_children(experiment_id, parent_id, worker, trial)
    stamps = [float(r.data.tags[HEARTBEAT]) for r in found if HEARTBEAT in r.data.tags]
    return max(stamps) if stamps else None


def _running_children(experiment_id: str, parent_id: str, worker: str | None = None,
                      trial: str | None = None) -> list[mlflow.entities.Run]:
    query = f"tags.`{PARENT_RUN_ID}` = '{parent_id}' and attributes.status = 'RUNNING'"
    if worker is not None:
        query += f" and tags.`{WORKER}` = '{worker}'"
    if trial is not None:
        query += f" and tags.`{TRIAL_ID}` = '{trial}'"
    return MlflowClient().search_runs([experiment_id], query)


def finished_child(experiment_id: str, parent_id: str, trial: str) -> mlflow.entities.Run | None:
    """The FINISHED run of one trial (its ``TRIAL_ID`` tag) under this sweep's parent, if there is one."""
    query = (f"tags.`{PARENT_RUN_ID}` = '{parent_id}' and tags.`{TRIAL_ID}` = '{trial}' "
             "and attributes.status = 'FINISHED'")
    found = MlflowClient().search_runs([experiment_id], query, max_results=1)
    return found[0] if found else None


def create_child(experiment_id: str, parent_id: str, name: str, tags: Mapping[str, str]) -> str:
    """A trial's run under the sweep's parent (or another kind's, given as ``tags[KIND]``), RUNNING until
    ``end_run``; returns its id."""
    run = MlflowClient().create_run(
        experiment_id, run_name=name, tags={KIND: TRIAL, PARENT_RUN_ID: parent_id, **tags}
    )
    return run.info.run_id


def end_run(run_id: str, status: str, error: str | None = None, trace: str | None = None) -> None:
    """Close a run as FINISHED, FAILED or KILLED, with the error (tag) and traceback (artifact)."""
    client = MlflowClient()
    if error:
        client.set_tag(run_id, ERROR, error[:5000])
    if trace:
        with contextlib.suppress(Exception):
            client.log_text(run_id, trace, ERROR_FILE)
    client.set_terminated(run_id, status=status)


def log_params(run_id: str, params: Mapping[str, object]) -> None:
    MlflowClient().log_batch(
        run_id, params=[mlflow.entities.Param(k, param_text(v)) for k, v in sorted(params.items())]
    )


def finished_since(run_id: str, since: float) -> bool:
    """Whether the run ended FINISHED at or after ``since`` (seconds since the epoch): a sweep's chief ended it
    after that moment. A store that does not answer says no (ask again later)."""
    try:
        info = MlflowClient().get_run(run_id).info
    except Exception:  # noqa: BLE001 - the store did not answer
        return False
    return info.status == "FINISHED" and (info.end_time or 0) >= since * 1000


def end_parent(parent_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(parent_id, status=status)
