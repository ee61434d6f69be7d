"""Integration tests: our code with the real libraries in this process (and the trial pool's workers): TensorFlow
models trained on generated images, Keras Tuner searches, a SQLite MLflow store per test (``tracking_store``, in
tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory) -> str:
    """A local SavedModel in TF-Hub's reusable format: ``__call__(images in [0,1], training)`` -> [N, 16]."""
    import tensorflow as tf

    class FeatureVector(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(tf.random.stateless_normal([3, 16], seed=[1, 2]), name="kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32), tf.TensorSpec([], tf.bool)])
        def __call__(self, images, training=False):
            features = tf.nn.relu(tf.tensordot(images - 0.5, self.kernel, axes=1))
            return tf.reduce_mean(features, axis=[1, 2])

    path = tmp_path_factory.mktemp("hub") / "feature_vector"
    module = FeatureVector()
    tf.saved_model.save(module, str(path))
    return str(path)

