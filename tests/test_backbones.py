import numpy as np
import pytest

from pipeline.backbones import REGISTRY, build_backbone, get_spec, known_names
from pipeline.errors import UserError


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_spec_layer_count_matches_the_built_backbone(name):
    spec = get_spec(name)
    size = max(spec.min_size, 32)
    base = build_backbone(spec, size, weights=None)
    assert len(base.layers) == spec.layer_count
    assert base.output_shape[0] is None and len(base.output_shape) == 4
    assert spec.native_size >= size and spec.weight_source


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown backbone 'resnet9000'; known backbones: .*efficientnet_lite0.*mobilenet_v2"):
        get_spec("resnet9000")
    assert "hub:<tfhub.dev URL or local SavedModel dir>" in known_names()


@pytest.mark.parametrize("name,size", [("xception", 64), ("inception_v3", 40), ("mobilenet_v2", 16)])
def test_image_size_the_backbone_cannot_take(name, size):
    with pytest.raises(UserError, match=rf"image size {size} is too small for backbone '{name}': it needs at least"):
        build_backbone(get_spec(name), size, weights=None)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"is not 'imagenet', 'none' or an existing weights file"):
        build_backbone(get_spec("mobilenet_v2"), 32, weights=str(tmp_path / "nope.h5"))


def test_local_weights_file_is_loaded(tmp_path):
    spec = get_spec("efficientnet_lite0")
    source = build_backbone(spec, 32, weights=None)
    path = tmp_path / "lite0_notop.weights.h5"
    source.save_weights(path)
    loaded = build_backbone(spec, 32, weights=str(path))
    np.testing.assert_array_equal(source.get_layer("stem_conv").get_weights()[0], loaded.get_layer("stem_conv").get_weights()[0])


def test_hub_handle_must_be_url_or_existing_dir(tmp_path):
    with pytest.raises(UserError, match=r"neither a URL nor an existing SavedModel directory"):
        get_spec(f"hub:{tmp_path / 'missing'}")
    spec = get_spec("hub:https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4")
    assert spec.hub_handle.startswith("https://") and spec.preprocessing["scale"][0] == pytest.approx(1 / 255)


def test_local_hub_savedmodel_as_backbone(hub_dir):
    base = build_backbone(get_spec(f"hub:{hub_dir}"), 32)
    features = base(np.full((2, 32, 32, 3), 0.7, "float32"))
    assert features.shape == (2, 16)
    assert base.output_shape == (None, 16)
