"""The MLflow journal: trials reach MLflow in the background, and a kill loses none of them."""

from concurrent.futures import Future

import numpy as np
from mlflow.tracking import MlflowClient

from tracking import store
from tracking.journal import TrialJournal

HISTORY = {"loss": [1.0, 0.5], "val_accuracy": [0.5, 0.75]}


def _experiment():
    exp = store.experiment_id("j")  # artifacts beside the test's database, not in the working directory
    parent = MlflowClient().create_run(exp).info.run_id
    MlflowClient().set_terminated(parent)  # only the trial runs matter here
    return exp, parent


def _finish(journal, run):
    metrics = [(k, v, i) for k, vs in HISTORY.items() for i, v in enumerate(vs)] + [("test_accuracy", 0.7, 0)]
    plot_data = {"history": HISTORY, "fine_tune_start": 1, "first_epoch": 0,
                 "confusion": np.array([[2, 1], [0, 3]]), "class_names": ["a", "b"]}
    return journal.finish(run, {"dropout": 0.2, "backbone": "x"}, metrics, plot_data).name  # the run id, or new-…


def _check_written(run_id):
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"dropout": "0.2", "backbone": "x"}
    assert [m.value for m in client.get_metric_history(run_id, "val_accuracy")] == [0.5, 0.75]
    assert run.data.metrics["test_accuracy"] == 0.7
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {
        "plots/learning_curves.png", "plots/confusion_matrix.png"}


def test_finished_trials_are_written_in_the_background(tracking_store, tmp_path):
    exp, parent = _experiment()
    journal = TrialJournal(tmp_path / "journal")
    run = journal.start(exp, parent, "trial-0", {"kt.trial_id": "0"})
    _finish(journal, run)
    waited = journal.blocked  # the caller only queued the work and wrote the journal entry
    journal.close()
    run_id = run.result()
    _check_written(run_id)
    assert MlflowClient().get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    assert not list((tmp_path / "journal").iterdir()), "written entries leave the journal"
    assert journal.busy > 0.05 and waited < journal.busy / 5


def test_a_trial_journaled_before_a_kill_is_written_on_restart(tracking_store, tmp_path, monkeypatch):
    exp, parent = _experiment()
    journal = TrialJournal(tmp_path / "journal")
    run = journal.start(exp, parent, "trial-0", {})
    journal.flush()
    monkeypatch.setattr(journal, "_submit", lambda *args: Future())  # the process dies before the thread writes
    run_id = _finish(journal, run)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    assert (tmp_path / "journal" / run_id / "entry.json").is_file()

    assert TrialJournal(tmp_path / "journal").replay() == [run_id]  # the next start
    _check_written(run_id)


def test_a_trial_journaled_before_its_run_existed_gets_one_on_restart(tracking_store, tmp_path, monkeypatch):
    exp, parent = _experiment()
    journal = TrialJournal(tmp_path / "journal")
    monkeypatch.setattr(journal, "_submit", lambda *args: Future())  # the store was slow, then the process died
    key = _finish(journal, journal.start(exp, parent, "trial-0", {"kt.trial_id": "0"}))
    assert key.startswith("new-") and not MlflowClient().search_runs([exp])[1:]

    (run_id,) = TrialJournal(tmp_path / "journal").replay()
    _check_written(run_id)
    assert MlflowClient().get_run(run_id).data.tags["kt.trial_id"] == "0"


def test_a_failed_trial_is_closed_at_once_with_its_error(tracking_store, tmp_path):
    exp, parent = _experiment()
    journal = TrialJournal(tmp_path / "journal")
    run = journal.start(exp, parent, "trial-0", {})
    journal.fail(run, "FAILED", "ValueError: bad", "Traceback ...", params={"dropout": 0.9})
    got = MlflowClient().get_run(run.result())
    assert got.info.status == "FAILED" and got.data.tags["error"] == "ValueError: bad"
    assert got.data.params == {"dropout": "0.9"}
    journal.close()


def test_a_relative_journal_folder_works_from_any_working_directory(tracking_store, tmp_path, monkeypatch):
    # The plot helper process runs in the project root; a sweep run elsewhere with a relative state dir
    # (`--state-dir sweeps_state`, the default) once lost every trial's plots and left its runs RUNNING.
    monkeypatch.chdir(tmp_path)
    exp, parent = _experiment()
    journal = TrialJournal("relative/journal")
    run = journal.start(exp, parent, "trial-0", {"kt.trial_id": "0"})
    _finish(journal, run)
    journal.close()
    _check_written(run.result())


def test_a_run_is_closed_as_killed_even_when_an_earlier_write_failed(tracking_store, tmp_path):
    import pytest

    exp, parent = _experiment()
    journal = TrialJournal(tmp_path / "journal")
    run = journal.start(exp, parent, "trial-1", {})

    def earlier_write_fails():
        raise RuntimeError("the previous trial's write failed")

    journal._submit(earlier_write_fails)
    with pytest.raises(RuntimeError, match="the previous trial's write failed"):
        journal.fail(run, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
    assert MlflowClient().get_run(run.result()).info.status == "KILLED", "never left RUNNING"
    journal.close()


def test_a_data_set_logged_by_two_processes_at_once_is_logged_again_when_it_lost_the_race(tracking_store):
    import mlflow
    import pytest

    from tracking.datasets import dataset_inputs
    from tracking.journal import log_inputs

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
