"""Trial runs written to MLflow off the training path, through a local journal that loses nothing.

A sweep's trials are short once heads train on cached features, and a tracking store's round trips
(run creation, batches, artifact copies, plots) would otherwise stall training between trials.
``TrialJournal`` does those writes on one background thread, in order. A finished trial is first
written to a local journal folder (``entry.json`` plus its files), which the thread then replays
into MLflow and deletes. A process killed in between leaves the folder behind, and ``replay()``
at the next start finishes it, so a trial that Keras Tuner counts as done always ends with its
finished run. Failures (exceptions, Ctrl-C) are written synchronously: they are rare and must
be on record before the process goes on or exits.

A tracking server that stops answering (killed, restarted) does not stop the sweep: the writer says so once,
the finished trials stay journaled meanwhile, and it writes them out when the server answers again. It waits
for the server at most ``store_wait()`` seconds (``TLSWEEP_STORE_WAIT``, default 600) per outage; past that
the sweep ends with one line, the trials still journaled for the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from tracking import datasets, runs, system_metrics
from tracking.entry import ENTRY, MODEL_DIR, write_entry
from tracking.layout import PLOTS_DIR


DUPLICATE_ROW = ("UNIQUE constraint failed", "Duplicate entry", "duplicate key value")  # SQLite, MySQL, PostgreSQL


def log_inputs(client: MlflowClient, run_id: str, inputs: list, attempts: int = 3) -> None:
    """``client.log_inputs``, again when it lost a race. Two processes logging the same data set at once (two
    workers whose first trials end together) race in MLflow's SQL store, which looks the data set up and then
    inserts it: the loser gets a duplicate-row error (seen with ``GPUS=0,1``: ``UNIQUE constraint failed:
    datasets.experiment_id, datasets.name, datasets.digest``). Once the winner's row is in, the same call succeeds."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except mlflow.exceptions.MlflowException as e:
            if attempt == attempts - 1 or not any(text in str(e) for text in DUPLICATE_ROW):
                raise
            time.sleep(0.2 * (attempt + 1))


