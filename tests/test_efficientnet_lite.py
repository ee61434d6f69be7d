import numpy as np
import tensorflow as tf

from conftest import FLOWERS, needs_flowers
from pipeline.efficientnet_lite import EfficientNetLite0, imagenet_weights_file, torch_weights_path
from pipeline.torch_legacy import load_legacy_state_dict

IMAGENET_DAISY = 985


def test_legacy_checkpoint_reads_without_torch():
    state = load_legacy_state_dict(torch_weights_path())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")


def test_conversion_is_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    first = imagenet_weights_file()
    mtime = tmp_path.joinpath("efficientnet_lite0_imagenet.weights.h5").stat().st_mtime_ns
    assert imagenet_weights_file() == first
    assert tmp_path.joinpath("efficientnet_lite0_imagenet.weights.h5").stat().st_mtime_ns == mtime


@needs_flowers()
def test_converted_weights_label_daisies_as_imagenet_daisy():
    model = EfficientNetLite0((224, 224, 3), include_top=True, weights="imagenet")
    files = sorted((FLOWERS / "daisy").glob("*.jpg"))[:24]
    images = np.stack(
        [tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(str(f)), channels=3), (224, 224)).numpy() for f in files]
    )
    top = model.predict((images - 127.0) / 128.0, verbose=0).argmax(axis=1)
    assert (top == IMAGENET_DAISY).mean() >= 0.8, top


def test_notop_backbone_matches_the_full_model_features():
    full = EfficientNetLite0((64, 64, 3), include_top=True, weights="imagenet")
    notop = EfficientNetLite0((64, 64, 3), include_top=False, weights="imagenet")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    features = notop.predict(x, verbose=0).mean(axis=(1, 2))
    dense = full.get_layer("predictions")
    np.testing.assert_allclose(
        full.predict(x, verbose=0), dense(features).numpy(), rtol=1e-4, atol=1e-5
    )
