"""Distributed sweeps: a worker that dies mid-trial does not hold the sweep up.

Keras Tuner's chief keeps a trial assigned to its worker's id until that worker reports it, so a
worker that dies is waited for forever (unless restarted with the same id). Here each worker stamps
its trial's MLflow run every ``heartbeat_seconds()`` (``Heartbeat``), and the chief's
``WorkerMonitor`` hands a trial whose run has not been stamped for ``worker_timeout()`` seconds to
the next worker that asks, after closing the silent worker's run as KILLED. Both read the
environment: ``TLSWEEP_HEARTBEAT_SECONDS`` (default 30) and ``TLSWEEP_WORKER_TIMEOUT`` (default 600).

A worker the chief has no trial for yet (a grid or Hyperband search waiting on another worker's
result) would ask again at once, without end; ``WaitsWhenIdle`` makes it say so and ask every few seconds.

A chief killed and started again (the same command): Keras Tuner's workers would wait for it for an hour
without a word, and the restarted chief would hand the trials its workers were running to the next worker
that asks (``Oracle.reload`` queues every ongoing trial for a retry, finished ones included), so they ran twice.
``reconnecting`` makes a worker say once that the chief does not answer and wait ``chief_timeout()`` seconds
(``TLSWEEP_CHIEF_TIMEOUT``, default 600) for it; ``keep_ongoing`` gives the restarted chief back the trials its
workers are still running.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import grpc
import keras_tuner as kt
from keras_tuner.src.engine import conditions
from keras_tuner import synchronized

from pipeline.errors import UserError
from tracking import runs


def heartbeat_seconds() -> float:
    return _seconds("TLSWEEP_HEARTBEAT_SECONDS", 30.0)


def worker_timeout() -> float:
    return _seconds("TLSWEEP_WORKER_TIMEOUT", 600.0)


def chief_timeout() -> float:
    return _seconds("TLSWEEP_CHIEF_TIMEOUT", 600.0)


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{name}={raw!r} is not a number of seconds above 0; unset it for {default:.0f}")
    return value


# keras-tuner 1.4.7 left a debug ``print`` in ``Parent.to_proto``: the chief and workers printed "True" for
# every conditional hyperparameter sent over gRPC. That module has no other print; silence it there only.
conditions.print = lambda *args, **kwargs: None

IDLE_WAIT_SECONDS = 2.0


class WaitsWhenIdle:
    """A tuner mixin: when the oracle had no trial for us (IDLE), wait before asking again.

    Keras Tuner's search loop asks the oracle again at once after an IDLE answer: on a worker that is a
    stream of requests to the chief, one CPU core busy on each side, for as long as another worker's trial
    runs. ``pre_create_trial`` runs before each request, ``on_trial_begin`` once a trial came.
    """

    idle_wait: float = IDLE_WAIT_SECONDS
    _asked = False  # a request is out with no trial begun since: the oracle answered IDLE
    _waiting = False  # the wait has been announced

    def pre_create_trial(self) -> None:
        if self._asked:
            if not self._waiting:
                print(f"worker {self.tuner_id}: no trial to run until one running on another worker ends "
                      f"(the search needs its result); asking the chief every {self.idle_wait:g} s", flush=True)
                self._waiting = True
            time.sleep(self.idle_wait)
        self._asked = True
        super().pre_create_trial()

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        self._asked = self._waiting = False
        super().on_trial_begin(trial)


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

    def __init__(self, run: Future, interval: float):
        super().__init__(interval, at_start=True, name="tlsweep-heartbeat")
        self.run = run

    def tick(self) -> None:
        try:
            run_id = self.run.result()
        except Exception:  # noqa: BLE001 - the trial reports a run that could not be created
            return
        try:
            runs.stamp(run_id)
        except Exception as e:  # noqa: BLE001 - a store hiccup; the next beat tries again
            print(f"warning: heartbeat of run {run_id} not written ({type(e).__name__}: {e})", file=sys.stderr)


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
            if _requeue(self.oracle, worker, trial.trial_id):
                reason = (f"chief: worker {worker} sent no heartbeat for {silent:.0f} s; "
                          "its trial went to another worker")
                runs.close_orphans(self.experiment_id, self.parent_id, worker=worker, trial=trial.trial_id,
                                   reason=reason)
                print(f"chief: worker {worker} has been silent for {silent:.0f} s (TLSWEEP_WORKER_TIMEOUT="
                      f"{self.timeout:.0f}); trial {trial.trial_id} goes to the next worker that asks", flush=True)
                requeued.append(trial.trial_id)
        return requeued


def wait_for_running_trials(oracle: kt.Oracle) -> None:
    """On the chief: a worker that asks when the search has no trial left waits (IDLE, see ``WaitsWhenIdle``) while
    another worker's trial still runs, instead of stopping. Keras Tuner answers STOPPED as soon as ``max_trials``
    trials exist (or the grid is done), so the surviving workers of a sweep stopped before a dead worker's trial was
    requeued (``WorkerMonitor``, after the timeout), and nobody ran it: seen in a test whose trials were short. A
    worker stops once no trial runs anywhere."""
    create = oracle.create_trial

    @synchronized
    def create_trial(self: kt.Oracle, tuner_id: str) -> kt.engine.trial.Trial:
        trial = create(tuner_id)
        if trial.status == kt.engine.trial.TrialStatus.STOPPED and any(w != tuner_id for w in self.ongoing_trials):
            self.tuner_ids.add(tuner_id)  # Keras Tuner forgot the worker it told to stop: it is still in the search
            return kt.engine.trial.Trial(self.hyperparameters.copy(), trial_id=trial.trial_id,
                                         status=kt.engine.trial.TrialStatus.IDLE)
        return trial

    oracle.create_trial = types.MethodType(create_trial, oracle)


@synchronized
def _requeue(oracle: kt.Oracle, worker: str, trial_id: str) -> bool:
    """Under the oracle's lock: take the trial from the worker and queue it for the next one (as Keras
    Tuner's own retry queue does); forget the worker, which would otherwise keep the chief waiting."""
    trial = oracle.ongoing_trials.get(worker)
    if trial is None or trial.trial_id != trial_id:  # it ended meanwhile
        return False
    del oracle.ongoing_trials[worker]
    oracle.tuner_ids.discard(worker)
    oracle._retry_queue.append(trial_id)
    oracle.save()
    return True


