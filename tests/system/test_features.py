import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import features
from pipeline.backbones import get_spec
from pipeline.data import load_data
from pipeline.model import build_head, build_model
from pipeline.training import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(class_folder):
    return load_data(str(class_folder), 32, seed=0)


def _trained(data, use_cache, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = build_model("efficientnet_lite0", data.num_classes, 32, dropout=0.2, seed=seed)
    cached = None
    if use_cache:
        cached, _ = features.for_model(model, data, get_spec("efficientnet_lite0"), "imagenet", 32)
        assert cached is not None
    result = train(model, data, batch_size=8, seed=seed, verbose=0, learning_rate=1e-2, features=cached, **kwargs)
    return model, result


def test_head_on_cached_features_is_the_same_model_as_end_to_end(data):
    plain_model, plain = _trained(data, use_cache=False, epochs=3, fine_tune_epochs=0)
    cached_model, cached = _trained(data, use_cache=True, epochs=3, fine_tune_epochs=0)
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(plain.history[key], cached.history[key], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(plain_model.get_layer("classifier").get_weights()[0],
                               cached_model.get_layer("classifier").get_weights()[0], rtol=1e-3, atol=1e-5)
    assert cached.test_accuracy == pytest.approx(plain.test_accuracy)
    assert cached.test_loss == pytest.approx(plain.test_loss, rel=1e-3)


KNOBS = [dict(label_smoothing=0.2), dict(weight_decay=2.0)]  # the head phase's (the schedule is fine-tuning's)


@pytest.fixture(scope="module")
def plain_on_features(data):
    return _trained(data, use_cache=True, epochs=3, fine_tune_epochs=0)[1]


@pytest.mark.parametrize("knobs", KNOBS, ids=[next(iter(k)) for k in KNOBS])
def test_each_knob_trains_the_same_head_on_cached_features_as_end_to_end(data, plain_on_features, knobs):
    """The loss and optimizer go with the classifier onto its head on cached features and onto a head alone (what a
    head-only trial trains): the same losses and weights as end to end on the images, and not those without the knob
    (weight decay 2.0 at 1e-2 shrinks the kernel 2 % a step: visible within three epochs)."""
    plain_model, plain = _trained(data, use_cache=False, epochs=3, fine_tune_epochs=0, **knobs)
    cached_model, cached = _trained(data, use_cache=True, epochs=3, fine_tune_epochs=0, **knobs)
    keras.utils.set_random_seed(0)
    head = build_head(1280, data.num_classes, dropout=0.2, seed=0)
    alone = train(head, data, batch_size=8, seed=0, verbose=0, learning_rate=1e-2, features=cached.features, epochs=3,
                  fine_tune_epochs=0, **knobs)
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(plain.history[key], cached.history[key], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(cached.history[key], alone.history[key], rtol=1e-5, atol=1e-6)
    for trained in (cached_model, head):
        np.testing.assert_allclose(plain_model.get_layer("classifier").get_weights()[0],
                                   trained.get_layer("classifier").get_weights()[0], rtol=1e-3, atol=1e-5)
    assert cached.test_accuracy == pytest.approx(plain.test_accuracy) == pytest.approx(alone.test_accuracy)
    assert not np.allclose(cached.history["loss"], plain_on_features.history["loss"], rtol=1e-3), "the knob acts"


def test_cached_head_goes_on_into_fine_tuning(data):
    model, result = _trained(data, use_cache=True, epochs=2, fine_tune_epochs=1, unfreeze_from=120)
    assert len(result.history["val_accuracy"]) == 3 and result.fine_tune_start == 2
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5)
    assert 0 <= result.test_accuracy <= 1


def test_features_are_computed_once_and_keyed_on_everything(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    spec = get_spec("efficientnet_lite0")
    model = build_model("efficientnet_lite0", data.num_classes, 32)
    first, seconds = features.for_model(model, data, spec, "imagenet", 32)
    again, again_seconds = features.for_model(model, data, spec, "imagenet", 32)
    assert seconds > 0 and again_seconds == 0.0
    assert first["train"][0].shape == (27, 1280) and list(first["train"][1]) == list(again["train"][1])
    np.testing.assert_array_equal(first["test"][0], again["test"][0])
    key = features.feature_key(spec.name, "imagenet:x", 32, spec.preprocessing, data)
    other_data = load_data(str(data.name), 32, seed=1)
    assert key != features.feature_key(spec.name, "imagenet:x", 32, spec.preprocessing, other_data)
    assert key != features.feature_key(spec.name, "imagenet:y", 32, spec.preprocessing, data)
    assert key != features.feature_key(spec.name, "imagenet:x", 64, spec.preprocessing, data)
    assert key != features.feature_key("mobilenet_v2", "imagenet:x", 32, spec.preprocessing, data)


def test_no_cache_with_augmentation_or_random_weights(data):
    spec = get_spec("efficientnet_lite0")
    augmented = build_model("efficientnet_lite0", data.num_classes, 32, augment=True)
    assert features.for_model(augmented, data, spec, "imagenet", 32) == (None, 0.0)
    random_init = build_model("efficientnet_lite0", data.num_classes, 32, weights=None)
    assert features.for_model(random_init, data, spec, None, 32) == (None, 0.0)


def test_a_head_alone_on_features_is_the_head_of_the_full_model(data):
    """What a head-only sweep trial does: train the head alone, build the full model only to export."""
    full_model, full = _trained(data, use_cache=True, epochs=3, fine_tune_epochs=0)
    cached, _ = features.for_model(full_model, data, get_spec("efficientnet_lite0"), "imagenet", 32)
    keras.utils.set_random_seed(0)
    head = build_head(cached["train"][0].shape[1], data.num_classes, dropout=0.2, seed=0)
    alone = train(head, data, batch_size=8, seed=0, verbose=0, learning_rate=1e-2, features=cached, epochs=3,
                  fine_tune_epochs=0)
    np.testing.assert_allclose(full.history["loss"], alone.history["loss"], rtol=1e-5)
    assert alone.test_accuracy == pytest.approx(full.test_accuracy)
    assembled = build_model("efficientnet_lite0", data.num_classes, 32, dropout=0.2, seed=0, head=head)
    x = next(iter(data.batches("test", 16)))[0]
    np.testing.assert_allclose(assembled.predict(x, verbose=0), full_model.predict(x, verbose=0), rtol=1e-4, atol=1e-6)


def test_a_head_alone_refuses_to_fine_tune_or_train_on_images(data):
    head = build_head(1280, data.num_classes)
    with pytest.raises(ValueError, match="a head alone trains on cached features and cannot fine-tune"):
        train(head, data, epochs=1, fine_tune_epochs=1, unfreeze_from=100, features={})
    with pytest.raises(ValueError, match="a head alone trains on cached features"):
        train(head, data, epochs=1)


def test_a_full_model_built_from_a_head_fine_tunes_from_where_the_head_stopped(data):
    """The staged search's stage 2: a never-compiled full model takes a trained head and fine-tunes."""
    spec = get_spec("efficientnet_lite0")
    cached, _ = features.for_model(build_model("efficientnet_lite0", data.num_classes, 32), data, spec, "imagenet", 32)
    head = build_head(cached["train"][0].shape[1], data.num_classes, seed=0)
    alone = train(head, data, batch_size=8, seed=0, verbose=0, learning_rate=1e-2, features=cached, epochs=2,
                  fine_tune_epochs=0)
    full = build_model("efficientnet_lite0", data.num_classes, 32, seed=0, head=head)
    result = train(full, data, batch_size=8, seed=0, verbose=0, features=cached, epochs=2, fine_tune_epochs=1,
                   unfreeze_from=120, initial_epoch=2)
    assert result.first_epoch == 2 and len(result.history["val_accuracy"]) == 1
    assert result.head_test_accuracy == pytest.approx(alone.test_accuracy), "it starts from the trained head"
    assert float(full.optimizer.learning_rate) == pytest.approx(1e-5)


def test_feature_batches_are_not_converted_by_autograph():
    """tf.data runs its map functions through autograph unless told not to, and a process pays the conversion the
    first time (each fresh trial process did, on its path). Checked in a fresh process: in this one an earlier test
    may have converted the function already."""
    code = ("import sys, numpy as np; from pipeline.features import feature_batches; "
            "ds = feature_batches((np.zeros((5, 3), 'float32'), np.zeros(5, 'int32')), 2, shuffle=True); "
            "assert [len(x) for x, _ in ds] == [2, 2, 1]; "
            "print(sorted(m for m in sys.modules if m.startswith('__autograph_generated')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("shuffle", [False, True])
def test_feature_batches_are_the_rows_in_the_order_images_are_batched(tmp_path, shuffle):
    """Batches gathered from a memory-mapped array by shuffled row indices are the rows a shuffle of the rows
    themselves gives (``DataSplits.batches``' shuffle), epoch after epoch; the last batch is partial."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(43, 3, 3, 2)).astype(np.float32))
    x, y = np.load(tmp_path / "x.npy", mmap_mode="r"), rng.integers(0, 5, size=43).astype(np.int32)
    rows = tf.data.Dataset.from_tensor_slices((np.array(x), y))
    if shuffle:
        rows = rows.shuffle(43, seed=3, reshuffle_each_iteration=True)
    expected, got = rows.batch(8), features.feature_batches((x, y), 8, shuffle=shuffle, seed=3)
    assert got.element_spec == expected.element_spec
    orders = []
    for _ in range(3):
        batches = list(got)
        assert [len(b[0]) for b in batches] == [8] * 5 + [3]
        for (ex, ey), (gx, gy) in zip(expected, batches, strict=True):
            np.testing.assert_array_equal(gx.numpy(), ex.numpy())
            np.testing.assert_array_equal(gy.numpy(), ey.numpy())
        orders.append(np.concatenate([b[1].numpy() for b in batches]))
    assert shuffle == any(not np.array_equal(orders[0], o) for o in orders[1:])  # reshuffled each epoch
