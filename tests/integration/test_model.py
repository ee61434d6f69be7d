import keras
import numpy as np
import pytest

from pipeline.backbones import get_spec
from pipeline.errors import UserError
from pipeline.model import backbone_of, build_model, compile_model, resolve_fine_tune_at, set_trainable


@pytest.mark.parametrize(
    "value,expected",
    [(0, None), ("0", None), ("none", None), (None, None), ("all", 0), (100, 100), ("100", 100), (100.0, 100),
     (0.65, 100), ("0.5", 77), (153, 153)],
)
def test_fine_tune_at_index_fraction_all_none(value, expected):
    assert resolve_fine_tune_at(value, get_spec("mobilenet_v2")) == expected


@pytest.mark.parametrize(
    "value,message",
    [(154, r"fine_tune_at 154 is beyond the depth of mobilenet_v2 \(154 layers\); give 1..153"),
     ("deep", r"fine_tune_at 'deep' is not a layer index, a fraction, 'all' or 'none'"),
     (-3, r"fine_tune_at -3 is not a layer index"),
     (10.5, r"fine_tune_at 10.5 is beyond the depth")],
)
def test_fine_tune_at_rejects(value, message):
    with pytest.raises(UserError, match=message):
        resolve_fine_tune_at(value, get_spec("mobilenet_v2"))


def test_model_takes_raw_pixels_and_preprocesses_inside():
    model = build_model("mobilenet_v2", 3, 32, weights=None)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    pre = model.get_layer("preprocess")
    np.testing.assert_allclose(pre(np.array([[[[0.0, 127.5, 255.0]]]], "float32")).numpy(), [[[[-1, 0, 1]]]], atol=1e-6)
    probs = model.predict(np.random.uniform(0, 255, (2, 32, 32, 3)).astype("float32"), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_resnet_preprocessing_is_caffe_bgr():
    pre = build_model("resnet50", 2, 32, weights=None).get_layer("preprocess")
    out = pre(np.array([[[[10.0, 20.0, 30.0]]]], "float32")).numpy().ravel()
    np.testing.assert_allclose(out, [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5)


def test_backbone_frozen_then_unfrozen_from_index_with_batchnorm_kept_frozen():
    model = build_model("mobilenet_v2", 2, 32, weights=None)
    base = backbone_of(model)
    head_params = set_trainable(model, None)
    assert head_params == 1280 * 2 + 2 and not base.trainable_weights
    set_trainable(model, 100)
    for i, layer in enumerate(base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (i >= 100 and not is_bn), (i, layer.name)
    assert any(l.trainable for l in base.layers[100:])
    set_trainable(model, None)
    assert not base.trainable_weights


def test_batchnorm_statistics_do_not_move_when_fine_tuning():
    model = build_model("efficientnet_lite0", 2, 32, weights=None)
    set_trainable(model, 0)
    compile_model(model, 1e-3)
    bn = backbone_of(model).get_layer("top_bn")
    before = [w.numpy().copy() for w in bn.weights]
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(x, np.array([0, 1] * 4), epochs=1, verbose=0)
    for b, w in zip(before, bn.weights):
        np.testing.assert_array_equal(b, w.numpy())


def test_augmentation_only_in_training():
    model = build_model("mobilenet_v2", 2, 32, augment=True, weights=None, seed=1)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    aug = model.get_layer("augmentation")
    np.testing.assert_array_equal(aug(x, training=False).numpy(), x)
    assert not np.allclose(aug(x, training=True).numpy(), x)
    np.testing.assert_allclose(model(x, training=False).numpy(), model(x, training=False).numpy())


def test_hub_backbone_frozen_then_fine_tuned_as_a_whole(hub_dir):
    model = build_model(f"hub:{hub_dir}", 2, 32, weights=None)
    assert model.output_shape == (None, 2)
    assert set_trainable(model, None) == 16 * 2 + 2
    unfreeze = resolve_fine_tune_at("all", get_spec(f"hub:{hub_dir}"))
    assert set_trainable(model, unfreeze) == 16 * 2 + 2 + 3 * 16
    compile_model(model, 0.1)
    kernel = backbone_of(model).layers[1].weights[0]
    before = kernel.numpy().copy()
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(x, np.array([0, 1] * 4), epochs=2, verbose=0)
    assert not np.allclose(before, kernel.numpy()), "fine-tuning must update the SavedModel's own variables"


def test_bad_dropout_and_classes():
    with pytest.raises(UserError, match=r"dropout must be in \[0, 1\), got 1.5"):
        build_model("mobilenet_v2", 2, 32, dropout=1.5, weights=None)
    with pytest.raises(UserError, match=r"a classifier needs at least 2 classes, got 1"):
        build_model("mobilenet_v2", 1, 32, weights=None)


def test_head_initialisation_depends_on_the_seed_only(tmp_path, monkeypatch):
    """A first-time weight conversion draws random numbers; the seeded head must not notice."""
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))  # empty: the first build converts the weights
    keras.utils.set_random_seed(7)
    first = build_model("efficientnet_lite0", 3, 32, seed=7).get_layer("classifier").get_weights()[0]
    keras.utils.set_random_seed(7)
    second = build_model("efficientnet_lite0", 3, 32, seed=7).get_layer("classifier").get_weights()[0]
    np.testing.assert_array_equal(first, second)


def test_mixed_precision_computes_in_float16_and_outputs_float32_probabilities():
    before = keras.mixed_precision.dtype_policy().name
    model = build_model("efficientnet_lite0", 3, 32, seed=0, precision="mixed_float16")
    assert keras.mixed_precision.dtype_policy().name == before, "the global policy is restored"
    assert backbone_of(model).get_layer("top_conv").compute_dtype == "float16"
    reference = build_model("efficientnet_lite0", 3, 32, seed=0)
    reference.set_weights(model.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    probs = model.predict(x, verbose=0)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, reference.predict(x, verbose=0), atol=2e-2)


@pytest.mark.slow
def test_xla_training_matches_plain_training(class_folder):
    from pipeline.data import load_data
    from pipeline.training import train

    data = load_data(str(class_folder), 32, seed=0)
    losses = []
    for jit in (False, True):  # no dropout: XLA draws random masks with another algorithm
        keras.utils.set_random_seed(0)
        model = build_model("efficientnet_lite0", 3, 32, seed=0, dropout=0.0)
        result = train(model, data, epochs=2, fine_tune_epochs=1, unfreeze_from=130, batch_size=8, seed=0,
                       verbose=0, learning_rate=1e-2, jit_compile=jit, evaluate_test=False)
        losses.append(result.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)