# -- a chief that dies and is started again --------------------------------------------------------------


class ChiefGone(UserError, kt.errors.FatalError):
    """The chief did not come back in time: the worker stops (a FatalError: not one trial's failure)."""


class _PatientStub:
    """Keras Tuner's gRPC stub to the chief, but a call waits for a chief that does not answer at most
    ``timeout`` seconds (saying so once), and is sent again if the connection broke while it was out."""

    PROBE = 10.0  # seconds: an answering chief connects well within this

    def __init__(self, address: str, worker: str, timeout: float, say: Callable[[str], None] = print):
        from keras_tuner.src import protos

        self.address, self.worker, self.timeout, self.say = address, worker, timeout, say
        self.channel = grpc.insecure_channel(address)
        self.stub = protos.get_service_grpc().OracleStub(self.channel)
        self.lost = False  # the chief did not answer; said so

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + self.timeout
            while True:
                self._wait_for_chief(deadline)
                try:
                    return method(request, wait_for_ready=True, timeout=max(deadline - time.monotonic(), self.PROBE))
                except grpc.RpcError as e:  # the chief died while the request was out: ask again once it is back
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    if time.monotonic() > deadline:
                        self._gone()

        return call

    def _ready(self, seconds: float) -> bool:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=max(seconds, 0.01))
            return True
        except grpc.FutureTimeoutError:
            return False

    def _wait_for_chief(self, deadline: float) -> None:
        if self._ready(0 if self.lost else self.PROBE):
            if self.lost:
                self.lost = False
                self.say(f"worker {self.worker}: the chief answers again; carrying on")
            return
        if not self.lost:
            self.lost = True
            self.say(f"worker {self.worker}: the chief at {self.address} does not answer; waiting up to "
                     f"{self.timeout:.0f} s (TLSWEEP_CHIEF_TIMEOUT) for it to come back: start it again with the same "
                     "command (make sweep-chief) and this worker carries on")
        if not self._ready(deadline - time.monotonic()):
            self._gone()
        self.lost = False
        self.say(f"worker {self.worker}: the chief answers again; carrying on")

    def _gone(self) -> None:
        raise ChiefGone(f"the chief at {self.address} did not answer for {self.timeout:.0f} s "
                        "(TLSWEEP_CHIEF_TIMEOUT); start it again with the same command (make sweep-chief), then this "
                        f"worker (the same WORKER={self.worker}): it reruns the trial it was running if that did not finish")


def reconnecting(client: Any, timeout: float) -> None:
    """On a worker: ``client`` (Keras Tuner's ``OracleClient``) waits for a chief that does not answer at most
    ``timeout`` seconds, says so once, and carries on when the chief is back."""
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    client.stub = _PatientStub(address, client.tuner_id, timeout,
                               say=lambda line: print(line, flush=True))


def keep_ongoing(oracle: kt.Oracle) -> list[str]:
    """On a restarted chief: give each worker back the trial it was running when the chief died.

    Keras Tuner's ``Oracle.reload`` empties the ongoing trials into the retry queue: a worker still running
    its trial would see it handed to another worker, and a trial that had just finished (the chief saves
    before it drops a finished trial from the ongoing ones) would run again. Here a trial still RUNNING goes
    back to its worker (if that worker is dead, ``WorkerMonitor`` requeues it after ``worker_timeout()``, as
    when the chief is alive); one that had ended is not rerun. Returns the trial ids given back.
    """
    path = Path(oracle._get_oracle_fname())
    saved = json.loads(path.read_text()).get("ongoing_trials", {}) if path.is_file() else {}
    kept = []
    for worker, trial_id in saved.items():
        queue = oracle._retry_queue
        if trial_id in queue:  # reload appended it last
            del queue[len(queue) - 1 - queue[::-1].index(trial_id)]
        trial = oracle.trials.get(trial_id)
        if trial is None or trial.status != kt.engine.trial.TrialStatus.RUNNING:
            continue  # it ended before the chief died: not run again
        oracle.ongoing_trials[worker] = trial
        oracle.tuner_ids.add(worker)
        kept.append(trial_id)
    return kept
