import numpy as np
import pytest
import tensorflow as tf

from pipeline.errors import UserError
from pipeline.export import ExportedModel, export_model, load_keras_model
from pipeline.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("efficientnet_lite0", 3, 32, weights="imagenet", augment=True, seed=0)


def test_savedmodel_round_trip_matches_in_memory_model(model, tmp_path):
    out = export_model(model, tmp_path / "export", ["a", "b", "c"], metadata={"backbone": "efficientnet_lite0"})
    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    expected = model.predict(x, verbose=0)

    loaded = tf.saved_model.load(str(out))
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, 32, 32, 3]
    (probs,) = serve(tf.constant(x)).values()
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-4, atol=1e-6)

    exported = ExportedModel(out)
    assert exported.class_names == ["a", "b", "c"] and exported.image_size == 32
    np.testing.assert_allclose(exported.predict(x, batch_size=2), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(load_keras_model(out / "model.keras").predict(x, verbose=0), expected, rtol=1e-5)
    assert (out / "labels.txt").read_text() == "a\nb\nc\n"


def test_existing_export_directory_is_not_overwritten_unless_asked(model, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match=r"export directory .* already exists and is not empty; .*--overwrite"):
        export_model(model, out, ["a", "b", "c"])
    assert (out / "keep.txt").read_text() == "precious"
    export_model(model, out, ["a", "b", "c"], overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "saved_model.pb").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"], "no temporary directories left behind"


def test_not_an_export(tmp_path):
    with pytest.raises(UserError, match=r"is not an export: expected saved_model.pb and labels.txt"):
        ExportedModel(tmp_path)


def test_an_export_with_an_input_per_size_is_scored_on_the_same_photos_at_each_size(tmp_path, class_folder):
    import keras

    from pipeline.data import load_data
    from pipeline.model import average_of

    def member(size: int, name: str) -> keras.Model:
        image = keras.Input((size, size, 3))
        probs = keras.layers.Dense(3, "softmax")(keras.layers.GlobalAveragePooling2D()(image))
        return keras.Model(image, probs, name=name)

    exported = ExportedModel(export_model(average_of([member(24, "a"), member(32, "b")]), tmp_path / "e",
                                          ["blue", "green", "red"]))
    assert exported.inputs == {"image_24": 24, "image_32": 32} and exported.input_shape == {
        "image_24": (24, 24, 3), "image_32": (32, 32, 3)}
    data = exported.load_data(str(class_folder), seed=0, split="60/20/20")
    alone = {s: load_data(str(class_folder), s, seed=0, split="60/20/20") for s in (24, 32)}
    assert data.sizes == alone[24].sizes and data.class_names == alone[24].class_names
    batches = list(data.batches("test", 4))
    assert sum(len(y) for _, y in batches) == data.sizes["test"] > 4
    for s in (24, 32):  # the same photos, in the same order, as each size alone gives them
        expected = np.concatenate([x.numpy() for x, _ in alone[s].batches("test", 4)])
        np.testing.assert_array_equal(np.concatenate([x[f"image_{s}"] for x, _ in batches]), expected)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]),
                                  np.concatenate([y.numpy() for _, y in alone[24].batches("test", 4)]))
    assert exported.predict(batches[0][0]).shape == (4, 3)


def test_the_savedmodel_holds_each_weight_once_and_serves_a_hub_backbone_too(tmp_path, hub_dir, model):
    from pipeline.cost import savedmodel_size_mb

    out = export_model(model, tmp_path / "lite", ["a", "b", "c"])
    weights_mb = sum(v.numpy().nbytes for v in model.variables) / 1e6
    assert weights_mb < savedmodel_size_mb(out) < 1.2 * weights_mb, "each variable once, plus the graph"

    hub = build_model(f"hub:{hub_dir}", 2, 32, weights=None, seed=0)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    exported = ExportedModel(export_model(hub, tmp_path / "hub", ["a", "b"]))
    np.testing.assert_allclose(exported.predict(x), hub.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
