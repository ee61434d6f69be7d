"""The recorder: each finished trial's run is written once, in the background, and a kill loses none of them."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tracking import store
from tracking.layout import Record
from tracking.recorder import RECORD, Recorder

HISTORY = {"loss": [1.0, 0.5], "val_accuracy": [0.5, 0.75]}


def _experiment():
    exp = store.experiment_id("j")  # artifacts beside the test's database, not in the working directory
    parent = MlflowClient().create_run(exp).info.run_id
    MlflowClient().set_terminated(parent)  # only the trial runs matter here
    return exp, parent


def _record(folder):
    """What a trial hands over: plain values, and its files in its record folder."""
    (folder / "plots").mkdir()
    (folder / "plots" / "learning_curves.png").write_bytes(b"png")
    metrics = [(k, v, i) for k, vs in HISTORY.items() for i, v in enumerate(vs)] + [("test_accuracy", 0.7, 0)]
    return Record({"dropout": 0.2, "backbone": "x"}, metrics, {"tlsweep.cost_of": "keras"},
                  {"plots/learning_curves.png": "plots/learning_curves.png"})


def _check_written(run_id):
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"dropout": "0.2", "backbone": "x"}
    assert [m.value for m in client.get_metric_history(run_id, "val_accuracy")] == [0.5, 0.75]
    assert run.data.metrics["test_accuracy"] == 0.7 and run.data.tags["tlsweep.cost_of"] == "keras"
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/learning_curves.png"]


def test_a_finished_trial_is_written_once_in_the_background(tracking_store, tmp_path):
    exp, parent = _experiment()
    recorder = Recorder(tmp_path / "journal")
    run = recorder.open(exp, parent, "trial-0", {"kt.trial_id": "0"})
    assert MlflowClient().get_run(run.id).info.status == "RUNNING"
    folder = recorder.folder_for(run)
    written = recorder.finish(run, _record(folder), folder)
    assert written.result(60) == run.id
    recorder.close()
    _check_written(run.id)
    assert not list((tmp_path / "journal").iterdir()), "written records leave the journal"


def test_a_record_journaled_before_a_kill_is_written_on_restart(tracking_store, tmp_path, monkeypatch):
    exp, parent = _experiment()
    recorder = Recorder(tmp_path / "journal")
    run = recorder.open(exp, parent, "trial-0", {})
    monkeypatch.setattr(recorder._pool, "submit", lambda *args: None)  # the process dies before the thread writes
    folder = recorder.folder_for(run)
    recorder.finish(run, _record(folder), folder)
    (entry,) = (tmp_path / "journal").iterdir()
    assert json.loads((entry / RECORD).read_text())["run_id"] == run.id
    assert MlflowClient().get_run(run.id).info.status == "RUNNING"
    assert Recorder(tmp_path / "journal").replay() == [run.id]  # the next start
    _check_written(run.id)


def test_a_record_journaled_before_its_run_existed_gets_one_on_restart(tracking_store, tmp_path, monkeypatch):
    exp, parent = _experiment()
    recorder = Recorder(tmp_path / "journal")
    with monkeypatch.context() as server:
        server.setattr("tracking.recorder.store_answers", lambda uri: False)  # the server was down at the start
        run = recorder.open(exp, parent, "trial-0", {"kt.trial_id": "0"})
    assert run.id is None and recorder.store_down
    monkeypatch.setattr(recorder._pool, "submit", lambda *args: None)  # then the process died
    folder = recorder.folder_for(run)
    recorder.finish(run, _record(folder), folder)
    (run_id,) = Recorder(tmp_path / "journal").replay()
    _check_written(run_id)
    assert MlflowClient().get_run(run_id).data.tags["kt.trial_id"] == "0"


def test_half_written_files_of_a_trial_that_never_finished_are_dropped_on_restart(tracking_store, tmp_path):
    exp, parent = _experiment()
    recorder = Recorder(tmp_path / "journal")
    run = recorder.open(exp, parent, "trial-0", {})
    (recorder.folder_for(run) / "half.png").write_bytes(b"p")
    assert Recorder(tmp_path / "journal").replay() == []
    assert not list((tmp_path / "journal").iterdir())
    MlflowClient().set_terminated(run.id, "KILLED")  # the sweep's restart closes it (runs.close_orphans)


def test_a_failed_trial_is_closed_at_once_with_its_error(tracking_store, tmp_path):
    exp, parent = _experiment()
    recorder = Recorder(tmp_path / "journal")
    run = recorder.open(exp, parent, "trial-0", {})
    recorder.fail(run, "FAILED", "ValueError: bad", "Traceback ...", params={"dropout": 0.9})
    found = MlflowClient().get_run(run.id)
    assert found.info.status == "FAILED" and found.data.tags["error"] == "ValueError: bad"
    assert found.data.params == {"dropout": "0.9"}
    recorder.close()


def test_a_run_is_closed_as_killed_even_when_an_earlier_write_failed(tracking_store, tmp_path):
    exp, parent = _experiment()
    recorder = Recorder(tmp_path / "journal")
    run = recorder.open(exp, parent, "trial-1", {})

    def earlier_write_fails():
        raise RuntimeError("the previous trial's write failed")

    recorder._pending.append(recorder._pool.submit(earlier_write_fails))
    with pytest.raises(RuntimeError, match="the previous trial's write failed"):
        recorder.fail(run, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
    assert MlflowClient().get_run(run.id).info.status == "KILLED", "never left RUNNING"
    recorder.close()


def test_a_relative_journal_folder_works_from_any_working_directory(tracking_store, tmp_path, monkeypatch):
    exp, parent = _experiment()
    monkeypatch.chdir(tmp_path)
    recorder = Recorder("relative/journal")
    run = recorder.open(exp, parent, "trial-0", {})
    folder = recorder.folder_for(run)
    monkeypatch.chdir(tmp_path / "relative")
    recorder.finish(run, _record(folder), folder).result(60)
    _check_written(run.id)


def test_a_data_set_logged_by_two_processes_at_once_is_logged_again_when_it_lost_the_race(tracking_store):
    from tracking.datasets import dataset_inputs
    from tracking.recorder import log_inputs

    exp, _ = _experiment()
    inputs = dataset_inputs({"data_name": "flowers", "data_source": "/data/flowers", "data_fingerprint": "abc",
                             "split_spec": "75/15/10", "train_size": "3", "validation_size": "1", "test_size": "1"})
    assert len(inputs) == 3

    class LosesOnce:  # the real client, but its first call fails as the losing writer's did (message from a real run)
        def __init__(self, error: str):
            self.calls, self.error = 0, error

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:
                raise mlflow.exceptions.MlflowException(self.error)
            MlflowClient().log_inputs(run_id, datasets=datasets)

    run_id = MlflowClient().create_run(exp).info.run_id
    race = LosesOnce("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                     "datasets.name, datasets.digest")
    log_inputs(race, run_id, inputs)
    assert race.calls == 2 and len(MlflowClient().get_run(run_id).inputs.dataset_inputs) == 3
    other = LosesOnce("RESOURCE_DOES_NOT_EXIST: no such run")
    with pytest.raises(mlflow.exceptions.MlflowException, match="no such run"):
        log_inputs(other, run_id, inputs)
    assert other.calls == 1, "other errors are not retried"
    MlflowClient().set_terminated(run_id)
