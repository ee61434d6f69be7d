import keras
import numpy as np
import pytest

from pipeline.data import load_data
from pipeline.errors import UserError
from pipeline.model import build_model
from pipeline.training import METRICS, evaluate, train


def _run(class_folder, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    data = load_data(str(class_folder), 32, seed=seed)
    model = build_model("efficientnet_lite0", data.num_classes, 32, weights="imagenet", seed=seed)
    return model, train(model, data, batch_size=8, seed=seed, verbose=0, **kwargs)


def test_two_phases_form_one_continuous_history(class_folder):
    model, result = _run(class_folder, epochs=2, fine_tune_epochs=2, unfreeze_from=100, learning_rate=1e-2)
    assert all(len(result.history[k]) == 4 for k in METRICS)
    assert result.fine_tune_start == 2
    # recompiled for fine-tuning with the lower learning rate
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5)
    assert result.trainable_params > 1280 * 3 + 3
    assert 0.0 <= result.test_accuracy <= 1.0 and result.fine_tune_seconds > 0
    assert 0.0 <= result.head_test_accuracy <= 1.0
    # The test scores come from the same pass as the test predictions, and agree with Keras' evaluate.
    data = load_data(str(class_folder), 32, seed=0)
    loss, accuracy = evaluate(model, data, "test", batch_size=8)
    assert result.test_accuracy == pytest.approx(accuracy) and result.test_loss == pytest.approx(loss, rel=1e-4)
    labels, probs = result.test_predictions
    assert len(labels) == data.sizes["test"] and probs.shape == (len(labels), data.num_classes)


def test_head_only_learns_colour_classes_with_real_weights(class_folder):
    _, result = _run(class_folder, epochs=8, fine_tune_epochs=3, unfreeze_from=None, learning_rate=3e-2)
    assert result.fine_tune_start is None and len(result.history["accuracy"]) == 8
    assert result.history["loss"][-1] < result.history["loss"][0]
    assert result.val_accuracy >= 0.8 and result.test_accuracy >= 0.6


@pytest.mark.slow  # the default tier is at ~15 min; CI runs the slow tier too
def test_same_seed_same_result(class_folder):
    _, a = _run(class_folder, seed=5, epochs=2, fine_tune_epochs=0)
    _, b = _run(class_folder, seed=5, epochs=2, fine_tune_epochs=0)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5)
    assert a.test_loss == pytest.approx(b.test_loss, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"epochs": 0}, r"epochs must be a whole number >= 1, got 0"),
     ({"batch_size": -1}, r"batch_size must be a whole number >= 1, got -1"),
     ({"fine_tune_learning_rate": 0}, r"fine_tune_learning_rate must be a number > 0, got 0")],
)
def test_bad_training_arguments(class_folder, kwargs, message):
    data = load_data(str(class_folder), 32)
    model = build_model("mobilenet_v2", data.num_classes, 32, weights=None)
    with pytest.raises(UserError, match=message):
        train(model, data, **kwargs)


def _backbone_flags(model):
    """Which backbone layers have trainable weights (layers without weights do not matter)."""
    from pipeline.model import backbone_of

    return [bool(layer.trainable_weights) for layer in backbone_of(model).layers]


@pytest.mark.slow  # end-to-end Hyperband is in the slow tier as well
def test_sliced_training_as_hyperband_promotes_keeps_phases_and_optimizer_state(class_folder, tmp_path):
    """Hyperband reloads the previous trial's model and continues from initial_epoch: no phase may be
    replayed or skipped, and trainable flags and optimizer state must survive the reload."""
    from pipeline.export import load_keras_model
    from pipeline.model import backbone_of

    keras.utils.set_random_seed(0)
    data = load_data(str(class_folder), 32, seed=0)
    kwargs = dict(epochs=2, fine_tune_epochs=2, unfreeze_from=120, learning_rate=1e-2, fine_tune_learning_rate=1e-4,
                  batch_size=8, seed=0, verbose=0, evaluate_test=False)
    steps = -(-data.sizes["train"] // 8)
    model = build_model("efficientnet_lite0", data.num_classes, 32, seed=0)

    a = train(model, data, initial_epoch=0, stop_epoch=1, **kwargs)  # head epoch 0 only
    assert len(a.history["loss"]) == 1 and a.fine_tune_start is None and not backbone_of(model).trainable_weights
    model.save(tmp_path / "a.keras")

    model = load_keras_model(tmp_path / "a.keras")
    assert int(model.optimizer.iterations) == steps, "optimizer state survives the reload"
    b = train(model, data, initial_epoch=1, stop_epoch=3, **kwargs)  # head epoch 1, then fine-tune epoch 2
    assert b.first_epoch == 1 and len(b.history["loss"]) == 2 and b.fine_tune_start == 2
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4)
    flags = _backbone_flags(model)
    assert any(flags[120:]) and not any(flags[:120])
    iterations = int(model.optimizer.iterations)
    assert iterations == steps, "fine-tuning starts with a fresh optimizer after the recompile"
    model.save(tmp_path / "b.keras")

    model = load_keras_model(tmp_path / "b.keras")
    assert _backbone_flags(model) == flags, "trainable flags survive the reload"
    assert int(model.optimizer.iterations) == iterations
    c = train(model, data, initial_epoch=3, stop_epoch=4, **kwargs)  # fine-tune epoch 3, no recompile
    assert c.first_epoch == 3 and len(c.history["loss"]) == 1 and c.fine_tune_start == 2
    assert int(model.optimizer.iterations) == iterations + steps, "optimizer state continued, not reset"
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4)
    assert _backbone_flags(model) == flags


