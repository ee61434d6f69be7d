"""The one recorder: opens a trial's run, writes its whole record once, closes it.

A finished trial hands over a ``Record`` (params, metrics, tags, and files in its record folder). The record is
first made durable in the journal folder (the trial's files plus ``record.json``, renamed into place: whole or
absent), then written to MLflow on one background thread, in order, and deleted. A process killed in between
leaves the entry, and ``replay()`` at the next start writes it, so a trial that Keras Tuner counts as done always
ends with its FINISHED run. Nothing changes a run once it is FINISHED. Failures are written at once.

A tracking server that stops answering (killed, restarted) does not stop the sweep: the recorder says so once,
the records stay journaled meanwhile and are written when the server answers again, waiting at most
``TLSWEEP_STORE_WAIT`` seconds per outage; past that the sweep ends with one line, the records kept for the
next start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.settings import environment
from tracking import datasets, runs, server
from tracking.runs import param_text, tag_text
from tracking.layout import (ERROR, ERROR_FILE, FIRST_METRICS, MODEL_URI, Record, place,
                             trial_params)

RECORD = "record.json"
MAX_PARAMS_TAGS, MAX_ENTRIES = 100, 1000  # MLflow's limits per log_batch: params (and tags), all entries
DUPLICATE_ROW = ("UNIQUE constraint failed", "Duplicate entry", "duplicate key value")  # SQLite, MySQL, PostgreSQL


@dataclasses.dataclass
class Run:
    """A trial's run: its id once created, and how to create it if the store was down when the trial began."""

    spec: dict[str, Any]
    id: str | None = None


