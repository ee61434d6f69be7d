"""Distributed sweeps: a worker that dies mid-trial does not hold the sweep up.

Keras Tuner's chief keeps a trial assigned to its worker's id until that worker reports it, so a
worker that dies is waited for forever (unless restarted with the same id). Here each worker stamps
its trial's MLflow run every ``heartbeat_seconds()`` (``Heartbeat``), and the chief's
``WorkerMonitor`` hands a trial whose run has not been stamped for ``worker_timeout()`` seconds to
the next worker that asks, after closing the silent worker's run as KILLED. Both read the
environment: ``TLSWEEP_HEARTBEAT_SECONDS`` (default 30) and ``TLSWEEP_WORKER_TIMEOUT`` (default 600).

The overrides of Keras Tuner's own distributed mode (an idle worker that waits, a restarted chief that keeps
its workers' trials, a worker that waits for its chief ``chief_timeout()`` seconds: ``TLSWEEP_CHIEF_TIMEOUT``,
default 600) are in ``sweeps.ktpatches``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import keras_tuner as kt

from pipeline.errors import UserError
from pipeline.settings import environment
from sweeps import ktpatches
from tracking import runs


def heartbeat_seconds() -> float:
    return environment().heartbeat_seconds


def worker_timeout() -> float:
    return environment().worker_timeout


def chief_timeout() -> float:
    return environment().chief_timeout


class _Periodic:
    """Calls ``tick()`` on a daemon thread every ``interval`` seconds (the first at once if ``at_start``),
    from entering a ``with`` block until leaving it."""

    def __init__(self, interval: float, at_start: bool, name: str):
        self.interval, self._at_start = interval, at_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def __enter__(self) -> "_Periodic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        if not self._at_start and self._stop.wait(self.interval):
            return
        while True:
            self.tick()
            if self._stop.wait(self.interval):
                return

    def tick(self) -> None:
        raise NotImplementedError


class Heartbeat(_Periodic):
    """While a worker runs a trial, stamp the trial's run from a thread (``with Heartbeat(run, 30):``)."""

    def __init__(self, run: Any, interval: float):
        super().__init__(interval, at_start=True, name="tlsweep-heartbeat")
        self.run = run  # a tracking.recorder.Run: no id while the tracking server is down

    def tick(self) -> None:
        if self.run.id is None:
            return
        try:
            runs.stamp(self.run.id)
        except Exception as e:  # noqa: BLE001 - a store hiccup; the next beat tries again
            print(f"warning: heartbeat of run {self.run.id} not written ({type(e).__name__}: {e})", file=sys.stderr)


class WorkerMonitor(_Periodic):
    """The chief's watch over ongoing trials; ``check()`` requeues those of silent workers."""

    def __init__(self, oracle: kt.Oracle, experiment_id: str, parent_id: str, timeout: float,
                 interval: float | None = None):
        super().__init__(interval or min(timeout / 4, 30.0), at_start=False, name="tlsweep-worker-monitor")
        self.oracle, self.experiment_id, self.parent_id, self.timeout = oracle, experiment_id, parent_id, timeout
        self._seen: dict[tuple[str, str], float] = {}  # (worker, trial) -> when the chief first saw it running

    def tick(self) -> None:
        try:
            self.check()
        except Exception as e:  # noqa: BLE001 - the store did not answer; look again next time
            print(f"warning: could not check the workers ({type(e).__name__}: {e})", file=sys.stderr)

    def check(self, now: float | None = None) -> list[str]:
        """Requeue the trials whose worker has been silent for longer than the timeout; returns their ids."""
        now = time.time() if now is None else now
        requeued = []
        for worker, trial in list(self.oracle.ongoing_trials.items()):
            first = self._seen.setdefault((worker, trial.trial_id), now)
            stamp = runs.last_stamp(self.experiment_id, self.parent_id, worker, trial.trial_id)
            silent = now - max(first, stamp or 0.0)
            if silent <= self.timeout:
                continue
            if ktpatches.requeue(self.oracle, worker, trial.trial_id):
                reason = (f"chief: worker {worker} sent no heartbeat for {silent:.0f} s; "
                          "its trial went to another worker")
                runs.close_orphans(self.experiment_id, self.parent_id, worker=worker, trial=trial.trial_id,
                                   reason=reason)
                print(f"chief: worker {worker} has been silent for {silent:.0f} s (TLSWEEP_WORKER_TIMEOUT="
                      f"{self.timeout:.0f}); trial {trial.trial_id} goes to the next worker that asks", flush=True)
                requeued.append(trial.trial_id)
        return requeued


