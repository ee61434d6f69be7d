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
