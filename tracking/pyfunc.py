"""The exported SavedModel as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(x)``."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np

from tracking.layout import MODEL_DIR, MODEL_URI, SAVEDMODEL_DIR

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # copied into the model: it loads without this project


def quiet_input_example_warning() -> None:
    """Drop MLflow's warning that a logged model has no input example (one per trial otherwise). The model
    gets an explicit signature; an example would be images as JSON (megabytes at 224 px) that MLflow then
    also runs through the model to validate it."""
    warnings.filterwarnings("ignore", message=r".*An input example was not provided when logging the model",
                            category=UserWarning)


quiet_input_example_warning()


def log_pyfunc(export_dir: str, sample: np.ndarray, probs: np.ndarray, name: str = MODEL_DIR) -> str:
    """Log the export as a pyfunc model with a signature; returns its model URI."""
    import tensorflow as tf

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"export": str(export_dir)},
        signature=mlflow.models.infer_signature(sample.astype(np.float32), probs.astype(np.float32)),
        pip_requirements=[f"tensorflow=={tf.__version__}", f"mlflow=={mlflow.__version__}", "numpy"],
    )
    return info.model_uri


def log_export(run_id: str, export_dir: str, sample: np.ndarray, probs: np.ndarray) -> str:
    """Log an export to ``run_id``: its files under ``savedmodel/`` and the pyfunc model (tagged with its URI).

    Reopening the run marks it FINISHED; callers that close it with another status do so afterwards.
    """
    mlflow.tracking.MlflowClient().log_artifacts(run_id, str(export_dir), SAVEDMODEL_DIR)
    with mlflow.start_run(run_id=run_id):  # the active run is per thread
        uri = log_pyfunc(str(export_dir), sample, probs)
        mlflow.set_tag(MODEL_URI, uri)
    return uri
