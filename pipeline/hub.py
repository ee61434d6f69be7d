"""TF-Hub feature vectors as a Keras 3 layer.

``hub.KerasLayer`` is a tf-keras (Keras 2) layer and cannot be mixed into a Keras 3 model.
``HubFeatureVector`` resolves the handle with ``tensorflow_hub`` (a tfhub.dev URL is downloaded
and cached; a local SavedModel directory is used as is) and wraps the SavedModel's ``__call__``
with Keras 3's ``TFSMLayer``. The SavedModel's own variables become the layer's weights, so the
backbone can be fine-tuned as a whole (there are no inner layers to unfreeze one by one). It is
always called with ``training=False``, so BatchNorm inside stays in inference mode.
"""

from __future__ import annotations

import keras
import tensorflow_hub as hub


@keras.saving.register_keras_serializable(package="tlsweep")
class HubFeatureVector(keras.layers.TFSMLayer):
    def __init__(self, handle: str, trainable: bool = False, **kwargs):
        kwargs.pop("filepath", None)
        kwargs.pop("call_endpoint", None)
        kwargs.pop("call_training_endpoint", None)
        self.handle = handle
        super().__init__(hub.resolve(handle), call_endpoint="__call__", trainable=trainable, **kwargs)

    def _add_existing_weight(self, weight):
        # TFSMLayer keeps the ':0' of TF variable names, which Keras optimizers reject as slot
        # names when fine-tuning; wrap the same tf.Variable under a clean name.
        variable = keras.Variable(
            initializer=weight, trainable=weight.trainable, dtype=weight.dtype, shape=weight.shape,
            name=weight.name.split(":")[0].replace("/", "_"),
        )
        self._track_variable(variable)

    def call(self, inputs, training=False):
        return self.call_endpoint_fn(inputs, training=False)

    def compute_output_shape(self, input_shape):
        probe = self.call_endpoint_fn(keras.ops.zeros((1, *input_shape[1:])), training=False)
        return (input_shape[0], *probe.shape[1:])

    def get_config(self):
        config = super().get_config()
        config.update(handle=self.handle)
        return config