class Recorder:
    """One per tuner process; ``flush()`` waits for every record handed over so far."""

    records = True  # False in a recorder that keeps nothing (benchmarks.untracked): trials then make no files for it

    def __init__(self, folder: str | Path, say: Callable[[str], None] | None = None,
                 searched: Collection[str] | None = None):
        self.folder = Path(folder).absolute()
        self.searched = searched  # the params a run keeps as params; the others become tags (layout.place)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlsweep-recorder")
        self._pending: list[Future] = []
        self.store_down = False  # the tracking server does not answer: records wait in the journal until it does
        self.gone: StoreGone | None = None  # it did not come back within store_wait()
        self.wait = store_wait()  # a bad TLSWEEP_STORE_WAIT is one line before the first trial
        self.say = say or (lambda line: print(line, flush=True))

    def open(self, experiment_id: str, parent_id: str, name: str, tags: Mapping[str, str]) -> Run:
        """The trial's run, RUNNING. While the tracking server does not answer, it is created with its record."""
        run = Run({"experiment_id": experiment_id, "parent_id": parent_id, "name": name, "tags": dict(tags)})
        if not self.store_down and store_answers(mlflow.get_tracking_uri()):
            run.id = runs.create_child(**run.spec)
        elif not self.store_down:
            self._down(mlflow.get_tracking_uri())
        return run

    def folder_for(self, run: Run) -> Path:
        """A fresh folder for the trial to write its record's files into (``finish`` journals it)."""
        folder = self.folder / f".{run.id or 'new'}-{uuid.uuid4().hex[:8]}.tmp"
        folder.mkdir(parents=True)
        return folder

    def finish(self, run: Run, record: Record, folder: Path) -> Future:
        """Journal ``record`` (its files in ``folder``) whole, then write it to MLflow in the background."""
        params, tags = self._place({k: v for k, v in record.params.items() if k not in run.spec["tags"]})  # once
        record = dataclasses.replace(record, params=params, tags={**tags, **record.tags})
        (folder / RECORD).write_text(json.dumps({"run_id": run.id, "run": run.spec, **dataclasses.asdict(record),
                                                 "timestamp": int(time.time() * 1000)}, default=_plain))
        entry = self.folder / folder.name.removeprefix(".").removesuffix(".tmp")
        os.replace(folder, entry)  # atomic: an entry is whole or absent
        future = self._pool.submit(self._patiently, self._write, entry)
        self._pending.append(future)
        return future

    def fail(self, run: Run, status: str, error: str, trace: str | None = None,
             params: Mapping[str, object] | None = None) -> None:
        """Close the run as FAILED or KILLED with its error and params, now (after the records queued before)."""
        kept, tags = self._place(params or {})

        def close() -> None:
            run.id = run.id or runs.create_child(**run.spec)
            client = MlflowClient()
            client.log_batch(run.id, params=[Param(k, param_text(v)) for k, v in sorted(kept.items())],
                             tags=[RunTag(k, tag_text(v)) for k, v in sorted({**tags, ERROR: error[:5000]}.items())])
            if trace:
                client.log_text(run.id, trace, ERROR_FILE)
            client.set_terminated(run.id, status=status)

        try:
            self.flush()  # an earlier write that failed is reported after this run is closed all the same
        finally:
            self._patiently(close)

    def _place(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The run's params and the tags that hold the rest (``layout.place``); all params without ``searched``."""
        return (dict(params), {}) if self.searched is None else place(dict(params), self.searched)

    def flush(self) -> None:
        """Wait until every record handed over is written; raise the first error of one that failed."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown()

    def replay(self) -> list[str]:
        """Write the records a killed process journaled but had not written; returns their run ids."""
        if not self.folder.is_dir():
            return []
        for tmp in self.folder.glob(".*.tmp"):  # a trial's files whose record was never journaled
            shutil.rmtree(tmp, ignore_errors=True)
        return [self._patiently(self._write, e) for e in sorted(self.folder.iterdir()) if (e / RECORD).is_file()]

    # -- writing one record -----------------------------------------------------------------------

    def _write(self, entry: Path) -> str:
        saved = json.loads((entry / RECORD).read_text())
        run_id = saved["run_id"] or runs.create_child(**saved["run"])
        for part in PARTS:
            part(MlflowClient(), run_id, saved, entry)
        MlflowClient().set_terminated(run_id, status="FINISHED")
        shutil.rmtree(entry)
        return run_id

    # -- a tracking server that stops answering -----------------------------------------------------

    def _patiently(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` once the tracking server answers; again if it stopped answering meanwhile."""
        while True:
            self._wait_for_store()
            try:
                return fn(*args)
            except Exception:
                if store_answers(mlflow.get_tracking_uri()):
                    raise  # not an outage: a real error
                # the server went away while writing: wait for it, then write the whole step again

    def _wait_for_store(self) -> None:
        uri = mlflow.get_tracking_uri()
        back = f"[sweep] the tracking server {uri} answers again; the journaled trials are written to it"
        if store_answers(uri):
            if self.store_down:
                self.store_down, self.gone = False, None
                self.say(back)
            return
        if self.gone is not None:  # waited once already: the next writes fail at once, their records journaled
            raise self.gone
        if not self.store_down:
            self._down(uri)
        deadline = time.monotonic() + self.wait
        while not server.answers(uri):
            if time.monotonic() > deadline:
                self.gone = StoreGone(f"the tracking server {uri} did not answer for {self.wait:.0f} s "
                                      f"(TLSWEEP_STORE_WAIT); the finished trials stay journaled in {self.folder}: "
                                      "start the server again and run the same command, which writes them out first")
                raise self.gone
            time.sleep(1.0)
        self.store_down = False
        self.say(back)

    def _down(self, uri: str) -> None:
        self.store_down = True
        self.say(f"[sweep] the tracking server {uri} does not answer; finished trials are journaled in "
                 f"{self.folder} and written to it when it is back (waiting up to {self.wait:.0f} s, "
                 "TLSWEEP_STORE_WAIT)")


# -- the parts of a record's write, in order (``benchmarks/bench_tracking.py`` times each) --------------------

def write_model(client: MlflowClient, run_id: str, saved: dict, entry: Path) -> None:
    """The trial's SavedModel as its pyfunc model (an MLflow LoggedModel), when it exported one. First: the values
    then carry its URI (``MODEL_URI``) and link its scores to it; logged after them, MLflow would link them itself,
    reading each metric's history back (a round trip per metric name)."""
    if saved.get("model"):
        from tracking import pyfunc

        model = entry / saved["model"]
        sample = dict(np.load(model / "sample.npz"))
        info = pyfunc.log_model(str(model / "export"), sample["image"] if list(sample) == ["image"] else sample,
                                np.load(model / "probs.npy"), run_id=run_id,
                                params={k: param_text(v) for k, v in saved["params"].items()})
        saved["tags"][MODEL_URI], saved["model_id"] = info.model_uri, info.model_id


def write_values(client: MlflowClient, run_id: str, saved: dict, entry: Path) -> None:
    """Params, tags and metrics (the trial's own, then its system metrics), in as few ``log_batch`` calls as fit;
    its scores (one-value metrics, and the epoch metrics' last values) linked to its model, if logged."""
    params = [Param(k, param_text(v)) for k, v in sorted(saved["params"].items())]
    model_id, last = saved.get("model_id"), {}
    for k, _, s, *t in saved["metrics"]:
        last[k] = max(last.get(k, s), s)
    metrics = sorted((Metric(k, float(v), int(t[0]) if t else saved["timestamp"], int(s),  # t: a system metric's
                             model_id=model_id if not t and s == last[k] else None)  # the model's: the last epoch's
                      for k, v, s, *t in saved["metrics"] if v is not None), key=_first)
    tags = [RunTag(k, tag_text(v)) for k, v in sorted(saved["tags"].items())]
    for batch in batches(metrics, params, tags):
        client.log_batch(run_id, **batch)


def write_inputs(client: MlflowClient, run_id: str, saved: dict, entry: Path) -> None:
    """The splits as MLflow 3 datasets, from the data lineage among the values."""
    if inputs := datasets.dataset_inputs(trial_params(saved["params"], saved["tags"])):
        log_inputs(client, run_id, inputs)


def write_files(client: MlflowClient, run_id: str, saved: dict, entry: Path) -> None:
    """Plots, checkpoint, probabilities: each file under its artifact path."""
    for artifact_path, local in saved["files"].items():
        parent = str(Path(artifact_path).parent)
        client.log_artifact(run_id, str(entry / local), None if parent == "." else parent)


PARTS = (write_model, write_values, write_inputs, write_files)


def _first(metric: Metric) -> int:
    """``FIRST_METRICS`` first, in their order (MLflow lists a run's metrics in the order they were first logged)."""
    return FIRST_METRICS.index(metric.key) if metric.key in FIRST_METRICS else len(FIRST_METRICS)


def batches(metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> Iterator[dict[str, list]]:
    """``log_batch`` arguments for all of them in as few calls as MLflow takes: at most 100 params, 100 tags and
    1000 entries in all per call."""
    first = True
    while first or metrics or params or tags:
        some = {"params": params[:MAX_PARAMS_TAGS], "tags": tags[:MAX_PARAMS_TAGS]}
        some["metrics"] = metrics[:MAX_ENTRIES - len(some["params"]) - len(some["tags"])]
        params, tags, metrics = (x[len(some[k]):] for x, k in ((params, "params"), (tags, "tags"), (metrics, "metrics")))
        first = False
        yield some


class StoreGone(UserError):
    """The tracking server did not come back within ``store_wait()``."""


def log_inputs(client: MlflowClient, run_id: str, inputs: list, attempts: int = 3) -> None:
    """``client.log_inputs``, again when it lost a race: two processes logging the same data set at once race in
    MLflow's SQL store (look up, then insert), and the loser gets a duplicate-row error (seen with ``GPUS=0,1``).
    Once the winner's row is in, the same call succeeds."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except mlflow.exceptions.MlflowException as e:
            if attempt == attempts - 1 or not any(text in str(e) for text in DUPLICATE_ROW):
                raise
            time.sleep(0.2 * (attempt + 1))


def store_wait() -> float:
    """``TLSWEEP_STORE_WAIT``: seconds to wait for a tracking server that stopped answering (default 600)."""
    return environment().store_wait


def store_answers(uri: str) -> bool:
    """Whether the store at ``uri`` can be reached now: a file or database store always; an ``mlflow server`` when
    its health check answers (a refused connection answers at once, instead of MLflow's minutes of retries)."""
    return not uri.startswith(("http://", "https://")) or server.answers(uri)


def _plain(value: Any) -> Any:
    """JSON for numpy values in a record."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
