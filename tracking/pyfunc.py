"""The exported SavedModel as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(x)``."""

from __future__ import annotations

import os

import mlflow
import numpy as np


class SavedModelClassifier(mlflow.pyfunc.PythonModel):
    """Input: float32 ``[N, H, W, 3]`` raw 0..255 pixels. Output: class probabilities ``[N, classes]``."""

    def load_context(self, context: object) -> None:
        import tensorflow as tf

        export = context.artifacts["export"]
        self._serve = tf.saved_model.load(export).signatures["serving_default"]
        with open(os.path.join(export, "labels.txt")) as f:
            self.class_names = f.read().splitlines()

    def predict(self, context: object, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import tensorflow as tf

        (probs,) = self._serve(tf.constant(np.asarray(model_input, dtype=np.float32))).values()
        return probs.numpy()


def log_pyfunc(export_dir: str, sample: np.ndarray, probs: np.ndarray, name: str = "model") -> str:
    """Log the export as a pyfunc model with a signature; returns its model URI."""
    import tensorflow as tf

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=SavedModelClassifier(),
        artifacts={"export": str(export_dir)},
        signature=mlflow.models.infer_signature(sample.astype(np.float32), probs.astype(np.float32)),
        pip_requirements=[f"tensorflow=={tf.__version__}", f"mlflow=={mlflow.__version__}", "numpy"],
    )
    return info.model_uri


MODEL_URI_TAG = "tlsweep.model_uri"


def log_export(run_id: str, export_dir: str, sample: np.ndarray, probs: np.ndarray) -> str:
    """Log an export to ``run_id``: its files under ``savedmodel/`` and the pyfunc model (tagged with its URI).

    Reopening the run marks it FINISHED; callers that close it with another status do so afterwards.
    """
    mlflow.tracking.MlflowClient().log_artifacts(run_id, str(export_dir), "savedmodel")
    with mlflow.start_run(run_id=run_id):  # the active run is per thread
        uri = log_pyfunc(str(export_dir), sample, probs)
        mlflow.set_tag(MODEL_URI_TAG, uri)
    return uri
