"""A search belongs to one space, one data set, one store and one process: anything else is a clear error."""

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import make_class_folder
from pipeline.errors import UserError
from sweeps.config import parse_sweep
from sweeps.run import run_sweep
from sweeps.state import SweepState

ROOT = Path(__file__).resolve().parents[2]
HEADS = {"tuner": "random", "max_trials": 1, "log_models": "best", "trial_process": "same",
         "space": {"image_size": {"fixed": 32}, "epochs": {"fixed": 1}, "fine_tune": {"fixed": False},
                   "batch_size": {"fixed": 8}, "dropout": {"float": [0.0, 0.5]}}}


def _sweep(folder: Path, dataset: Path, config: dict, progress: bool = False, **kwargs) -> str:
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_sweep(str(dataset), sweep=str(path), experiment="exp", state_dir=str(folder / "state"), verbose=0,
                     progress=progress, **kwargs)


def _runs() -> list:
    exp = mlflow.get_experiment_by_name("exp")
    return MlflowClient().search_runs([exp.experiment_id]) if exp else []


def test_an_edited_space_is_refused_then_continued_or_restarted(tmp_path, tracking_store, class_folder):
    first = _sweep(tmp_path, class_folder, HEADS)
    edited = {**HEADS, "space": {**HEADS["space"], "dropout": {"float": [0.6, 0.9]}}}
    before = len(_runs())
    with pytest.raises(UserError, match=r"the sweep file .*s.yaml changed since this search started \(space.dropout."
                                        r"float: \[0.0, 0.5\] -> \[0.6, 0.9\]\)\. Keras Tuner would silently run the "
                                        r"saved search\. Choose: --on-change continue"):
        _sweep(tmp_path, class_folder, edited)
    assert len(_runs()) == before, "refused before any run"
    assert _sweep(tmp_path, class_folder, {**edited, "max_trials": 2}, on_change="continue") == first
    dropouts = [float(r.data.params["dropout"]) for r in _runs() if "dropout" in r.data.params]
    assert len(dropouts) == 2 and max(dropouts) <= 0.5, "continue runs the saved space"
    second = _sweep(tmp_path, class_folder, edited, on_change="restart")
    assert second != first
    assert MlflowClient().get_run(first).data.tags["tlsweep.sweep"].startswith("exp:s@replaced-")
    restarted = [float(r.data.params["dropout"]) for r in _runs() if r.data.tags.get("mlflow.parentRunId") == second]
    assert len(restarted) == 1 and restarted[0] >= 0.6, "restart runs the new space"
    # the old search is history: the board, best-export and the report rank the new search's trials only
    from tracking import leaderboard as lb

    assert {r for r in lb.trial_runs("exp")["tags.mlflow.parentRunId"]} == {second}
    assert list((tmp_path / "state" / "exp").glob("s.replaced-*"))


def test_other_data_under_the_same_name_does_not_join_the_search(tmp_path, tracking_store, class_folder):
    _sweep(tmp_path, class_folder, HEADS)
    other = make_class_folder(tmp_path / "elsewhere" / class_folder.name, per_class=6, classes=("blue", "red"))
    with pytest.raises(UserError, match=r"the data set is not the one this search ran on \(then .*: 36 files, identity "
                                        r"\w+; now .*elsewhere.*: 12 files, identity \w+\).*Choose: --on-change restart"):
        _sweep(tmp_path, other, HEADS)
    with pytest.raises(UserError, match="the data set is not the one"):  # continue is not for other data
        _sweep(tmp_path, other, HEADS, on_change="continue")
    moved = tmp_path / "moved"
    shutil.copytree(class_folder, moved)  # the same files elsewhere are the same data
    _sweep(tmp_path, moved, HEADS)


