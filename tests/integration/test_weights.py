"""A full classifier's checkpoint as its weights (``pipeline.weights``), rebuilt by its run's recipe."""

import keras
import numpy as np
import pytest

from pipeline import recipe, weights
from pipeline.hparams import RunConfig
from pipeline.model import build_head

PLAN = recipe.plan(RunConfig(image_size=32, weights="none", seed=3))


def _trained_like(plan: recipe.Plan, num_classes: int = 3) -> keras.Model:
    """The plan's classifier with every weight (BatchNorm statistics included) moved off its initial value."""
    model = recipe.full_model(plan, num_classes)
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def test_a_weights_checkpoint_rebuilds_the_same_classifier(tmp_path):
    model = _trained_like(PLAN)
    kept = recipe.keep_checkpoint(model, tmp_path)
    assert kept.name == recipe.WEIGHTS_CHECKPOINT and recipe.checkpoint_in(tmp_path) == kept
    rebuilt = recipe.load_checkpoint(PLAN, 3, kept)
    assert rebuilt is not model
    for a, b in zip(model.weights, rebuilt.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(model(x, training=False), rebuilt(x, training=False))


def test_a_run_keeps_the_checkpoint_it_wrote_replaces_an_earlier_attempts_and_a_head_as_keras(tmp_path):
    model = _trained_like(PLAN)
    model.save(tmp_path / recipe.CHECKPOINT)  # what train_run keeps for a run that a later one continues (Hyperband)
    assert recipe.keep_checkpoint(model, tmp_path, kept_by_run=True) == tmp_path / recipe.CHECKPOINT
    assert not (tmp_path / recipe.WEIGHTS_CHECKPOINT).exists()
    # an earlier attempt of the trial in the same folder left a .keras: this run's weights replace it
    other = _trained_like(recipe.plan(RunConfig(image_size=32, weights="none", seed=4)))
    kept = recipe.keep_checkpoint(other, tmp_path)
    assert kept == tmp_path / recipe.WEIGHTS_CHECKPOINT == recipe.checkpoint_in(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [recipe.WEIGHTS_CHECKPOINT]
    np.testing.assert_array_equal(np.asarray(recipe.load_checkpoint(PLAN, 3, kept).weights[-2]),
                                  np.asarray(other.weights[-2]))
    (tmp_path / "head").mkdir()
    kept = recipe.keep_checkpoint(build_head(16, 3, seed=1), tmp_path / "head")
    assert kept == tmp_path / "head" / recipe.HEAD_CHECKPOINT and recipe.checkpoint_in(tmp_path / "head") == kept


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_first_difference(tmp_path):
    weights.save(_trained_like(PLAN, num_classes=3), tmp_path / "w.npz")
    with pytest.raises(weights.CheckpointMismatch) as e:
        weights.load_into(recipe.full_model(PLAN, 5), tmp_path / "w.npz")
    message = str(e.value)
    assert message.startswith(f"the checkpoint {tmp_path / 'w.npz'} holds ")
    assert "('classifier/kernel', (1280, 3)) in the checkpoint, ('classifier/kernel', (1280, 5)) in the model" in message
    assert message.endswith("It was written by another architecture or another tlsweep version: export it with "
                            "that version")


def test_names_leave_out_the_numbers_keras_adds_to_repeated_layer_names():
    first, second = keras.layers.Dense(2), keras.layers.Dense(2)
    first.build((None, 3))
    second.build((None, 3))
    assert first.kernel.path != second.kernel.path, "Keras numbers the second (dense, dense_1, ...)"
    assert weights.name_of(first.kernel) == weights.name_of(second.kernel) == "dense/kernel"
    assert weights.name_of(keras.Variable(np.zeros(2), name="block11_gamma")) == "block11_gamma", "not inside a name"


def test_a_weights_checkpoint_is_rebuilt_without_pretrained_weights_in_the_policy_the_trial_trained_with(
        tmp_path, monkeypatch):
    """The checkpoint replaces every weight (no download or weights file needed again), and the classifier computes
    in the trial's dtype policy, not in ``auto`` resolved where it is exported."""
    from types import SimpleNamespace

    from sweeps.best import trial_plan
    from tracking import layout

    run = SimpleNamespace(info=SimpleNamespace(run_id="r1"), data=SimpleNamespace(params={
        layout.RUN_CONFIG: RunConfig(image_size=32, mixed_precision="auto").to_json(),
        layout.PRECISION: "mixed_bfloat16"}, tags={}))
    plan = trial_plan(run)
    assert plan.precision == "mixed_bfloat16" and plan.config.weights == "imagenet"
    weights.save(_trained_like(PLAN), tmp_path / recipe.WEIGHTS_CHECKPOINT)
    built = []
    real = recipe.full_model
    monkeypatch.setattr(recipe, "full_model", lambda p, n, *a: built.append(p.config.weights) or real(p, n, *a))
    recipe.load_checkpoint(PLAN, 3, tmp_path / recipe.WEIGHTS_CHECKPOINT)
    assert built == ["none"]


@pytest.mark.parametrize("content", [b"", b"not a zip at all", "npz without names"])
def test_an_unreadable_weights_checkpoint_is_one_clear_error(tmp_path, content):
    path = tmp_path / recipe.WEIGHTS_CHECKPOINT
    if content == "npz without names":
        with open(path, "wb") as f:
            np.savez(f, w00000=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(weights.CheckpointMismatch) as e:
        weights.load_into(recipe.full_model(PLAN, 3), path)
    assert str(e.value).startswith(f"the checkpoint {path} is not a readable weights checkpoint (")
    assert str(e.value).endswith("it was cut short or replaced: run the trial again to write it")
