"""Trials' SavedModels exported and logged off the training path, in one helper process per sweep.

Exporting a trial's model (building the full classifier, tracing and writing a SavedModel, logging it as a
pyfunc model) costs seconds to tens of seconds, against a second or two for a head trained on cached
features. So a trial that should log its model (``log_models: all``, or ``improving`` when it beat the
best so far) only keeps its checkpoint, which its journal entry logs to its run as ``best`` does;
``ModelExports`` then hands the run to a helper process (``python -m sweeps.exports``) that turns the
logged checkpoint into the SavedModel + pyfunc model (``sweeps.best.export_checkpoint``, the same code as
``make best-export``), while the next trial already trains. The helper runs in its own process so that
TensorFlow's tracing never holds the training process's GIL and the models it builds never stay in the
sweep's memory. A sweep that ends waits for the exports still queued (and says so); a killed one leaves
each trial with its logged checkpoint, from which ``make best-export`` builds the winner.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

HELPER_MODULE = "sweeps.exports"


class ModelExports:
    """A queue of runs whose models to export, worked off in order by one background thread and its helper."""

    def __init__(self, tracking_uri: str | None = None, say: Callable[[str], None] | None = None):
        self.tracking_uri = tracking_uri
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._helper: subprocess.Popen | None = None
        self._stop = False
        self.done: list[str] = []  # run ids whose model was logged
        self.failed: dict[str, str] = {}  # run id -> why its export failed
        self.busy = 0.0  # seconds the background thread spent exporting (helper start included)

    def submit(self, run: Future, written: Future | None = None) -> None:
        """Export the model of ``run`` (a future of its id) once ``written`` (the journal's write of the run,
        which logs its checkpoint) is done. Returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True, name="tlsweep-exports")
            self._thread.start()
        self._queue.put((run, written))

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def wait(self) -> float:
        """Wait for every queued export (saying so when there are some); returns the seconds waited."""
        if not self.pending:
            return 0.0
        start = time.perf_counter()
        self.say(f"[sweep] waiting for {self.pending} model export(s) (SavedModel + pyfunc model, written in a helper "
                 "process off the training path)")
        self._queue.join()
        waited = time.perf_counter() - start
        self.say(f"[sweep] model exports done in {waited:.1f}s")
        return waited

    def close(self, wait: bool = True) -> None:
        """End the helper, after the queued exports if ``wait``; without it (a killed sweep) they are dropped:
        each trial keeps its logged checkpoint, from which ``make best-export`` builds the model."""
        if wait:
            self.wait()
        else:
            self._stop = True
            dropped = 0
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
                dropped += 1
                self._queue.task_done()
            if dropped:
                self.say(f"[sweep] {dropped} model export(s) not done; those trials keep their logged checkpoint "
                         "(make best-export builds the winner's model from it)")
        helper, self._helper = self._helper, None
        if helper is not None and helper.poll() is None:
            helper.stdin.close()  # it exits at end of input
            try:
                helper.wait(5 if wait else 0.1)
            except subprocess.TimeoutExpired:
                helper.terminate()
                helper.wait()
        if helper is not None and helper.stdout is not None:
            helper.stdout.close()

    # -- the background thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            run, written = self._queue.get()
            start = time.perf_counter()
            try:
                if written is not None and not self._stop:
                    written.result()  # the run exists, with its checkpoint logged
                if not self._stop:  # a killed sweep starts no export, not even one that waited for its write
                    run_id = run.result()
                    error = self._export(run_id)
                    if error is None:
                        self.done.append(run_id)
                    else:
                        self.failed[run_id] = error
                        self.say(f"warning: the model of run {run_id} could not be exported ({error}); its checkpoint "
                                 "is logged, and make best-export builds the model from it")
            except Exception as e:  # noqa: BLE001 - the journal's write failed: the journal reports it
                self.failed[getattr(run, "spec", {}).get("name", "?")] = f"{type(e).__name__}: {e}"
            finally:
                self.busy += time.perf_counter() - start
                self._queue.task_done()

    def _export(self, run_id: str) -> str | None:
        """One export in the helper; None when it was logged, else the helper's reason."""
        helper = self._helper  # close() may drop it meanwhile (a killed sweep): this export keeps its own reference
        if helper is None or helper.poll() is not None:
            if self._stop:
                return "the sweep stopped before this export"
            import mlflow

            root = str(Path(__file__).resolve().parents[1])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                   "MLFLOW_TRACKING_URI": self.tracking_uri or mlflow.get_tracking_uri()}
            helper = self._helper = subprocess.Popen([sys.executable, "-m", HELPER_MODULE, str(os.getpid())], env=env,
                                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            helper.stdin.write(run_id + "\n")
            helper.stdin.flush()
            answer = helper.stdout.readline().strip()
        except (BrokenPipeError, OSError, ValueError) as e:  # ValueError: close() closed its pipes meanwhile
            return f"the export process ended: {e}"
        if answer == "ok":
            return None
        return answer.removeprefix("error ") or f"the export process ended with code {helper.poll()}"


def main(argv: list[str]) -> int:
    """``python -m sweeps.exports <sweep pid>``: export the runs named on stdin, one line each; answer ``ok``
    or ``error <reason>`` on stdout, one line each."""
    from sweeps.trial import _exit_with

    _exit_with(int(argv[0]))
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # TensorFlow's and MLflow's chatter must not mix with the answers

    import keras
    from mlflow.tracking import MlflowClient

    from sweeps.best import export_checkpoint
    from tracking import store

    store.quiet_store_logs()
    for line in sys.stdin:
        run_id = line.strip()
        if not run_id:
            continue
        try:
            export_checkpoint(MlflowClient().get_run(run_id))
            answer = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the sweep, which goes on
            answer = "error " + f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
        finally:
            keras.backend.clear_session()
        real_stdout.write(answer + "\n")
        real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