@pytest.mark.slow
def test_a_search_is_bound_to_its_split_and_a_new_seed_is_named_as_such(tmp_path, tracking_store, class_folder):
    first = _sweep(tmp_path, class_folder, HEADS, split="60/20/20")
    before = len(_runs())
    with pytest.raises(UserError) as e:  # other validation images: its scores would not compare with the saved ones
        _sweep(tmp_path, class_folder, HEADS, split="50/25/25")
    assert str(e.value) == (
        "the split changed since this search started (then 60/20/20, now 50/25/25: --split). Keras Tuner would "
        "silently run the saved search. Choose: --on-change restart starts a new search in this experiment (the old "
        "runs stay in MLflow), or give --experiment <another name> for a search of its own")
    with pytest.raises(UserError, match=r"^the split changed since this search started"):  # continue: not for it
        _sweep(tmp_path, class_folder, HEADS, split="50/25/25", on_change="continue")
    with pytest.raises(UserError, match=r"^the split changed .*then 60/20/20, now default"):  # dropped: the default
        _sweep(tmp_path, class_folder, HEADS)
    assert len(_runs()) == before, "refused before any run"
    _sweep(tmp_path, class_folder, HEADS, split=" 60/20/20")  # the same split, spaced: the same search

    with pytest.raises(UserError) as e:
        _sweep(tmp_path, class_folder, HEADS, split="60/20/20", seed=7)
    assert str(e.value).startswith(
        "the seed changed since this search started (then 42, now 7: --seed or the sweep file's seed). Keras Tuner "
        "would silently run the saved search. Choose: --on-change continue runs the saved search as it was, ")
    assert "sweep file" not in str(e.value).split(". Keras")[0].replace("the sweep file's seed", ""), \
        "a new seed is not a changed sweep file"
    restarted = _sweep(tmp_path, class_folder, HEADS, split="50/25/25", on_change="restart")
    assert restarted != first
    assert MlflowClient().get_run(restarted).data.params["split"] == "50/25/25", "the new parent has the new split"


def test_saved_state_without_its_store_is_refused(tmp_path, tracking_store, class_folder, monkeypatch):
    _sweep(tmp_path, class_folder, HEADS)
    wiped = f"sqlite:///{tmp_path / 'new.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", wiped)
    with pytest.raises(UserError, match=r"the saved search in .* has 1 trial\(s\), but the MLflow store .*new.db has "
                                        r"no run of sweep 'exp:s': the store is new or was wiped"):
        _sweep(tmp_path, class_folder, HEADS, tracking_uri=wiped)
    mlflow.set_tracking_uri(tracking_store)


def test_a_second_process_on_the_same_search_is_refused(tmp_path, class_folder):
    config = parse_sweep(HEADS, "s")
    state = SweepState(tmp_path, config, str(class_folder), None)
    with state.locked():
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from sweeps.config import parse_sweep; from sweeps.state import "
             "SweepState; s = SweepState(sys.argv[1], parse_sweep({}, 's'), sys.argv[2], None)\n"
             "with s.locked(): pass", str(tmp_path), str(class_folder)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0
    assert f"sweep 's' in {tmp_path} is already running (pid " in other.stderr
    with state.locked():  # released: the same process takes it again
        pass


@pytest.mark.slow
def test_a_search_stopped_by_failures_says_what_to_do_instead_of_failing_again(tmp_path, tracking_store, class_folder,
                                                                               capsys):
    bad = {**HEADS, "max_trials": 4, "max_consecutive_failed_trials": 2,
           "space": {**HEADS["space"], "learning_rate": {"fixed": 1.0e38}}}
    with pytest.raises(UserError, match="sweep stopped: 2 trials failed in a row"):
        _sweep(tmp_path, class_folder, bad, progress=True)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("[sweep] trial 0 ")]
    assert len(lines) == 1 and "| FAILED in 0:" in lines[0], captured.out
    assert "(loss became NaN/inf; lower the learning rate)" in lines[0], "a failed trial shows one line, its reason"
    assert "Traceback" not in captured.out + captured.err, "the traceback goes to MLflow (and --verbose) only"
    before = len(_runs())
    with pytest.raises(UserError, match=r"this search stopped after 2 trials failed in a row \(last error: .*loss "
                                        r"became NaN.*\); run as it is, it would stop again at once"):
        _sweep(tmp_path, class_folder, bad)
    assert len(_runs()) == before, "no duplicate FAILED run"
    fixed = {**bad, "space": {**bad["space"], "learning_rate": {"fixed": 0.01}}}
    parent = _sweep(tmp_path, class_folder, fixed, on_change="restart")
    assert MlflowClient().get_run(parent).info.status == "FINISHED"


def test_best_export_refuses_a_best_trial_without_a_test_score(tmp_path, tracking_store):
    from sweeps.best import best_export
    from tracking import runs, store

    exp = store.experiment_id("nan")
    parent = runs.start_parent(exp, "nan:s", "sweep-s")
    child = runs.create_child(exp, parent, "trial-0", {"kt.trial_id": "0"})
    client = MlflowClient()
    client.log_metric(child, "val_accuracy", 0.9)
    client.log_metric(child, "test_accuracy", float("nan"))
    client.set_tag(child, "tlsweep.model_uri", "runs:/x/model")
    runs.end_run(child, "FINISHED")
    runs.end_parent(parent)
    with pytest.raises(UserError, match=rf"the best trial {child} of 'nan' has no test score \(test_accuracy nan\): "
                                        r"its data set had no test images"):
        best_export("nan", export_dir=str(tmp_path / "exports"))
    assert not (tmp_path / "exports").exists() and not client.search_registered_models()
