"""Fine-tuning only the top on cached activations at the cut is the same as fine-tuning end to end."""

import dataclasses

import keras
import numpy as np
import pytest

from pipeline import cut as cuts
from pipeline import features, recipe
from pipeline.backbones import get_spec
from pipeline.data import load_data
from pipeline.hparams import RunConfig
from pipeline.model import backbone_of, build_model
from pipeline.training import train

UNFREEZE = 105  # fine_tune_at 0.75 of EfficientNet-Lite0's 141 layers: inside block 12, whose input a residual skips


@pytest.fixture(scope="module")
def data(class_folder):
    return load_data(str(class_folder), 32, seed=0)


def _fine_tuned(data, use_cut, tmp_path, seed=0, cache=True, epochs=1, **knobs):
    keras.utils.set_random_seed(seed)
    model = build_model("efficientnet_lite0", data.num_classes, 32, dropout=0.2, seed=seed)
    cached = features.for_model(model, data, get_spec("efficientnet_lite0"), "imagenet", 32)[0] if cache else None
    at_cut = None
    if use_cut:
        split = cuts.split(model, UNFREEZE)
        at_cut = (split, cuts.load_or_compute(split, data, "k", root=tmp_path)[0])
    result = train(model, data, features=cached, cut=at_cut, epochs=epochs, fine_tune_epochs=3, unfreeze_from=UNFREEZE,
                   learning_rate=1e-2, fine_tune_learning_rate=1e-3, batch_size=8, seed=seed, verbose=0, **knobs)
    return model, result


@pytest.fixture(scope="module")
def pair(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cuts")
    return _fine_tuned(data, False, root), _fine_tuned(data, True, root)


@pytest.mark.slow
def test_fine_tuning_on_cut_activations_gives_the_same_losses_and_weights_as_end_to_end(data, pair):
    """Tolerance: losses and accuracies rtol 1e-4 (float32, the same batches in the same order), every
    weight of the classifier atol 1e-5 after 3 fine-tuning epochs at a learning rate (1e-3) that moves them."""
    (plain_model, plain), (cut_model, cut) = pair
    assert cut.cut_index == 103 and plain.cut_index is None
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(plain.history[key], cut.history[key], rtol=1e-4, atol=1e-6)
    assert cut.test_accuracy == pytest.approx(plain.test_accuracy)
    assert cut.test_loss == pytest.approx(plain.test_loss, rel=1e-4)
    np.testing.assert_allclose(plain.test_predictions[1], cut.test_predictions[1], atol=1e-5)
    moved = 0
    initial = build_model("efficientnet_lite0", data.num_classes, 32, seed=0)
    for before, a, b in zip(initial.weights, plain_model.weights, cut_model.weights):
        assert a.path == b.path
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=a.path)
        moved += not np.allclose(np.asarray(before), np.asarray(a))
    assert moved > 10  # the classifier and the unfrozen top of the backbone trained
    assert plain.trainable_params == cut.trainable_params


KNOBS = [dict(label_smoothing=0.2), dict(weight_decay=1.0), dict(fine_tune_schedule="cosine", warmup_epochs=1)]


@pytest.mark.slow
@pytest.mark.parametrize("knobs", KNOBS, ids=["label_smoothing", "weight_decay", "warmup_cosine"])
def test_each_knob_fine_tunes_the_same_on_cut_activations_as_end_to_end(data, pair, tmp_path, knobs):
    """The top at the cut trains with the classifier's own loss and optimizer (its schedule included): with each knob
    both paths give the same losses and weights (tolerances as above), and not those without it."""
    (plain_model, plain), (cut_model, cut) = _fine_tuned(data, False, tmp_path, **knobs), \
        _fine_tuned(data, True, tmp_path, **knobs)
    assert cut.cut_index == 103 and plain.cut_index is None
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(plain.history[key], cut.history[key], rtol=1e-4, atol=1e-6)
    assert cut.test_accuracy == pytest.approx(plain.test_accuracy)
    for a, b in zip(plain_model.weights, cut_model.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=a.path)
    without = pair[1][1]
    assert not np.allclose(cut.history["loss"][1:], without.history["loss"][1:], rtol=1e-3), "the knob acts"


@pytest.mark.slow
def test_a_whole_trial_on_the_caches_is_the_same_as_one_on_the_images(data, tmp_path):
    """A trial that uses no cache (its head epochs and fine-tuning epochs end to end on the images, as plain Keras
    runs it) and one on cached features and activations at the cut train the same model: each phase sees the
    batches in the same order on both (a pipeline shared by both phases would continue its shuffle into the
    fine-tuning epochs)."""
    (plain_model, plain), (cut_model, cut) = (_fine_tuned(data, False, tmp_path, cache=False, epochs=2),
                                              _fine_tuned(data, True, tmp_path, epochs=2))
    assert not plain.used_feature_cache and cut.used_feature_cache and cut.cut_index == 103
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(plain.history[key], cut.history[key], rtol=1e-4, atol=1e-6)
    assert cut.test_accuracy == pytest.approx(plain.test_accuracy)
    for a, b in zip(plain_model.weights, cut_model.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=a.path)


