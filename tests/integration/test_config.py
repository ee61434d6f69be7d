import keras_tuner as kt
import pytest

from pipeline.backbones import get_spec
from pipeline.errors import UserError
from pipeline.hparams import DEFAULTS
from sweeps import space
from sweeps.config import SWEEPS_DIR, default_sweep_for, load_sweep, parse_sweep


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_shipped_sweeps_parse_and_their_default_point_is_complete(name):
    config = load_sweep(name)
    values = space.define(kt.HyperParameters(), config.space)
    assert set(values) == set(DEFAULTS)
    assert all(values[k] is not None for k in DEFAULTS), values


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_shipped_sweeps_name_only_registered_backbones(name):
    entry = load_sweep(name).space.get("backbone", {})
    names = entry.get("choice", []) + ([entry["fixed"]] if "fixed" in entry else [])
    assert names, f"sweep {name} does not set its backbones"
    for backbone in names:
        get_spec(backbone)  # raises UserError for an unknown name


def test_shipped_sweeps_offer_the_offline_lite_family():
    for name in ("default", "tf_flowers", "tf_flowers_staged", "cats_vs_dogs"):
        choices = load_sweep(name).space["backbone"]["choice"]
        assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(choices), name


def test_default_point_of_default_sweep_is_the_baseline_with_a_converged_head():
    values = space.define(kt.HyperParameters(), load_sweep("default").space)
    # make train's defaults, except that the head trains on cached features until val_loss stops improving
    assert values == {**DEFAULTS, "epochs": 60, "early_stopping_patience": 5}


@pytest.mark.parametrize("name", ["default", "quick", "tf_flowers"])
def test_sweeps_for_any_folder_train_heads_to_convergence_on_cached_features(name):
    space_ = load_sweep(name).space
    assert space_["epochs"] == {"fixed": 60} and space_["early_stopping_patience"] == {"fixed": 5}
    assert space_["augment"] == {"fixed": False}  # augmentation would need the backbone every epoch: no cache


def test_the_quick_sweep_uses_the_backbones_native_size():
    assert load_sweep("quick").space["image_size"] == {"fixed": 0}


def test_empty_space_is_the_baseline_run():
    hp = kt.HyperParameters()
    assert space.define(hp, {}) == DEFAULTS
    assert all(isinstance(p, kt.engine.hyperparameters.Fixed) for p in hp.space)


def test_fine_tune_hyperparameters_are_conditional_on_fine_tune():
    config = parse_sweep({"space": {"fine_tune": {"boolean": True}, "fine_tune_at": {"choice": [0.5, 0.9]}}}, "t")
    hp = kt.HyperParameters()
    hp.values["fine_tune"] = False
    values = space.define(hp, config.space)
    assert values["fine_tune"] is False and values["fine_tune_at"] is None and values["fine_tune_epochs"] is None
    assert not hp.is_active("fine_tune_at")


def test_default_sweep_for_dataset():
    assert default_sweep_for("tf_flowers") == "tf_flowers"
    assert default_sweep_for("/data/my_photos") == "default"
    assert default_sweep_for("../shared/data/flower_photos/") == "tf_flowers"


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"space": {"dropuot": {"float": [0, 0.5]}}},
         r"unknown hyperparameter 'dropuot' in sweep t; known hyperparameters: augment, backbone, batch_size"),
        ({"tuners": "random"}, r"unknown key\(s\) \['tuners'\] in sweep t; known keys: tuner, max_trials"),
        ({"tuner": "evolution"}, r"unknown tuner 'evolution' in t; known tuners: random, bayesian, tpe, hyperband, grid"),
        ({"space": {"dropout": {"float": [0.5, 0.1]}}}, r"'float' of 'dropout' in sweep t must be \[low, high\]"),
        ({"space": {"dropout": {"float": [0, 0.5], "choice": [0.1]}}}, r"needs exactly one of choice, float"),
        ({"space": {"batch_size": {"choice": [16, 32], "default": 64}}}, r"default 64 of 'batch_size' .* not one of"),
        ({"max_trials": 0}, r"max_trials in sweep t must be a whole number >= 1, got 0"),
        ({"log_models": "some"}, r"log_models 'some' in sweep t is not one of all, improving, best"),
        ({"trial_process": "new"}, r"trial_process 'new' in t is not one of auto, fresh, same \(auto: a fresh process "
                                   r"for trials that train the whole network\)"),
        ({"objective": "val_acc"}, r"objective 'val_acc' in sweep t is not supported; use one of \['val_accuracy'\]"),
    ],
)
def test_bad_sweep_config(raw, message):
    with pytest.raises(UserError, match=message):
        parse_sweep(raw, "t")


def test_bad_yaml_and_unknown_sweep(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tuner: [random\n")
    with pytest.raises(UserError, match=r"sweep file .*bad.yaml is not valid YAML"):
        load_sweep(str(bad))
    with pytest.raises(UserError, match=r"unknown sweep 'qiuck'; known sweeps: .*quick"):
        load_sweep("qiuck")


def test_command_line_overrides():
    config = load_sweep("quick").with_overrides(max_trials=5, tuner="grid", seed=None)
    assert (config.max_trials, config.tuner, config.seed, config.trial_process) == (5, "grid", 42, "auto")
    assert load_sweep("quick").with_overrides(trial_process="same").trial_process == "same"
    with pytest.raises(UserError, match=r"trial_process 'x' in the command line is not one of auto, fresh, same"):
        load_sweep("quick").with_overrides(trial_process="x")
    with pytest.raises(UserError, match=r"unknown tuner 'best' in the command line"):
        load_sweep("quick").with_overrides(tuner="best")
