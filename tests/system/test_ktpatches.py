"""Every Keras Tuner override (sweeps/ktpatches.py) still takes effect: each test fails if its patch stops working."""

import time

import grpc
import keras_tuner as kt
import pytest

from pipeline.errors import UserError
from support import random_oracle
from sweeps import ktpatches
from sweeps.ktpatches import ChiefFinished, ChiefGone, _PatientStub, keep_ongoing, requeue, wait_for_running_trials


def test_an_untested_keras_tuner_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(kt, "__version__", "1.5.0")
    with pytest.raises(UserError) as e:
        ktpatches.apply()
    assert str(e.value) == ("keras-tuner 1.5.0 is installed, but tlsweep patches its internals and was tested with "
                            "1.4.7, 1.4.8 only; install one of them: pip install 'keras-tuner==1.4.8'")


def test_a_failed_trial_does_not_print_keras_tuners_traceback():
    from keras_tuner.src import config as kt_config

    ktpatches.apply()
    assert kt_config.DEBUG is False


def test_the_first_trial_of_a_search_is_the_default_point(tmp_path):
    from sweeps.tuner import RandomSearchOracle

    oracle = RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=3, seed=1)
    oracle._set_project_dir(str(tmp_path), "p")
    hp = kt.HyperParameters()
    hp.Float("learning_rate", 1e-4, 1e-1, sampling="log", default=3e-3)
    hp.Boolean("fine_tune", default=False)
    with hp.conditional_scope("fine_tune", [True]):
        hp.Int("fine_tune_epochs", 1, 9, default=4)
    oracle.update_space(hp)
    assert oracle.create_trial("t").hyperparameters.values == {"learning_rate": 3e-3, "fine_tune": False}


class _Tiny(ktpatches.WaitsWhenIdle, kt.engine.base_tuner.BaseTuner):
    idle_wait = 0.2

    def run_trial(self, trial, *args, **kwargs):
        return {"val_accuracy": 0.5}


def test_a_worker_with_nothing_to_run_waits_instead_of_asking_without_end(tmp_path, capsys):
    # A grid search has one point; another worker holds it. Until that trial ends the oracle answers IDLE,
    # and Keras Tuner's loop would ask again at once (about 22,000 requests a second, measured without the wait).
    oracle = kt.oracles.GridSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=5)
    tuner = _Tiny(oracle=oracle, hypermodel=lambda hp: hp.Choice("dropout", [0.1]), directory=str(tmp_path),
                  project_name="p")
    held = oracle.create_trial("other")
    asked = []
    create_trial = oracle.create_trial

    def ask(tuner_id):
        asked.append(time.monotonic())
        if len(asked) == 3:  # the other worker reports first: this answer is STOPPED
            held.status = "COMPLETED"
            oracle.update_trial(held.trial_id, {"val_accuracy": 0.9})
            oracle.end_trial(held)
        return create_trial(tuner_id)

    oracle.create_trial = ask
    tuner.search()
    assert len(asked) == 3  # IDLE, IDLE, then STOPPED once the other trial ended
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert min(gaps) >= 0.2, gaps  # it waited idle_wait before asking again
    assert capsys.readouterr().out.count("no trial to run until one running on another worker ends") == 1


def test_sending_a_conditional_space_to_workers_prints_nothing(capsys):
    from keras_tuner.src.engine import conditions

    ktpatches.apply()
    proto = conditions.Parent("fine_tune", [True]).to_proto()  # keras-tuner 1.4.7 printed "True" here
    assert list(proto.parent.values)[0].boolean_value is True
    assert capsys.readouterr().out == ""


def test_a_worker_with_no_trial_left_waits_while_another_workers_trial_runs(tmp_path):
    """Keras Tuner answers STOPPED once max_trials trials exist; had w2 stopped then, w1's trial, requeued when w1
    fell silent, would have gone to nobody. w2 waits (IDLE) until no trial runs, and takes a requeued one."""
    oracle = random_oracle(tmp_path)
    wait_for_running_trials(oracle)
    t0, t1, t2 = (oracle.create_trial(w) for w in ("w1", "w2", "w3"))
    oracle.end_trial(t1)
    oracle.end_trial(t2)
    assert oracle.create_trial("w2").status == kt.engine.trial.TrialStatus.IDLE  # all 3 exist; w1's still runs
    assert "w2" in oracle.tuner_ids
    assert requeue(oracle, "w1", t0.trial_id)  # w1 fell silent
    again = oracle.create_trial("w2")
    assert again.trial_id == t0.trial_id and again.status == kt.engine.trial.TrialStatus.RUNNING
    oracle.end_trial(again)
    assert oracle.create_trial("w2").status == kt.engine.trial.TrialStatus.STOPPED  # nothing runs anywhere
    assert oracle.create_trial("w3").status == kt.engine.trial.TrialStatus.STOPPED


def test_a_restarted_chief_gives_running_trials_back_to_their_workers_and_reruns_no_finished_one(tmp_path):
    import keras_tuner as kt

    def oracle() -> kt.Oracle:
        o = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=10, seed=1)
        o.hyperparameters.Float("dropout", 0.0, 0.5)
        o._set_project_dir(str(tmp_path), "s")
        return o

    before = oracle()
    first, second = before.create_trial("w1"), before.create_trial("w2")
    second.status = "COMPLETED"
    before.update_trial(second.trial_id, {"val_accuracy": 0.5})
    before.end_trial(second)  # Keras Tuner saves here with the trial still among the ongoing ones; then the chief dies
    after = oracle()
    after.reload()
    assert after._retry_queue == [first.trial_id, second.trial_id], "Keras Tuner alone would run both again"
    assert keep_ongoing(after) == [first.trial_id]
    assert after._retry_queue == [] and after.ongoing_trials == {"w1": after.trials[first.trial_id]}
    assert after.create_trial("w1").trial_id == first.trial_id, "w1, still running it, keeps its trial"
    assert after.create_trial("w3").trial_id not in (first.trial_id, second.trial_id), "a new trial for the next one"


