"""A warm spare trial process builds its trial's backbone ahead (pipeline.prebuilt): the same run, taken once."""

import json

import pytest

from pipeline import prebuilt, recipe
from pipeline.data import load_data
from pipeline.hparams import RunConfig
from pipeline.model import backbone_of
from sweeps import trial as trials
from sweeps.trial import REQUEST, TrialSpec

FINE_TUNE = RunConfig(image_size=32, epochs=1, fine_tune_epochs=1, fine_tune_at=0.75, batch_size=8,
                      feature_cache=False)


def _spec(tmp_path, class_folder, n, config=FINE_TUNE):
    folder = tmp_path / f"t{n}"
    folder.mkdir()
    return TrialSpec(run=config, dataset=str(class_folder), split=None, log_models="best", verbose=0,
                     trial_dir=str(folder), export_metadata={}, run_spec={}, params={},
                     journal=str(tmp_path / "journal"), checkpoint=True)


@pytest.mark.slow
def test_a_backbone_built_ahead_is_taken_once_and_trains_the_same_run(class_folder):
    plan = recipe.plan(FINE_TUNE)
    data = load_data(str(class_folder), 32)
    built_here = recipe.train_run(plan, data, verbose=0)
    assert prebuilt.prebuild(plan)
    ahead = next(iter(prebuilt._POOL.values()))
    taken = recipe.train_run(plan, data, verbose=0)
    assert backbone_of(taken.model) is ahead and not prebuilt._POOL, "taken once"
    for name, values in built_here.result.history.items():
        assert taken.result.history[name] == pytest.approx(values, abs=1e-6), name
    assert taken.result.test_accuracy == pytest.approx(built_here.result.test_accuracy, abs=1e-6)


def test_random_weights_are_never_built_ahead():
    plan = recipe.plan(RunConfig(image_size=32, weights="none", fine_tune_at=0.75))
    assert not prebuilt.prebuild(plan) and not prebuilt._POOL


def test_a_spare_prepares_for_a_trial_like_the_one_before(tmp_path, class_folder):
    spec = _spec(tmp_path, class_folder, 0)
    (tmp_path / "t0" / REQUEST).write_text(spec.to_json())
    load_data(str(class_folder), 32, seed=spec.run.seed)  # decoded by the trial it follows (a spare only maps)
    try:
        hint, cache = trials._prepare(tmp_path / "t0")
        assert hint == spec and set(cache) == {32}
        assert list(prebuilt._POOL) == [("efficientnet_lite0", 32, "imagenet", "float32")]
    finally:
        prebuilt._POOL.clear()
    other_seed = _spec(tmp_path, class_folder, 1, RunConfig(**{**FINE_TUNE.__dict__, "seed": 7}))
    assert trials._same_data(hint, spec) and not trials._same_data(hint, other_seed)
    assert trials._prepare(tmp_path / "missing") is None  # a guess that fails costs nothing


@pytest.mark.slow
def test_a_fine_tuning_trial_in_a_prepared_spare_gives_what_it_gives_in_the_sweeps_process(tmp_path, class_folder):
    here = trials.run(_spec(tmp_path, class_folder, 0), {})
    first = trials.run_fresh(_spec(tmp_path, class_folder, 1))  # starts a spare prepared for a trial like it
    second = trials.run_fresh(_spec(tmp_path, class_folder, 2))  # runs in that spare
    trials.close_spare()
    assert json.loads((tmp_path / "t2" / "answer.json").read_text())["output"]
    for out in (first, second):
        assert out.curve == pytest.approx(here.curve, abs=1e-6)
