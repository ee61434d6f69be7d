"""A trial that logs its model exports it itself, in its own process, from the model in memory; the sweep ends
with the models of the trials it should have logged."""

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.export import ExportedModel
from pipeline.hparams import RunConfig
from sweeps.trial import TrialSpec
from tracking import layout
from tracking import leaderboard as lb

HEADS = {"tuner": "grid", "max_trials": 3, "trial_process": "same", "space": {
    "backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "batch_size": {"fixed": 8},
    "epochs": {"fixed": 2}, "fine_tune": {"fixed": False}, "learning_rate": {"choice": [0.03, 0.0001, 0.01]}}}


def test_a_trial_that_logs_its_model_exports_it_with_its_record(tmp_path, class_folder):
    from pipeline import recipe
    from sweeps import trial as trials

    run = RunConfig(image_size=32, epochs=1, fine_tune=False, batch_size=8)
    spec = TrialSpec(run=run, dataset=str(class_folder), split=None, log_models="all", verbose=0,
                     trial_dir=str(tmp_path / "t0"), record_dir=str(tmp_path / "r0"), params={"trial_id": "0"})
    (tmp_path / "t0").mkdir()
    result = trials.run(spec, {})
    record, folder = result.record, tmp_path / "r0"
    assert record.model == "model" and (folder / "model" / "export" / "saved_model.pb").is_file()
    assert record.tags[layout.COST_OF] == layout.COST_SAVEDMODEL
    # the export gives the model's own test accuracy (the trial measured it on the model in memory)
    exported = ExportedModel(folder / "model" / "export")
    data = recipe.load_data_for(recipe.plan(run), str(class_folder), None)
    images, labels = data.first("test", 1000)
    accuracy = float(np.mean(exported.predict(images).argmax(axis=1) == labels))
    assert accuracy == pytest.approx(dict((k, v) for k, v, _ in record.metrics)[layout.TEST_ACCURACY], abs=1e-6)
    # and the checkpoint (ensembles, best-export) and the probabilities (the sweep's ensemble) go with it
    probabilities = f"{layout.PROBABILITIES_DIR}/{layout.PROBABILITIES}"
    (checkpoint,) = set(record.files) - {f"{layout.PLOTS_DIR}/{name}" for name in layout.TRIAL_PLOTS} - {probabilities}
    assert probabilities in record.files
    # the head alone when its features were cached before the trial, else the full model's weights (keep_checkpoint)
    assert checkpoint in {f"{layout.CHECKPOINT_DIR}/{name}" for name in (recipe.HEAD_CHECKPOINT,
                                                                         recipe.WEIGHTS_CHECKPOINT)}
    assert all((folder / local).is_file() for local in record.files.values())
    # a trial that does not log its model writes none
    quiet = trials.run(TrialSpec(**{**spec.__dict__, "log_models": "improving", "best": 1.0,
                                    "trial_dir": str(tmp_path / "t1"), "record_dir": str(tmp_path / "r1")}), {})
    assert quiet.record.model is None and not (tmp_path / "r1" / "model").exists()
    assert quiet.record.tags[layout.COST_OF] == layout.COST_KERAS


@pytest.mark.slow
def test_the_sweep_ends_with_the_model_of_every_trial(tmp_path, tracking_store, class_folder):
    from sweeps.run import run_sweep

    (tmp_path / "heads.yaml").write_text(yaml.safe_dump(HEADS))  # log_models left out: the default, all
    parent = run_sweep(str(class_folder), sweep=str(tmp_path / "heads.yaml"), experiment="exports",
                       state_dir=str(tmp_path / "state"), verbose=0)
    assert MlflowClient().get_run(parent).data.params["log_models"] == "all"
    exp = mlflow.get_experiment_by_name("exports").experiment_id
    kids = sorted(MlflowClient().search_runs([exp], f"tags.`{layout.PARENT_RUN_ID}` = '{parent}'"),
                  key=lambda r: r.info.start_time)
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    with_model = [k.info.run_id for k in kids if layout.MODEL_URI in k.data.tags]
    assert len(with_model) == 3, "every trial, improving or not, has its model"
    for run in kids:  # each measured its SavedModel's cost, and its model serves
        assert run.data.tags[layout.COST_OF] == "savedmodel"
        # an MLflow LoggedModel of the run, with the searched params, and the trial's scores linked to it
        logged = mlflow.get_logged_model(run.data.tags[layout.MODEL_URI].removeprefix("models:/"))
        assert logged.source_run_id == run.info.run_id and logged.experiment_id == exp and logged.params == run.data.params == {
            "learning_rate": run.data.params["learning_rate"]}
        scores = {m.key: m.value for m in logged.metrics}
        assert scores[layout.VAL_ACCURACY] == run.data.metrics[layout.VAL_ACCURACY]
        assert scores[layout.TEST_ACCURACY] == run.data.metrics[layout.TEST_ACCURACY]
        model = mlflow.pyfunc.load_model(run.data.tags[layout.MODEL_URI])
        assert model.predict(np.full((1, 32, 32, 3), 100.0, "float32")).shape == (1, 3)
    winner = MlflowClient().get_run(parent).data.tags[layout.BEST_RUN_ID]
    assert winner in with_model, "the winner always has its model"
    # the winner is the selection rule's first (tracking.leaderboard.ranked), and the logged board says what ranked it
    board = lb.leaderboard(lb.trial_runs("exports", parent))
    assert winner == board.iloc[0]["run_id"]
    logged = mlflow.artifacts.load_text(f"runs:/{parent}/{layout.LEADERBOARD_CSV}").splitlines()
    assert lb.RANKED_BY in logged[0].split(",")
    assert set(board[lb.RANKED_BY]) <= {"val_accuracy", "val_loss", "cv_accuracy"}


def test_best_export_of_an_experiment_whose_trials_all_failed_points_at_their_errors(tracking_store):
    from pipeline.errors import UserError
    from sweeps.best import best_run

    exp = mlflow.create_experiment("failed")
    client = MlflowClient()
    for status in ("FAILED", "FAILED", "KILLED"):
        run = client.create_run(exp, tags={layout.KIND: layout.TRIAL}).info.run_id
        client.set_terminated(run, status)
    with pytest.raises(UserError, match=r"^experiment 'failed' has no finished trial \(2 FAILED, 1 KILLED\); tlsweep "
                                        r"report --experiment failed lists their errors$"):
        best_run("failed")
