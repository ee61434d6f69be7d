"""One recipe: a RunConfig is resolved once, and the same rules decide what a run trains and where."""

import keras_tuner as kt
import pytest

from pipeline import recipe
from pipeline.errors import UserError
from pipeline.hparams import DEFAULTS, RunConfig
from sweeps.trial import TrialFailed, trial_errors


def test_the_default_config_is_the_baseline_and_resolves_against_its_backbone():
    config = RunConfig()
    assert config.hyperparameters() == DEFAULTS
    plan = recipe.plan(config)
    assert plan.spec.name == "efficientnet_lite0" and plan.image_size == plan.spec.native_size == 224
    assert plan.unfreeze_from == int(0.75 * plan.spec.layer_count) and plan.fine_tunes
    assert RunConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("changes", [dict(fine_tune=False), dict(fine_tune_at="none"), dict(fine_tune_at=0),
                                     dict(fine_tune_epochs=0)])
def test_every_way_of_saying_head_only_gives_a_head_only_plan(changes):
    plan = recipe.plan(RunConfig(**changes))
    assert not plan.fine_tunes


def test_a_head_only_run_on_cached_features_needs_no_fresh_process(monkeypatch, class_folder):
    """Before, ``fine_tune: true, fine_tune_at: none`` counted as fine-tuning and went to a fresh process."""
    from pipeline import features

    loads = []

    def data():
        loads.append(1)
        return recipe.load_data_for(plan, str(class_folder), None)

    plan = recipe.plan(RunConfig(fine_tune=True, fine_tune_at="none", image_size=32))
    monkeypatch.setattr(features, "is_cached", lambda key, root=None: True)
    assert recipe.trains_network(plan, data) is False and loads == [1]
    monkeypatch.setattr(features, "is_cached", lambda key, root=None: False)
    assert recipe.trains_network(plan, data) is True
    assert recipe.trains_network(recipe.plan(RunConfig(image_size=32)), data) is True  # fine-tunes
    assert recipe.trains_network(recipe.plan(RunConfig(image_size=32, fine_tune=False, augment=True)), data) is True
    assert len(loads) == 2  # the data is loaded only when the answer depends on the cache


def test_a_configuration_that_cannot_run_fails_when_planned():
    with pytest.raises(UserError, match="fine_tune_at 500 is beyond the depth of efficientnet_lite0"):
        recipe.plan(RunConfig(fine_tune_at=500))
    with pytest.raises(UserError, match="image size 16 is too small for backbone 'xception'"):
        recipe.plan(RunConfig(backbone="xception", image_size=16))


def test_user_errors_fail_a_trial_as_impossible_but_bugs_pass_through():
    with pytest.raises(TrialFailed, match="impossible configuration: dropout"):
        with trial_errors():
            raise UserError("dropout must be in [0, 1), got 1.5")
    with pytest.raises(TrialFailed, match="^loss became NaN/inf; lower the learning rate$"):
        with trial_errors():
            raise recipe.Diverged("loss became NaN/inf; lower the learning rate")
    with pytest.raises(ValueError, match="a bug"):  # not "impossible configuration": it keeps its traceback
        with trial_errors():
            raise ValueError("a bug")
