"""The pyfunc model's code, copied into every logged model (MLflow "models from code").

Self-contained on purpose: it imports only mlflow, numpy and tensorflow, so the model loads and serves
(``mlflow models serve``) where this project is not installed. Input: float32 ``[N, H, W, 3]`` raw
0..255 pixels (an ensemble of members trained at several sizes: a mapping of its input names, ``image_<size>``,
to the photos at each size). Output: class probabilities ``[N, classes]``.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np


class SavedModelClassifier(mlflow.pyfunc.PythonModel):
    """Serves the exported SavedModel (artifact ``export``); ``class_names`` from its ``labels.txt``."""

    def load_context(self, context: object) -> None:
        import tensorflow as tf

        export = context.artifacts["export"]
        self._serve = tf.saved_model.load(export).signatures["serving_default"]
        with open(os.path.join(export, "labels.txt")) as f:
            self.class_names = f.read().splitlines()

    def predict(self, context: object, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import tensorflow as tf

        if isinstance(model_input, dict):
            (probs,) = self._serve(**{k: tf.constant(np.asarray(v, dtype=np.float32))
                                      for k, v in model_input.items()}).values()
        else:
            (probs,) = self._serve(tf.constant(np.asarray(model_input, dtype=np.float32))).values()
        return probs.numpy()


mlflow.models.set_model(SavedModelClassifier())