@pytest.mark.slow
def test_the_top_trains_the_classifiers_own_variables(data, pair):
    """No copying back: the full model (the one exported) computes what the trained top computes."""
    model = pair[1][0]
    split = cuts.split(model, UNFREEZE)
    images = next(iter(data.batches("test", 8)))[0]
    np.testing.assert_allclose(model(images, training=False), split.top(split.bottom(images)), atol=1e-6)


def test_the_cut_snaps_down_to_where_one_tensor_crosses():
    model = build_model("efficientnet_lite0", 2, 32, weights=None, seed=0)
    base = backbone_of(model)
    split = cuts.split(model, 105)
    # block12 (layers 103-111) is residual: its input (block11_project_bn) and its branch both cross 104 and 105
    assert (split.index, split.layer) == (103, "block11_project_bn")
    assert base.layers[split.index - 1].name == "block11_project_bn"
    assert cuts.split(model, 103).index == 103  # already a single-tensor point: no snapping
    assert tuple(split.bottom.output.shape[1:]) == (1, 1, 192)
    assert split.top.trainable_weights == [] or all(v.trainable for v in split.top.trainable_weights)
    assert cuts.split(model, 0) is None  # fine-tune everything: only the input crosses, nothing to cache
    augmented = build_model("efficientnet_lite0", 2, 32, weights=None, augment=True, seed=0)
    assert cuts.split(augmented, 105) is None  # random augmentation below the cut: nothing fixed to cache


@pytest.mark.slow
def test_the_recipe_fine_tunes_on_the_cut_and_caches_it_keyed_on_the_cut(class_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    config = RunConfig(image_size=32, epochs=1, fine_tune_epochs=1, batch_size=8, fine_tune_at=0.75)
    plan = recipe.plan(config)
    data = recipe.load_data_for(plan, str(class_folder), None)
    first = recipe.train_run(plan, data, verbose=0)
    again = recipe.train_run(plan, data, verbose=0)
    assert first.result.cut_index == 103 and first.result.cut_seconds > 0 and again.result.cut_seconds == 0.0
    assert again.result.history["loss"] == pytest.approx(first.result.history["loss"], rel=1e-5)
    assert len(list((tmp_path / "cuts").glob("[!.]*"))) == 1  # beside the .tlsweep marker
    recipe.train_run(recipe.plan(dataclasses.replace(config, fine_tune_at=0.9)), data, verbose=0)
    assert len(list((tmp_path / "cuts").glob("[!.]*"))) == 2  # another cut, another cache entry
    for off in (dict(augment=True), dict(feature_cache=False), dict(weights="none")):
        outcome = recipe.train_run(recipe.plan(dataclasses.replace(config, **off)), data, verbose=0)
        assert outcome.result.cut_index is None, off


@pytest.mark.slow
def test_pooled_features_from_the_cut_are_the_frozen_feature_cache(data, tmp_path):
    """A cold start computes both caches in one pass over the images: the features must be the same."""
    model = build_model("efficientnet_lite0", data.num_classes, 32, seed=0)
    direct, _ = features.load_or_compute(model, data, "direct", root=tmp_path)
    split = cuts.split(model, UNFREEZE)
    via_cut = cuts.pooled_features(split, cuts.load_or_compute(split, data, "k", root=tmp_path)[0])
    for name in ("train", "validation", "test"):
        np.testing.assert_allclose(via_cut[name][0], direct[name][0], atol=1e-5)
        np.testing.assert_array_equal(via_cut[name][1], direct[name][1])


def test_cached_activations_are_memory_mapped_read_only_and_the_same(tmp_path):
    """A fine-tuning trial maps the cached activations instead of reading 100+ MB before its input pipeline
    copies them (issue 13, fixed cost); the values are the ones saved."""
    path = tmp_path / "k"
    path.mkdir()
    saved = {}
    for i, s in enumerate(("train", "validation", "test")):
        saved[s] = (np.full((3 + i, 2, 2, 4), i, np.float32), np.arange(3 + i, dtype=np.int32))
        np.save(path / f"{s}_x.npy", saved[s][0])
        np.save(path / f"{s}_y.npy", saved[s][1])
    assert cuts.load("k", root=tmp_path) is None  # not done yet: another process may still be writing it
    (path / "done").touch()
    loaded = cuts.load("k", root=tmp_path)
    for s, (x, y) in saved.items():
        assert isinstance(loaded[s][0], np.memmap) and not loaded[s][0].flags.writeable
        np.testing.assert_array_equal(loaded[s][0], x)
        np.testing.assert_array_equal(loaded[s][1], y)
