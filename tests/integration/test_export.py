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


def test_an_export_is_replaced_only_with_overwrite_and_nothing_else_ever(model, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # not an export: never replaced
        with pytest.raises(UserError, match=r"export already exists and is not tlsweep's export: it holds 1 entry "
                                            r"\(keep.txt\) and no .tlsweep marker; .* even with --overwrite"):
            export_model(model, out, ["a", "b", "c"], overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "precious"
    other = export_model(model, tmp_path / "e2", ["a", "b", "c"])
    assert (other / ".tlsweep").read_text().startswith("export\n"), "an export says it is tlsweep's"
    with pytest.raises(UserError, match=r"e2 already exists \(tlsweep's export\); pass --overwrite to replace it"):
        export_model(model, other, ["x", "y", "z"])
    export_model(model, other, ["x", "y", "z"], overwrite=True)
    assert (other / "labels.txt").read_text() == "x\ny\nz\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e2", "export"], "no temporary directories left behind"


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


def _perturbed(model, seed):
    """The same architecture with other weights, as another trial of a sweep would have trained it."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.dtype.kind == "f" else w
                       for w in model.get_weights()])
    return model


def _served(out, images):
    exported = ExportedModel(out)
    return exported.predict(images)


@pytest.mark.parametrize("kind", ["plain", pytest.param("ensemble", marks=pytest.mark.slow),
                                  pytest.param("mixed_float16", marks=pytest.mark.slow)])
def test_an_export_that_reuses_its_architectures_graph_gives_the_models_own_predictions(kind, tmp_path):
    """A sweep traces each architecture's graph once and writes only the weights of later exports: each export must
    still predict what its own model predicts (tolerance: 1e-5 absolute on probabilities in float32, 2e-3 with
    float16 compute), and differ from the first model's."""
    from pipeline.model import average_of

    def make(seed):
        if kind == "ensemble":  # two members at two sizes: two inputs
            members = [build_model("efficientnet_lite0", 3, s, weights=None, seed=seed + s) for s in (32, 40)]
            for size, member in zip((32, 40), members):
                member.name = f"member_{size}"  # unique inside the ensemble, as sweeps.ensemble names them
            return _perturbed(average_of(members), seed)
        policy = "mixed_float16" if kind == "mixed_float16" else "float32"
        return _perturbed(build_model("efficientnet_lite0", 3, 32, weights=None, seed=seed, precision=policy), seed)

    rng = np.random.default_rng(0)
    images = ({"image_32": rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"),
               "image_40": rng.uniform(0, 255, (4, 40, 40, 3)).astype("float32")} if kind == "ensemble"
              else rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"))
    tolerance = 2e-3 if kind == "mixed_float16" else 1e-5
    cache = tmp_path / "graph"
    first, second = make(1), make(2)
    export_model(first, tmp_path / "first", ["a", "b", "c"], graph_cache=cache, keras_file=False)
    assert (cache / "saved_model.pb").exists(), "the first export traced the graph and kept it"
    out = export_model(second, tmp_path / "second", ["a", "b", "c"], graph_cache=cache, keras_file=False)
    assert (out / "saved_model.pb").stat().st_ino == (cache / "saved_model.pb").stat().st_ino, "the graph was reused"
    own = second.predict(list(images.values()) if kind == "ensemble" else images, verbose=0)
    np.testing.assert_allclose(_served(out, images), own, atol=tolerance)
    np.testing.assert_allclose(_served(tmp_path / "first", images),
                               first.predict(list(images.values()) if kind == "ensemble" else images, verbose=0),
                               atol=tolerance)
    assert np.abs(_served(out, images) - _served(tmp_path / "first", images)).max() > 10 * tolerance


def test_a_model_of_another_shape_is_traced_afresh_not_given_the_cached_graph(tmp_path):
    cache = tmp_path / "graph"
    export_model(build_model("efficientnet_lite0", 3, 32, weights=None, seed=0), tmp_path / "a", ["a", "b", "c"],
                 graph_cache=cache, keras_file=False)
    other = build_model("efficientnet_lite0", 4, 32, weights=None, seed=0)  # four classes: another head
    out = export_model(other, tmp_path / "b", list("abcd"), graph_cache=cache, keras_file=False)
    assert (out / "saved_model.pb").stat().st_ino != (cache / "saved_model.pb").stat().st_ino
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(_served(out, x), other.predict(x, verbose=0), atol=1e-5)