@pytest.mark.slow  # as the test above: three slices of a full model
def test_hyperband_slices_continue_the_fine_tuning_schedule_and_keep_the_knobs(class_folder, tmp_path):
    """A slice that starts fine-tuning compiles the schedule at step 0; a slice continued from its checkpoint reads the
    step count the checkpoint kept, so its warmup does not start over; AdamW and the smoothed loss survive the reload."""
    from pipeline.export import load_keras_model
    from pipeline.model import DecayingAdamW
    from pipeline.training import fine_tune_rate

    keras.utils.set_random_seed(0)
    data = load_data(str(class_folder), 32, seed=0)
    knobs = dict(label_smoothing=0.1, weight_decay=0.05, fine_tune_schedule="cosine", warmup_epochs=1)
    kwargs = dict(epochs=1, fine_tune_epochs=3, unfreeze_from=120, learning_rate=1e-2, fine_tune_learning_rate=1e-4,
                  batch_size=8, seed=0, verbose=0, evaluate_test=False, **knobs)
    steps = -(-data.sizes["train"] // 8)
    schedule = fine_tune_rate(1e-4, "cosine", 1, 3, steps)
    model = build_model("efficientnet_lite0", data.num_classes, 32, seed=0)
    train(model, data, initial_epoch=0, stop_epoch=2, **kwargs)  # the head epoch, then fine-tuning's first (warmup)
    assert int(model.optimizer.iterations) == steps
    assert float(model.optimizer.learning_rate) == pytest.approx(float(schedule(steps))) == pytest.approx(1e-4)
    model.save(tmp_path / "a.keras")

    model = load_keras_model(tmp_path / "a.keras")
    assert type(model.optimizer) is DecayingAdamW and model.loss.label_smoothing == pytest.approx(0.1)
    train(model, data, initial_epoch=2, stop_epoch=3, **kwargs)  # fine-tuning's second epoch, not a second warmup
    assert int(model.optimizer.iterations) == 2 * steps
    assert float(model.optimizer.learning_rate) == pytest.approx(float(schedule(2 * steps)))
    assert float(schedule(2 * steps)) == pytest.approx(1e-4 * 0.5, rel=1e-3), "halfway down the cosine"


def test_a_callback_that_stops_the_head_phase_ends_the_run_without_fine_tuning(class_folder):
    from pipeline.pruning import PruneCallback

    pruner = PruneCallback({1: 2.0})  # no accuracy reaches 2.0: pruned at epoch 1 (0-based)
    _, result = _run(class_folder, epochs=3, fine_tune_epochs=2, unfreeze_from=100, learning_rate=1e-2,
                     callbacks=[pruner])
    assert pruner.pruned_at == 1
    assert all(len(result.history[k]) == 2 for k in METRICS), "no further head epoch, no fine-tuning"
    assert result.fine_tune_start is None and result.fine_tune_seconds == 0
    assert result.val_accuracy == result.history["val_accuracy"][-1] and 0 <= result.test_accuracy <= 1


def _cut_run(class_folder, tmp_path):
    """2 head epochs on cached features, then 2 fine-tuning epochs of the top on cached activations at 105."""
    from pipeline import cut as cuts
    from pipeline import features
    from pipeline.backbones import get_spec

    keras.utils.set_random_seed(0)
    data = load_data(str(class_folder), 32, seed=0)
    model = build_model("efficientnet_lite0", data.num_classes, 32, weights="imagenet", seed=0)
    cached, _ = features.for_model(model, data, get_spec("efficientnet_lite0"), "imagenet", 32)
    split = cuts.split(model, 105)
    at_cut = (split, cuts.load_or_compute(split, data, "k", root=tmp_path)[0])
    return data, train(model, data, features=cached, cut=at_cut, epochs=2, fine_tune_epochs=2, unfreeze_from=105,
                       batch_size=8, seed=0, verbose=0)


def test_each_phase_traces_its_train_step_once(class_folder, tmp_path, monkeypatch):
    """A ``tf.function`` that creates variables on its first call is traced twice; the optimizer's variables are
    built before ``fit`` so that the head's and the top's train steps are traced once each (issue 13: about 1 s
    of a fine-tuning trial's fixed cost)."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traced: dict[str, int] = {}
    original = TensorFlowTrainer.train_step

    def counting(self, data):  # runs in Python only while the step is traced
        traced[self.name] = traced.get(self.name, 0) + 1
        return original(self, data)

    monkeypatch.setattr(TensorFlowTrainer, "train_step", counting)
    _cut_run(class_folder, tmp_path)
    assert traced == {"head": 1, "top": 1}


def test_validation_and_test_share_one_inference_function_traced_once(class_folder, tmp_path, monkeypatch):
    """Validation goes through the inference function the test predictions use, not Keras's test step, and that
    function is traced once for every batch size: Keras's ``predict`` traced its step again for a last, smaller
    batch, inside what was timed as a step (issue 13)."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    from pipeline import training

    keras_steps: list[str] = []
    for name in ("test_step", "predict_step"):
        original = getattr(TensorFlowTrainer, name)
        monkeypatch.setattr(TensorFlowTrainer, name, lambda self, data, _o=original, _n=name: (
            keras_steps.append(_n), _o(self, data))[1])
    made = []
    monkeypatch.setattr(training, "inference", lambda net, _o=training.inference: made.append(_o(net)) or made[-1])
    data, result = _cut_run(class_folder, tmp_path)
    assert data.sizes["validation"] % 8 and data.sizes["test"] % 8  # a last, smaller batch in both
    assert keras_steps == []
    functions = {id(f): f for f in made}.values()
    assert len(functions) == 2  # the head's and the top's
    assert [f.experimental_get_tracing_count() for f in functions] == [1, 1]
    assert len(result.history["val_accuracy"]) == 4 and result.head_test_accuracy is not None


def test_validation_scores_are_kerass_own_and_the_kept_probabilities_are_the_final_models(class_folder):
    """The epoch's ``val_loss``/``val_accuracy`` agree with ``model.evaluate``, and the validation probabilities
    the run keeps (for ensembles) are the final model's, also when early stopping restored an earlier epoch."""
    from pipeline import features
    from pipeline.backbones import get_spec
    from pipeline.training import predictions

    keras.utils.set_random_seed(0)
    data = load_data(str(class_folder), 32, seed=0)
    model = build_model("efficientnet_lite0", data.num_classes, 32, weights="imagenet", seed=0)
    result = train(model, data, epochs=1, batch_size=8, seed=0, verbose=0)  # on images, head only
    loss, accuracy = model.evaluate(data.batches("validation", 8), verbose=0)
    assert result.history["val_loss"] == [pytest.approx(loss, rel=1e-5)]
    assert result.history["val_accuracy"] == [pytest.approx(accuracy)]
    np.testing.assert_allclose(result.val_predictions[1], predictions(model, data, "validation", 8)[1], atol=1e-6)

    keras.utils.set_random_seed(0)
    model = build_model("efficientnet_lite0", data.num_classes, 32, weights="imagenet", seed=0)
    cached, _ = features.for_model(model, data, get_spec("efficientnet_lite0"), "imagenet", 32)
    result = train(model, data, features=cached, epochs=8, learning_rate=1.0, early_stopping_patience=1,
                   batch_size=8, seed=0, verbose=0)
    assert len(result.history["val_loss"]) < 8  # stopped early and restored its best epoch
    assert result.history["val_loss"][-1] == min(result.history["val_loss"])
    labels, probs = predictions(model, data, "validation", 8, features=cached)
    np.testing.assert_array_equal(result.val_predictions[0], labels)
    np.testing.assert_allclose(result.val_predictions[1], probs, atol=1e-6)


def test_an_inference_function_does_not_keep_its_model_alive():
    """Heads train in the sweep's process one after another: the cache of inference functions must let each go."""
    import gc
    import weakref

    from pipeline import training

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    probs = training.predict_batches(model, [(np.ones((3, 4), np.float32), np.zeros(3, np.int32))])[1]
    assert probs.shape == (3, 2) and model in training._INFERENCE
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
