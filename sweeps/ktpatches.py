"""Every override of Keras Tuner's internals, in one place, each with why, checked against the tested versions.

Keras Tuner 1.4 leaves gaps that a sweep meets: a chief that forgets workers, a worker that hammers an idle chief,
a restarted chief that reruns trials, a debug print, tracebacks for every failed trial, and oracles that draw
the default point only by chance. Each patch below fills one; ``apply()`` (called when ``sweeps.tuner`` is
imported) refuses a keras-tuner it was not tested with, and ``tests/system/test_ktpatches.py`` fails when a patch stops
taking effect. Nothing outside this module touches ``keras_tuner.src`` or a private Keras Tuner attribute.
"""

from __future__ import annotations

import json
import os
import time
import types
from pathlib import Path
from typing import Any, Callable

import grpc
import keras_tuner as kt
from keras_tuner import synchronized

from pipeline.errors import UserError, typed

TESTED = ("1.4.7", "1.4.8")  # keras-tuner versions these patches were written and tested against


def apply() -> None:
    """Check the installed keras-tuner, then apply the module-wide patches (idempotent)."""
    if kt.__version__ not in TESTED:
        raise UserError(f"keras-tuner {kt.__version__} is installed, but tlsweep patches its internals and was tested "
                        f"with {', '.join(TESTED)} only; install one of them: pip install 'keras-tuner=={TESTED[-1]}'")
    from keras_tuner.src import config as kt_config
    from keras_tuner.src.engine import conditions

    # Keras Tuner prints every failed trial's traceback (config.DEBUG is True by default); a failed trial here prints
    # one line with its reason, and its traceback goes to MLflow (error.txt) and, with --verbose, the screen.
    kt_config.DEBUG = False
    # keras-tuner 1.4.7 left a debug ``print`` in ``Parent.to_proto``: the chief and workers printed "True" for every
    # conditional hyperparameter sent over gRPC. That module has no other print; silence it there only.
    conditions.print = lambda *args, **kwargs: None


def standalone(oracle: kt.Oracle, folder: str, name: str) -> kt.Oracle:
    """An oracle driven without a tuner (a benchmark of the search alone): Keras Tuner sets its folder only from
    a tuner, through a private method."""
    oracle._set_project_dir(folder, name)
    return oracle


def distributed_role() -> str:
    """``single``, or Keras Tuner's ``chief`` / ``worker`` when its distributed environment is set."""
    from keras_tuner.src.distribute import utils as dist

    if not dist.has_chief_oracle():
        return "single"
    return "chief" if dist.is_chief_oracle() else "worker"


class DefaultFirst:
    """Mixin for an oracle: a search's first trial is the space's default point, the baseline run every other
    trial is measured against (Keras Tuner's random and Bayesian oracles would draw it at random, and a short
    sweep might never try the configuration its author chose as the default)."""

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        if self.trials:  # resumed, retried or distributed: only a search with no trial yet starts here
            return super().populate_space(trial_id)
        hps = kt.HyperParameters()
        values = {}
        for hp in self.hyperparameters.space:  # as Keras Tuner's own draws: active values only
            hps.merge([hp])
            if hps.is_active(hp):
                values[hp.name] = hp.default
        return {"status": kt.engine.trial.TrialStatus.RUNNING, "values": values}



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
def requeue(oracle: kt.Oracle, worker: str, trial_id: str) -> bool:
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


class ChiefFinished(kt.errors.FatalError):
    """The chief ended the sweep while this worker waited for it: nothing is left to run (the worker ends well)."""


# gRPC backs off up to 120 s between attempts to reach a server that was down: a worker could miss a restarted
# chief that finishes the sweep within that gap (seen in CI). A chief on the same network is retried every 2 s.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
             ("grpc.max_reconnect_backoff_ms", 2000)]


class _PatientStub:
    """Keras Tuner's gRPC stub to the chief, but a call waits for a chief that does not answer at most
    ``timeout`` seconds (saying so once), and is sent again if the connection broke while it was out. While it
    waits, ``finished()`` says whether the chief ended the sweep meanwhile (its parent run FINISHED): then the
    worker stops, as when the chief tells it to."""

    PROBE = 10.0  # seconds: an answering chief connects well within this

    def __init__(self, address: str, worker: str, timeout: float, say: Callable[[str], None] = print,
                 finished: Callable[[], bool] = lambda: False):
        from keras_tuner.src import protos

        self.address, self.worker, self.timeout, self.say, self.finished = address, worker, timeout, say, finished
        self.channel = grpc.insecure_channel(address, options=RECONNECT)
        self.stub = protos.get_service_grpc().OracleStub(self.channel)
        self.lost = False  # the chief did not answer; said so

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + self.timeout
            while True:
                self._wait_for_chief(deadline)
                try:
                    # not wait_for_ready: a call made just as the chief died would wait silently for the whole
                    # timeout; failing fast brings it back here, to say so and wait for the chief
                    return method(request, wait_for_ready=False, timeout=max(deadline - time.monotonic(), self.PROBE))
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
        while not self._ready(min(self.PROBE, deadline - time.monotonic())):
            if self.finished():
                raise ChiefFinished(f"worker {self.worker}: the chief finished the sweep while this worker waited "
                                    "for it; nothing is left to run")
            if time.monotonic() >= deadline:
                self._gone()
        self.lost = False
        self.say(f"worker {self.worker}: the chief answers again; carrying on")

    def _gone(self) -> None:
        raise ChiefGone(f"the chief at {self.address} did not answer for {self.timeout:.0f} s "
                        "(TLSWEEP_CHIEF_TIMEOUT); start it again with the same command (make sweep-chief), then this "
                        f"worker (the same {typed('--worker ', 'WORKER=')}{self.worker}): it reruns the trial it was running if that did not finish")


def reconnecting(client: Any, timeout: float, finished: Callable[[], bool]) -> None:
    """On a worker: ``client`` (Keras Tuner's ``OracleClient``) waits for a chief that does not answer at most
    ``timeout`` seconds, says so once, and carries on when the chief is back, or stops if ``finished()``."""
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    client.stub = _PatientStub(address, client.tuner_id, timeout,
                               say=lambda line: print(line, flush=True), finished=finished)


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
