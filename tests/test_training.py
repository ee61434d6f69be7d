import keras
import numpy as np
import pytest

from pipeline.data import load_data
from pipeline.errors import UserError
from pipeline.model import build_model
from pipeline.training import METRICS, train


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


def test_head_only_learns_colour_classes_with_real_weights(class_folder):
    _, result = _run(class_folder, epochs=8, fine_tune_epochs=3, unfreeze_from=None, learning_rate=3e-2)
    assert result.fine_tune_start is None and len(result.history["accuracy"]) == 8
    assert result.history["loss"][-1] < result.history["loss"][0]
    assert result.val_accuracy >= 0.8 and result.test_accuracy >= 0.6


def test_same_seed_same_result(class_folder):
    _, a = _run(class_folder, seed=5, epochs=2, fine_tune_epochs=0)
    _, b = _run(class_folder, seed=5, epochs=2, fine_tune_epochs=0)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5)
    assert a.test_loss == pytest.approx(b.test_loss, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"epochs": 0}, r"epochs must be > 0, got 0"), ({"batch_size": -1}, r"batch_size must be > 0, got -1"),
     ({"fine_tune_learning_rate": 0}, r"fine_tune_learning_rate must be > 0, got 0")],
)
def test_bad_training_arguments(class_folder, kwargs, message):
    data = load_data(str(class_folder), 32)
    model = build_model("mobilenet_v2", data.num_classes, 32, weights=None)
    with pytest.raises(UserError, match=message):
        train(model, data, **kwargs)
