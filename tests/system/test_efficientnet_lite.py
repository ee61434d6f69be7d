import numpy as np
import pytest
import tensorflow as tf

from support import FLOWERS, needs_flowers
from pipeline.efficientnet_lite import (
    VARIANTS,
    EfficientNetLite,
    EfficientNetLite0,
    imagenet_weights_file,
    notop_weights_file,
    torch_weights_path,
)
from pipeline.torch_legacy import load_legacy_state_dict

IMAGENET_DAISY = 985
LITES = sorted(VARIANTS)
# Shapes read from the pickles: Lite0 has 16 blocks, Lite1 and Lite2 21; Lite2 is 1.1x wider (320 -> 352).
LAST_BLOCK = {"efficientnet_lite0": (15, 320, 1152), "efficientnet_lite1": (20, 320, 1152),
              "efficientnet_lite2": (20, 352, 1248)}


@pytest.mark.parametrize("name", LITES)
def test_legacy_checkpoint_reads_without_torch(name):
    state = load_legacy_state_dict(torch_weights_path(name))
    block, out, mid = LAST_BLOCK[name]
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state[f"_blocks.{block}._project_conv.weight"].shape == (out, mid, 1, 1)
    assert f"_blocks.{block + 1}._project_conv.weight" not in state
    assert state["_conv_head.weight"].shape == (1280, out, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")


def test_lite0_keeps_its_builder_and_cache_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    assert imagenet_weights_file() == str(tmp_path / "efficientnet_lite0_imagenet.weights.h5")
    model = EfficientNetLite0((32, 32, 3), weights=None)
    assert model.name == "efficientnet_lite0" and len(model.layers) == 141


@pytest.mark.parametrize("name", LITES)
def test_conversion_is_cached_once(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    first = imagenet_weights_file(name)
    target = tmp_path / f"{name}_imagenet.weights.h5"
    mtime = target.stat().st_mtime_ns
    assert imagenet_weights_file(name) == first == str(target)
    assert target.stat().st_mtime_ns == mtime


def test_notop_weights_load_without_a_second_model_and_equal_the_full_models(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    full = EfficientNetLite0((32, 32, 3), include_top=True, weights="imagenet")
    notop = EfficientNetLite0((48, 48, 3), include_top=False, weights="imagenet")  # weights do not depend on size
    target = tmp_path / "efficientnet_lite0_imagenet_notop.npz"
    assert notop_weights_file() == str(target)
    mtime = target.stat().st_mtime_ns
    assert len(notop.layers) == len(full.layers) - 2
    for layer in (la for la in notop.layers if la.weights):
        for mine, theirs in zip(layer.get_weights(), full.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    EfficientNetLite0((32, 32, 3), weights="imagenet")
    assert target.stat().st_mtime_ns == mtime  # written once


@needs_flowers()
@pytest.mark.parametrize("name", LITES)
def test_converted_weights_label_daisies_as_imagenet_daisy(name):
    size = VARIANTS[name].native_size
    model = EfficientNetLite(name, (size, size, 3), include_top=True, weights="imagenet")
    files = sorted((FLOWERS / "daisy").glob("*.jpg"))[:24]
    images = np.stack(
        [tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(str(f)), channels=3), (size, size)).numpy() for f in files]
    )
    top = model.predict((images - 127.0) / 128.0, verbose=0).argmax(axis=1)
    print(f"{name} at {size} px: {(top == IMAGENET_DAISY).mean():.4f} of {len(files)} daisies -> class 985")
    assert (top == IMAGENET_DAISY).mean() >= 0.8, top


@pytest.mark.parametrize("name", LITES)
def test_notop_backbone_matches_the_full_model_features(name):
    full = EfficientNetLite(name, (64, 64, 3), include_top=True, weights="imagenet")
    notop = EfficientNetLite(name, (64, 64, 3), include_top=False, weights="imagenet")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    features = notop.predict(x, verbose=0).mean(axis=(1, 2))
    dense = full.get_layer("predictions")
    np.testing.assert_allclose(
        full.predict(x, verbose=0), dense(features).numpy(), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name", LITES)
def test_registry_entry_agrees_with_the_variant(name):
    from pipeline.backbones import get_spec

    spec, v = get_spec(name), VARIANTS[name]
    assert (spec.native_size, spec.weights_package) == (v.native_size, v.package)
    assert v.package in spec.weight_source and spec.preprocessing["scale"][0] == pytest.approx(1 / 128)


def test_conversion_fails_on_weights_that_do_not_fit_the_variant_exactly():
    from pipeline.efficientnet_lite import assign_torch_weights

    lite2 = EfficientNetLite("efficientnet_lite2", (32, 32, 3), include_top=True, weights=None)
    with pytest.raises(ValueError, match="not compatible"):  # Lite1 is narrower (24 -> 40 vs 24 -> 48 at block 4)
        assign_torch_weights(lite2, load_legacy_state_dict(torch_weights_path("efficientnet_lite1")))
    lite1 = EfficientNetLite("efficientnet_lite1", (32, 32, 3), include_top=True, weights=None)
    extra = load_legacy_state_dict(torch_weights_path("efficientnet_lite1")) | {"_blocks.21._bn1.weight": np.zeros(8)}
    with pytest.raises(ValueError, match=r"unconverted efficientnet_lite1 weights: \['_blocks\.21\._bn1\.weight'\]"):
        assign_torch_weights(lite1, extra)
