"""The sweep's ensemble of trials: chosen on validation only, logged and exported like a trial."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.export import ExportedModel
from sweeps import ensemble
from sweeps.config import parse_sweep
from sweeps.run import run_sweep
from tracking import layout
from tracking import leaderboard as lb
from tracking.pyfunc import download_export
from test_sweep import TINY, children, write_sweep
from tracking.runs import values


def one_hot(classes: list[int], n: int = 3, confidence: float = 0.8) -> np.ndarray:
    probs = np.full((len(classes), n), (1 - confidence) / (n - 1))
    probs[np.arange(len(classes)), classes] = confidence
    return probs


def test_selection_adds_trials_that_err_elsewhere_and_stops_when_nothing_improves():
    labels = np.array([0, 1, 2, 0, 1, 2])
    a = one_hot([0, 1, 2, 0, 2, 1])  # wrong on the last two
    b = one_hot([0, 1, 2, 1, 1, 2], confidence=0.9)  # wrong on the fourth only: the best alone
    c = one_hot([1, 0, 2, 0, 1, 2], confidence=0.6)  # wrong on the first two, where the others are right
    assert ensemble.score(b, labels)[0] == pytest.approx(5 / 6)
    picks = ensemble.select([a, b, c], labels, size=5)
    assert picks[0] == 1 and len(set(picks)) >= 2
    together = sum([a, b, c][i] for i in picks) / len(picks)
    assert ensemble.score(together, labels) > ensemble.score(b, labels)
    assert ensemble.select([a, b, c], labels, size=1) == [1]
    assert ensemble.select([b, b * 0 + 1 / 3], labels, size=5) == [0], "a candidate that helps nothing is not added"


def test_the_sweep_setting_takes_true_false_or_a_number_and_says_what_it_wants():
    assert parse_sweep({}, "s").ensemble == 0
    assert parse_sweep({"ensemble": True}, "s").ensemble == 5
    assert parse_sweep({"ensemble": 3}, "s").ensemble == 3
    assert parse_sweep({"ensemble": False}, "s").ensemble == 0
    for bad, shown in (("yes", "'yes'"), (1, "1"), (-2, "-2"), (2.5, "2.5")):
        with pytest.raises(UserError, match=r"ensemble in sweep s must be true, false or the most trials an ensemble "
                                            rf"picks \(a whole number >= 2, or 0 for none\), got {shown}$"):
            parse_sweep({"ensemble": bad}, "s")


@pytest.fixture
def swept_with_models(tmp_path, tracking_store, class_folder):
    config = {**TINY, "tuner": "random", "max_trials": 3, "space": {
        **TINY["space"], "learning_rate": {"choice": [0.003, 0.01, 0.03]}, "dropout": {"fixed": 0.1},
        "fine_tune": {"boolean": True}}}
    parent = run_sweep(str(class_folder), sweep=write_sweep(tmp_path, config), experiment="ens", split="60/20/20",
                       state_dir=str(tmp_path / "state"), verbose=0)
    return tmp_path, parent


@pytest.mark.slow  # a real sweep of three trials, two ensembles built and exported: about a minute here
def test_trials_log_probabilities_and_an_ensemble_is_exported_scored_and_ranked_like_a_trial(swept_with_models):
    tmp_path, parent = swept_with_models
    rows, probs = ensemble.candidates("ens", parent)
    assert len(rows) == 3 and len(probs) == 3  # log_models: all
    for (_, row), p in zip(rows.iterrows(), probs):
        assert p["val_probs"].shape == (9, 3) and p["test_probs"].shape == (6, 3)
        assert np.allclose(p["val_probs"].sum(axis=1), 1, atol=1e-5)
        # the final model's predictions: the same accuracies the trial logged from its last epoch and test pass
        assert ensemble.score(p["val_probs"], p["val_labels"])[0] == pytest.approx(float(row[layout.VAL_ACCURACY]))
        assert ensemble.score(p["test_probs"], p["test_labels"])[0] == pytest.approx(float(row[layout.TEST_ACCURACY]))

    # what the sweep's end does: kept only when the validation average of its picks beats the best trial alone
    said: list[str] = []
    built = ensemble.build("ens", parent, 5, say=said.append)
    picks = ensemble.select([p["val_probs"] for p in probs], probs[0]["val_labels"], 5)
    alone = max(ensemble.score(p["val_probs"], p["val_labels"])[0] for p in probs)
    together = ensemble.score(sum(probs[i]["val_probs"] for i in picks) / len(picks), probs[0]["val_labels"])[0]
    if len(set(picks)) > 1 and together > alone:
        assert built is not None and MlflowClient().get_run(built).data.metrics[layout.VAL_ACCURACY] > 0
    else:
        assert built is None and said == [f"[sweep] ensemble: no average of 3 trials with models beats the best trial "
                                          f"on validation ({alone:.4f}); none kept"]

    client = MlflowClient()
    trials = children("ens", parent)
    members = [trials[0].info.run_id, trials[1].info.run_id, trials[0].info.run_id]
    names = "+".join(client.get_run(m).data.tags[layout.TRIAL_ID] for m in members)
    run_id = ensemble.log_run("ens", parent, members, names, say=lambda line: None)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[layout.KIND] == layout.ENSEMBLE
    assert run.data.tags[layout.ENSEMBLE_MEMBERS] == ",".join(members)
    assert run.data.tags[layout.PARENT_RUN_ID] == parent and layout.MODEL_URI in run.data.tags
    m, p = run.data.metrics, values(run)
    assert p["data_name"] == values(trials[0])["data_name"] and p["validation_size"] == "9"
    for name in (layout.VAL_ACCURACY, layout.TEST_ACCURACY, layout.TEST_LOSS, layout.SIZE_MB, layout.LATENCY_MS,
                 *layout.INTERVAL_METRICS):
        assert name in m, name
    # the logged scores are the export's own, on the same test images best-export checks it on
    exported = ExportedModel(download_export(run, tmp_path / "dl"))
    _, member_probs = ensemble.candidates("ens", parent)
    labels = member_probs[0]["test_labels"]
    data = exported.load_data(p["data_name"], seed=int(p["seed"]), split=p["split"])
    probs = np.concatenate([exported.predict(x) for x, _ in data.batches("test", 64)])
    assert float(np.mean(probs.argmax(axis=1) == labels)) == pytest.approx(m[layout.TEST_ACCURACY])
    by_id = {t.info.run_id: i for i, t in enumerate(trials)}
    stored = [member_probs[k] for k in range(3)]
    rows, _ = ensemble.candidates("ens", parent)
    order = {r: i for i, r in enumerate(rows["run_id"])}
    average = sum(stored[order[mm]]["test_probs"] for mm in members) / 3
    assert np.allclose(probs, average, atol=1e-4), "the export averages its members, the first one twice"
    assert set(by_id) <= set(lb.trial_runs("ens", parent)["run_id"])
    table = lb.leaderboard(lb.trial_runs("ens", parent))
    assert f"ensemble {names}" in set(table["trial_id"]) and len(table) == 4 + (built is not None)
    # the same members again: no second run
    assert ensemble.existing("ens", parent, members) == run_id
    # an export that does not beat the best trial on validation is not logged, and says so
    said.clear()
    assert ensemble.log_run("ens", parent, members[:2], "x", say=said.append, must_beat=1.0) is None
    assert said[0].startswith("[sweep] ensemble of trials x: its export scores val_accuracy ")
    assert said[0].endswith(", not above the best trial's 1.0000; none kept")
    assert len(lb.trial_runs("ens", parent)) == 4 + (built is not None)


def test_members_at_two_sizes_take_one_input_each_through_export_tflite_pyfunc_and_predict(tmp_path, tracking_store,
                                                                                          capsys, class_folder):
    import keras
    import mlflow
    from PIL import Image

    from pipeline.cli import main as cli_main
    from pipeline.data import read_image
    from pipeline.export import ExportedModel, TFLiteModel, export_model, to_tflite
    from pipeline.model import average_of
    from tracking.pyfunc import log_model

    def member(size: int, seed: int, name: str) -> keras.Model:  # small, with confident image-dependent outputs
        image = keras.Input((size, size, 3))
        x = keras.layers.Conv2D(8, 3, strides=2, kernel_initializer=keras.initializers.RandomNormal(0, 1, seed))(
            keras.layers.Rescaling(1 / 255)(image))
        x = keras.layers.Flatten()(x)  # every pixel counts: a member fed another resize answers otherwise
        out = keras.layers.Dense(3, "softmax", kernel_initializer=keras.initializers.RandomNormal(0, 0.01, seed))(x)
        return keras.Model(image, out, name=name)

    small, large = member(32, 1, "trial_0"), member(40, 2, "trial_1")
    model = average_of([small, large, large])
    assert [t.name for t in model.inputs] == ["image_32", "image_40"]
    photos = np.random.RandomState(0).uniform(0, 255, (3, 57, 71, 3)).astype(np.uint8)
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(tmp_path / f"p{i}.png")
    paths = [tmp_path / f"p{i}.png" for i in range(3)]
    # each member sees the photo resized once, to its own size, exactly as for training
    images = {f"image_{s}": np.stack([read_image(p, s) for p in paths]).astype(np.float32) for s in (32, 40)}
    by_hand = (small.predict(images["image_32"], verbose=0) + 2 * large.predict(images["image_40"], verbose=0)) / 3
    resized_again = small.predict(keras.ops.image.resize(images["image_40"], (32, 32)), verbose=0)
    assert np.abs(resized_again - small.predict(images["image_32"], verbose=0)).max() > 1e-4, "the check can fail"
    export = export_model(model, tmp_path / "e", ["a", "b", "c"])
    exported = ExportedModel(export)
    assert exported.inputs == {"image_32": 32, "image_40": 40} and exported.image_size == 40
    served = exported.predict(images)
    assert np.allclose(served, by_hand, atol=1e-5), "the large member counts twice"
    with pytest.raises(ValueError, match=r"the model takes 2 inputs \(image_32, image_40: the images at each size\)"):
        exported.predict(images["image_40"])
    lite = TFLiteModel(to_tflite(export, "float16")).predict(images)
    assert np.abs(lite - served).max() < 0.02
    experiment = mlflow.create_experiment("two-sizes", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        uri = log_model(str(export), exported.zeros(), exported.predict(exported.zeros())).model_uri
    assert np.allclose(mlflow.pyfunc.load_model(uri).predict(images), served, atol=1e-5)
    assert cli_main(["predict", "--model", str(export), "--images", str(paths[0]), "--top-k", "1"]) == 0
    top = int(np.argmax(served[0]))
    assert capsys.readouterr().out.strip() == f"{paths[0]}: {'abc'[top]} {served[0, top]:.3f}"

    # what best-export and the sweep's ensemble step do with it: score it on a data set at both sizes, cost, TFLite
    from pipeline import cost
    from pipeline.data import load_data
    from sweeps.best import exported_accuracy, tflite_parity

    data = exported.load_data(str(class_folder), seed=0, split="60/20/20")
    at = {s: load_data(str(class_folder), s, seed=0, split="60/20/20") for s in (32, 40)}
    (x32, y), (x40, _) = ([np.concatenate(a) for a in zip(*[(x.numpy(), y.numpy()) for x, y in at[s].batches("test", 64)])]
                          for s in (32, 40))
    expected = (small.predict(x32, verbose=0) + 2 * large.predict(x40, verbose=0)) / 3
    assert exported_accuracy(exported, data) == pytest.approx(float(np.mean(expected.argmax(axis=1) == y)))
    measured = cost.savedmodel_cost(export, model.count_params())
    assert measured.latency_ms > 0 and measured.size_mb > 0
    parity = tflite_parity(exported, data, "float16", run.info.run_id)
    assert parity["agreement"] >= 0.9 and parity["latency_ms"] > 0
