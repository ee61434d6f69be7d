"""Where a trial runs: in the sweep's process, or in a fresh worker of a standard process pool.

TensorFlow keeps part of every model built in a process (keras-tuner #395, #873; here ~60 MB per fine-tuned
EfficientNet-Lite0, and ``clear_session`` does not give it back). So a trial that builds the whole network runs
in a worker of a ``ProcessPoolExecutor`` (spawn, one task per child), which returns all of it when it exits.
Trials run one at a time, but the pool has two workers: it replaces a worker when it exits, and (Python 3.11) starts
one more with each trial submitted while it has fewer than two. So from the third trial on one worker waits ready
(its initializer imported TensorFlow and mapped the data set) while the other trains, and the next trial does not
wait for Python and TensorFlow to start; the second trial's worker starts as the first trial ends.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import suppress
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a new worker imports this module first: TensorFlow only after its start-up lines are held back
    from pipeline.data import DataSplits
    from sweeps.trial import TrialResult, TrialSpec

_MAPPED: dict[int, dict[int, DataSplits]] = {}  # in a worker: seed -> image size -> data, mapped by the initializer


class TrialPool:
    """One trial at a time, each in a fresh process. ``hint``: a file naming the last trial's ``RunConfig``, whose
    data the next worker maps ahead of its trial."""

    def __init__(self, dataset: str, split: str | None, hint: str | Path):
        self.dataset, self.split, self.hint = dataset, split, Path(hint)
        # made when the pool closes: a worker still starting then ends itself (not a multiprocessing.Event: a worker
        # killed while waiting on one would leave it locked)
        self._closed = self.hint.with_name(f"{self.hint.name}.closed")
        self._pool: ProcessPoolExecutor | None = None

    def run(self, spec: TrialSpec) -> TrialResult:
        """Run the trial in a worker and wait for it; a worker that dies fails only its trial."""
        self.hint.write_text(spec.run.to_json())
        if self._pool is None:
            self._closed.unlink(missing_ok=True)
            self._pool = ProcessPoolExecutor(2, multiprocessing.get_context("spawn"), initializer=_warm,
                                             max_tasks_per_child=1, initargs=(
                                                 os.getpid(), str(self._closed), self.dataset, self.split,
                                                 str(self.hint)))
        future = self._pool.submit(_run, spec)
        workers = self._workers()  # the one that runs it among them, with its exit code if it dies
        try:
            return future.result()
        except BrokenProcessPool:
            from sweeps.trial import TrialFailed

            self.close()  # a broken pool takes no more work: the next trial gets a new one
            codes = [p.exitcode for p in workers if p.exitcode]  # the pool ends the others with SIGTERM
            raise TrialFailed(_death(next((c for c in codes if c != -signal.SIGTERM), codes[0] if codes else None)))

    def close(self) -> None:
        """End the pool and any worker still running (the sweep ended or was stopped)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        self._closed.touch()
        workers = self._workers(pool)
        for process in workers:
            with suppress(Exception):
                process.terminate()
        for process in workers:
            process.join(30)
            if process.is_alive():
                process.kill()
        # and a worker the pool started meanwhile (it replaces one that exits): it sees the closed file, or the
        # pool's stop sentinel, and ends; shutdown(wait=True) returns when every worker has
        pool.shutdown(wait=True, cancel_futures=True)

    def _workers(self, pool: ProcessPoolExecutor | None = None) -> list:
        """The pool's worker processes (``ProcessPoolExecutor`` has no public accessor before Python 3.14)."""
        pool = pool or self._pool
        return list((getattr(pool, "_processes", None) or {}).values()) if pool else []


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = "; the kernel kills a process this way when memory runs out" if -code == signal.SIGKILL else ""
        return f"the trial's process was killed by {name}{hint}"
    return f"the trial's process exited with code {code} and no result"


def _warm(parent: int, closed: str, dataset: str, split: str | None, hint: str) -> None:
    """A new worker: dies with the sweep or its pool, leaves Ctrl-C to the sweep, imports TensorFlow, maps the last
    trial's data."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep stops its trials; no traceback from here

    def watch() -> None:  # the sweep was killed (kill -9) or closed the pool: no orphan keeps training or waiting
        while os.getppid() == parent and not os.path.exists(closed):
            time.sleep(1.0)
        os._exit(137)

    threading.Thread(target=watch, daemon=True, name="tlsweep-parent-watch").start()
    from pipeline import tfstart

    tfstart.quiet_environment()
    tfstart.filter_stderr_for_good()  # TensorFlow's start-up lines, wherever in the trial they come
    from pipeline import recipe
    from pipeline.hparams import RunConfig
    from sweeps import trial  # noqa: F401 - imported here, before the worker's trial: TensorFlow, Keras, matplotlib
    with suppress(Exception):  # a guess: the trial loads its own data if this did not
        plan = recipe.plan(RunConfig.from_json(Path(hint).read_text()))
        # mapped from the image cache, never decoded here beside a trial that may be decoding them
        recipe.load_data_for(plan, dataset, split, _MAPPED.setdefault(plan.config.seed, {}), decode=False)
    atexit.register(_exit_now)  # after TensorFlow's own handlers are registered, so it runs before them


def _exit_now() -> None:
    """A worker's last step, its result sent: end without the interpreter's teardown of TensorFlow (1.4 s here).
    The pool joins an exited worker before it hands the next trial to the ready one, so the sweep would wait for it."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(0)


def _run(spec: TrialSpec) -> TrialResult:
    from sweeps import trial

    return trial.run(spec, _MAPPED.get(spec.run.seed, {}))  # the pool's data set and split are the trial's