class TrialJournal:
    """One background writer per tuner process; ``flush()`` waits for everything queued so far."""

    def __init__(self, folder: str | Path):
        # absolute: the plot helper process runs in the project root, not necessarily the sweep's working directory
        self.folder = Path(folder).absolute()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlsweep-mlflow")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self._renderer: subprocess.Popen | None = None  # matplotlib in its own process: no GIL contention
        self._drawing: Path | None = None  # the entry whose plots are being drawn (answer not read yet)
        self.blocked = 0.0  # seconds the caller's thread spent in this class (the tracking overhead)
        self.busy = 0.0  # seconds the background thread spent writing
        self.store_down = False  # the tracking server does not answer: trials are journaled until it does
        self._gone: StoreGone | None = None  # it did not come back within store_wait()
        self.wait = store_wait()  # a bad TLSWEEP_STORE_WAIT is one line before the first trial
        self.say = lambda line: print(line, flush=True)

    # -- the caller's side: each call returns at once -------------------------------------------

    def start(self, experiment_id: str, parent_id: str, name: str, tags: Mapping[str, str]) -> Future:
        """Create the trial's run (RUNNING) in the background; the future gives its id."""
        self._start_renderer()  # its start (importing matplotlib) overlaps the trial
        future = self._submit(runs.create_child, experiment_id, parent_id, name, dict(tags))
        future.spec = {"experiment_id": experiment_id, "parent_id": parent_id, "name": name, "tags": dict(tags)}
        return future

    def finish(self, run: Future, params: Mapping[str, object], metrics: list[tuple[str, float, int]],
               plot_data: Mapping[str, Any] | None = None, files: Mapping[str, str | Path] | None = None,
               model: tuple[str | Path, np.ndarray, np.ndarray] | None = None) -> Path:
        """Journal a finished trial (see ``write_entry``), then write it to MLflow in the background."""
        start = time.perf_counter()
        # Never wait for the store here: the run may still be queued for creation behind earlier writes.
        entry = write_entry(self.folder, run.result() if run.done() else None, run.spec, params, metrics, plot_data,
                            files, model)
        self.blocked += time.perf_counter() - start
        self.submit(entry, run)
        return entry

    def submit(self, entry: Path, run: Future) -> Future:
        """Write a journaled trial (from ``write_entry``, maybe by another process) to MLflow in the background."""
        return self._submit(self._apply, Path(entry), run)

    def fail(self, run: Future, status: str, error: str, trace: str | None = None,
             params: Mapping[str, object] | None = None) -> None:
        """Close a trial's run as FAILED/KILLED with its error and params, now (after what was queued before)."""
        start = time.perf_counter()

        def close() -> None:
            if params:
                runs.log_params(run.result(), params)
            runs.end_run(run.result(), status, error, trace)

        try:
            try:
                self.flush()  # an earlier write that failed is reported, after this run is closed all the same
            finally:
                self._patiently(close)
        finally:
            self.blocked += time.perf_counter() - start

    def flush(self) -> None:
        """Wait until every queued write is done; raise the first error of a failed one."""
        start = time.perf_counter()
        with self._lock:
            pending, self._pending = self._pending, []
        try:
            system_metrics.drain()  # the trials' last samples too
            for future in pending:
                future.result()
        finally:
            self.blocked += time.perf_counter() - start

    def close(self) -> None:
        try:
            self.flush()
        finally:  # the writer's threads and the plot renderer end even when a write failed
            self._pool.shutdown()
            if self._renderer is not None:
                self._renderer.stdin.close()  # it exits at end of input; nothing to wait for
                self._renderer = None

    @property
    def gone(self) -> Exception | None:
        """The error of a tracking server that did not come back within TLSWEEP_STORE_WAIT, else None."""
        return self._gone

    # -- recovery --------------------------------------------------------------------------------

    def replay(self) -> list[str]:
        """Write out trials a killed process journaled but had not written yet; returns their run ids."""
        if not self.folder.is_dir():
            return []
        done = []
        for entry in sorted(p for p in self.folder.iterdir() if (p / ENTRY).is_file() and not p.name.startswith(".")):
            done.append(self._apply(entry))
        return done

    # -- the background thread -------------------------------------------------------------------

    def _submit(self, fn, *args) -> Future:
        start = time.perf_counter()
        future = self._pool.submit(self._timed, fn, *args)
        with self._lock:
            self._pending.append(future)
        self.blocked += time.perf_counter() - start
        return future

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return self._patiently(fn, *args)
        finally:
            self.busy += time.perf_counter() - start

    # -- a tracking server that stops answering ------------------------------------------------------

    def _patiently(self, fn, *args):
        """``fn(*args)``, once the tracking server answers; again if it stopped answering meanwhile."""
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
        if store_answers(uri):
            if self.store_down:
                self.store_down, self._gone = False, None
                self.say(f"[sweep] the tracking server {uri} answers again; the journaled trials are written to it")
            return
        if self._gone is not None:  # waited once already: the next writes fail at once, their trials journaled
            raise self._gone
        wait = self.wait
        if not self.store_down:
            self.store_down = True
            self.say(f"[sweep] the tracking server {uri} does not answer; finished trials are journaled in "
                     f"{self.folder} and written to it when it is back (waiting up to {wait:.0f} s, "
                     "TLSWEEP_STORE_WAIT)")
        deadline = time.monotonic() + wait
        while not _answers(uri):
            if time.monotonic() > deadline:
                self._gone = StoreGone(f"the tracking server {uri} did not answer for {wait:.0f} s (TLSWEEP_STORE_WAIT); "
                                f"the finished trials stay journaled in {self.folder}: start the server again and "
                                "run the same command, which writes them out first")
                raise self._gone
            time.sleep(1.0)
        self.store_down = False
        self.say(f"[sweep] the tracking server {uri} answers again; the journaled trials are written to it")

    def _start_renderer(self) -> None:
        if self._renderer is None or self._renderer.poll() is not None:
            root = str(Path(__file__).resolve().parents[1])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            self._renderer = subprocess.Popen([sys.executable, "-m", "tracking.plots"], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, text=True, env=env)

    def _render(self, data: Mapping[str, Any], folder: Path) -> None:
        """Start drawing the plots in a helper process (drawing never holds this process's GIL while it
        trains); ``_rendered`` waits for them."""
        self._start_renderer()
        self._renderer.stdin.write(json.dumps({"data": data, "folder": str(Path(folder).resolve())}) + "\n")
        self._renderer.stdin.flush()

    def _rendered(self, folder: Path) -> None:
        answer = self._renderer.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"drawing the plots of {folder} failed: {answer or 'the plot process died'}")

    def _apply(self, entry: Path, run: Future | None = None) -> str:
        record = json.loads((entry / ENTRY).read_text())
        run_id = record["run_id"] or (run.result() if run is not None else None)
        if run_id is None:  # replay: the dead process journaled the trial before its run existed
            spec = record["run"]
            run_id = runs.create_child(spec["experiment_id"], spec["parent_id"], spec["name"], spec["tags"])
        folder = entry / "plots"
        if record.get("plots") and self._drawing != entry:  # drawn while the store is written (once: if the
            if self._drawing is not None:  # server went away after this, the step is written again, the drawing not)
                with contextlib.suppress(Exception):  # an earlier entry failed before reading its answer
                    self._rendered(self._drawing)
            self._drawing = entry
            folder.mkdir(exist_ok=True)
            data = record["plots"]
            if data.get("grid_images"):
                data["grid_images"] = str((entry / data["grid_images"]).resolve())
            self._render(data, folder)
        client = MlflowClient()
        params = [Param(k, v) for k, v in sorted(record["params"].items())]
        metrics = [Metric(k, v, record["timestamp"], s) for k, v, s in record["metrics"]]
        for i in range(0, max(len(params), len(metrics)), 100):  # MLflow's limit: 100 params per batch
            client.log_batch(run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
        if record.get("tags"):
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in sorted(record["tags"].items())])
        if inputs := datasets.dataset_inputs(record["params"]):  # the splits as MLflow 3 datasets
            log_inputs(client, run_id, inputs)
        for name, artifact_path in record["files"].items():
            local = entry / name / Path(artifact_path).name
            if local.is_dir():
                client.log_artifacts(run_id, str(local), artifact_path)
            else:
                client.log_artifact(run_id, str(local), str(Path(artifact_path).parent) if "/" in artifact_path else None)
        if record.get("model"):
            from tracking import pyfunc

            pyfunc.log_export(run_id, str(entry / MODEL_DIR), np.load(entry / "sample.npy"),
                              np.load(entry / "output.npy"))
        if record.get("plots"):
            if self._drawing == entry:
                self._rendered(folder)
                self._drawing = None
            client.log_artifacts(run_id, str(folder), PLOTS_DIR)
        client.set_terminated(run_id, status="FINISHED")
        shutil.rmtree(entry)
        return run_id


class StoreGone(UserError):
    """The tracking server did not come back within ``store_wait()``."""


def store_wait() -> float:
    """``TLSWEEP_STORE_WAIT``: seconds to wait for a tracking server that stopped answering (default 600)."""
    raw = os.environ.get("TLSWEEP_STORE_WAIT", "")
    try:
        value = float(raw) if raw else 600.0
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"TLSWEEP_STORE_WAIT={raw!r} is not a number of seconds above 0; unset it for 600")
    return value


def _server(uri: str) -> str | None:
    """The health URL of an `mlflow server` store, None for other stores (a file or database here)."""
    return uri.rstrip("/") + "/health" if uri.startswith(("http://", "https://")) else None


def store_answers(uri: str) -> bool:
    """Whether the tracking store at ``uri`` can be reached now: a file or database store always; an `mlflow server`
    when its health check answers (a refused connection answers at once, instead of MLflow's minutes of retries)."""
    return _server(uri) is None or _answers(uri)


def _answers(uri: str, timeout: float = 3.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(_server(uri), timeout=timeout).read()
        return True
    except OSError:  # refused, reset, timed out (URLError is an OSError)
        return False