def test_a_worker_waits_for_a_chief_that_does_not_answer_a_bounded_time_saying_so_once():
    from keras_tuner.src import protos

    from tracking.server import free_port

    lines = []
    stub = _PatientStub(f"127.0.0.1:{free_port()}", "w1", timeout=2, say=lines.append)  # no chief there
    stub.PROBE = 0.5
    started = time.monotonic()
    with pytest.raises(ChiefGone) as e:
        stub.GetSpace(protos.get_service().GetSpaceRequest())
    assert time.monotonic() - started < 10
    assert lines == [f"worker w1: the chief at {stub.address} does not answer; waiting up to 2 s "
                     "(TLSWEEP_CHIEF_TIMEOUT) for it to come back: start it again with the same command "
                     "(make sweep-chief) and this worker carries on"]
    assert str(e.value) == (f"the chief at {stub.address} did not answer for 2 s (TLSWEEP_CHIEF_TIMEOUT); start it "
                            "again with the same command (make sweep-chief), then this worker (the same --worker w1): "
                            "it reruns the trial it was running if that did not finish")


CHIEF = """
import sys, time
from concurrent import futures
import grpc
from keras_tuner.src import protos

class Chief(protos.get_service_grpc().OracleServicer):
    def GetSpace(self, request, context):
        return protos.get_service().GetSpaceResponse()

server = grpc.server(futures.ThreadPoolExecutor(1))
protos.get_service_grpc().add_OracleServicer_to_server(Chief(), server)
server.add_insecure_port(sys.argv[1])
server.start()
print("serving", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_worker_whose_chief_is_killed_between_two_calls_says_so_and_does_not_wait_silently():
    """The chief answered, then was killed (SIGKILL): the next call, made while the channel still looks ready, comes
    back at once and the worker says it waits, rather than waiting out the whole timeout without a word (seen in
    CI: a worker gave up after 300 s having said nothing)."""
    import subprocess
    import sys

    from keras_tuner.src import protos

    from tracking.server import free_port

    address = f"127.0.0.1:{free_port()}"
    chief = subprocess.Popen([sys.executable, "-c", CHIEF, address], stdout=subprocess.PIPE, text=True)
    try:
        assert chief.stdout.readline().strip() == "serving"
        lines = []
        stub = _PatientStub(address, "w1", timeout=4, say=lines.append)
        stub.PROBE = 0.5
        stub.GetSpace(protos.get_service().GetSpaceRequest())  # the chief answers
    finally:
        chief.kill()  # and dies
        chief.wait()
    started = time.monotonic()
    with pytest.raises(ChiefGone):
        stub.GetSpace(protos.get_service().GetSpaceRequest())
    assert lines and lines[0].startswith(f"worker w1: the chief at {address} does not answer; waiting up to 4 s")
    assert time.monotonic() - started == pytest.approx(4, abs=3), "it waited the timeout, having said so"


def test_a_worker_that_waits_for_a_chief_which_finished_the_sweep_meanwhile_stops_without_an_error():
    """A restarted chief ran the sweep's last trials on other workers and ended (its parent run FINISHED) before
    this worker reached it: the worker ends as if told to stop, not after the timeout with an error (seen in CI)."""
    from keras_tuner.src import protos

    from tracking.server import free_port

    asked = []
    stub = _PatientStub(f"127.0.0.1:{free_port()}", "w2", timeout=60, say=lambda line: None,
                        finished=lambda: asked.append(1) or len(asked) >= 2)  # no chief there; ended at the 2nd look
    stub.PROBE = 0.5
    started = time.monotonic()
    with pytest.raises(ChiefFinished) as e:
        stub.GetSpace(protos.get_service().GetSpaceRequest())
    assert time.monotonic() - started < 10, "it looked every PROBE seconds, not once at the timeout"
    assert str(e.value) == ("worker w2: the chief finished the sweep while this worker waited for it; nothing is left "
                            "to run")


def _serve(address):
    import subprocess
    import sys

    chief = subprocess.Popen([sys.executable, "-c", CHIEF, address], stdout=subprocess.PIPE, text=True)
    assert chief.stdout.readline().strip() == "serving"
    return chief


@pytest.mark.slow
def test_a_worker_reaches_a_chief_started_again_after_a_long_absence_within_seconds():
    """gRPC's own backoff grows to 120 s between attempts: a worker could miss a restarted chief that finished the
    sweep within that gap and then wait out its timeout (seen in CI). Retried every 2 s at most, it reaches it."""
    import threading

    from keras_tuner.src import protos

    from tracking.server import free_port

    address = f"127.0.0.1:{free_port()}"
    chief = _serve(address)
    stub = _PatientStub(address, "w1", timeout=120, say=lambda line: None)
    stub.GetSpace(protos.get_service().GetSpaceRequest())
    chief.kill()
    chief.wait()
    answered = []
    call = threading.Thread(target=lambda: answered.append(stub.GetSpace(protos.get_service().GetSpaceRequest())))
    call.start()
    time.sleep(40)  # the worker has tried again and again meanwhile: gRPC's own backoff reaches about 20-40 s here
    assert call.is_alive() and not answered
    chief = _serve(address)
    try:
        back = time.monotonic()
        call.join(timeout=30)
        assert answered, "the worker never reached the chief started again"
        assert time.monotonic() - back < 5
    finally:
        chief.kill()
        chief.wait()
