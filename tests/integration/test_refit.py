"""``best-export --refit``: the chosen trial's configuration trained again on train+validation, logged as a run of its
own (the trial's run untouched), exported, registered and checked on the same test split."""

import re

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import make_class_folder
from pipeline.errors import UserError
from tracking import layout
from tracking import leaderboard as lb

SWEEP = {"tuner": "grid", "max_trials": 2, "trial_process": "same", "log_models": "best", "space": {
    "backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "batch_size": {"fixed": 8},
    "epochs": {"fixed": 3}, "fine_tune": {"fixed": False}, "learning_rate": {"choice": [0.03, 0.0001]}}}


def _snapshot(run_id: str) -> tuple:
    run = MlflowClient().get_run(run_id)
    return run.info.status, run.info.end_time, run.data.params, run.data.tags, run.data.metrics


@pytest.mark.slow
def test_refit_trains_the_winner_on_train_and_validation_as_a_run_of_its_own(tmp_path, tracking_store, capsys, monkeypatch):
    from sweeps.best import best_export
    from sweeps.run import run_sweep

    folder = make_class_folder(tmp_path / "photos")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SWEEP))
    parent = run_sweep(str(folder), sweep=str(tmp_path / "s.yaml"), experiment="refit",
                       state_dir=str(tmp_path / "state"), verbose=0)
    chosen = lb.leaderboard(lb.trial_runs("refit", parent)).iloc[0]
    before = _snapshot(chosen["run_id"])

    info = best_export("refit", export_dir=str(tmp_path / "exports"), refit=True)

    assert info["refit_of"] == chosen["run_id"]
    assert info["val_accuracy"] == chosen[layout.VAL_ACCURACY], "the trial's validation score, which chose it"
    assert _snapshot(chosen["run_id"]) == before, "the trial's FINISHED run is not changed"
    run = MlflowClient().get_run(info["run_id"])
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags[layout.KIND] == layout.REFIT
    assert tags[layout.REFIT_OF] == chosen["run_id"] and tags[layout.PARENT_RUN_ID] == parent
    trial = MlflowClient().get_run(chosen["run_id"])
    seen = int(chosen["validation_size"]) + int(trial.data.tags[f"{layout.PARAM_TAG}train_size"])
    from tracking.runs import values

    assert values(run)[layout.TRAINED_ON] == f"train+validation ({seen} images)"
    assert layout.VAL_ACCURACY not in run.data.metrics, "no validation score: it trained on those images"
    assert run.data.metrics[layout.TEST_ACCURACY] == info["test_accuracy"]
    assert info["reproduced_test_accuracy"] == pytest.approx(info["test_accuracy"], abs=1 / info["test_size"] + 1e-6)
    # the trial's configuration, with the epochs it ran and nothing left to watch
    config = yaml.safe_load(values(run)[layout.RUN_CONFIG])
    assert config["epochs"] == 3 and config["early_stopping_patience"] == 0
    assert config["learning_rate"] == pytest.approx(float(chosen["learning_rate"]))
    # the refit's model is what was exported and registered; it never ranks with the trials
    version = MlflowClient().get_model_version_by_alias("refit", "champion")
    assert version.run_id == run.info.run_id
    assert run.info.run_id not in set(lb.trial_runs("refit")["run_id"])
    card = (tmp_path / "exports" / "refit" / "MODEL_CARD.md").read_text()
    assert f"trained again on train+validation ({seen} images)" in card and chosen["run_id"] in card

    # the command says both: the trial validation chose, and the refit with the data it saw
    from sweeps.cli import main as tlsweep

    assert tlsweep(["best-export", "--experiment", "refit", "--export-dir", str(tmp_path / "exports"), "--overwrite",
                    "--refit"]) == 0
    out = capsys.readouterr().out
    assert f"best run {chosen['run_id']}: val_accuracy=" in out
    assert re.search(rf"refit run \w+, trained on train\+validation \({seen} images\): test_accuracy=\d\.\d{{4}} "
                     r"\[\d\.\d+, \d\.\d+\]", out), out

    # interrupted while its model is exported: the refit's run is closed KILLED, and the command says so
    import sweeps.trial

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")

    exporting = sweeps.trial.export_for_record
    monkeypatch.setattr(sweeps.trial, "export_for_record", interrupted)
    assert tlsweep(["best-export", "--experiment", "refit", "--export-dir", str(tmp_path / "exports"), "--overwrite",
                    "--refit"]) == 130
    assert capsys.readouterr().err.strip().endswith(
        "interrupted before best-export finished (a run it opened is marked KILLED in MLflow); run the same command again")
    refits = mlflow.search_runs(experiment_names=["refit"], filter_string=f"tags.`{layout.KIND}` = 'refit'")
    assert sorted(refits["status"]) == ["FINISHED", "FINISHED", "KILLED"]
    monkeypatch.setattr(sweeps.trial, "export_for_record", exporting)

    # data changed since the sweep: one line, no refit
    make_class_folder(folder, per_class=13)
    with pytest.raises(UserError, match=r"is not what trial run .* trained on \(fingerprint .*\): files were added, "
                                        r"removed or changed since the sweep; export without --refit"):
        best_export("refit", export_dir=str(tmp_path / "exports"), overwrite=True, refit=True)
    assert len(mlflow.search_runs(experiment_names=["refit"], filter_string=f"tags.`{layout.KIND}` = 'refit'")) == 3


@pytest.mark.slow
def test_a_fine_tuning_trial_is_refit_with_the_head_epochs_early_stopping_kept_and_its_fine_tuning_epochs(
        tmp_path, tracking_store, class_folder):
    from sweeps.refit import refit_config
    from sweeps.run import run_sweep

    space = {**SWEEP["space"], "fine_tune": {"fixed": True}, "fine_tune_at": {"fixed": 0.9}, "epochs": {"fixed": 30},
             "early_stopping_patience": {"fixed": 1}, "fine_tune_epochs": {"fixed": 2},
             "learning_rate": {"fixed": 3.0}}  # overshoots: val_loss turns up early
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**SWEEP, "max_trials": 1, "space": space}))
    parent = run_sweep(str(class_folder), sweep=str(tmp_path / "s.yaml"), experiment="ft",
                       state_dir=str(tmp_path / "state"), verbose=0)
    (trial,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("ft").experiment_id],
                                          f"tags.`{layout.PARENT_RUN_ID}` = '{parent}'")
    head = int(trial.data.metrics[layout.FINE_TUNE_START])
    assert 1 <= head < 30, "early stopping ended the head phase"
    from sweeps.best import trial_plan

    config = refit_config(trial, trial_plan(trial).config)
    assert (config.epochs, config.fine_tune, config.fine_tune_epochs) == (head, True, 2)
    assert config.early_stopping_patience == 0 and config.fine_tune_at == 0.9


def test_an_ensemble_is_refused_in_one_line_before_any_work(tracking_store):
    from sweeps.refit import check_refittable

    with mlflow.start_run(tags={layout.KIND: layout.ENSEMBLE, layout.ENSEMBLE_MEMBERS: "a,b"}) as run:
        pass
    with pytest.raises(UserError, match=r"^the chosen model \(run \w+\) is an ensemble of trials, which has no one "
                                        r"configuration to refit; export it without --refit$"):
        check_refittable(MlflowClient().get_run(run.info.run_id))
