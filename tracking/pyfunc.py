"""The exported SavedModel as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(x)``."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np

from tracking.layout import MODEL_DIR, MODEL_EXPORT, MODEL_URI, SAVEDMODEL_DIR

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # copied into the model: it loads without this project


def quiet_input_example_warning() -> None:
    """Drop MLflow's warning that a logged model has no input example (one per trial otherwise). The model
    gets an explicit signature; an example would be images as JSON (megabytes at 224 px) that MLflow then
    also runs through the model to validate it."""
    warnings.filterwarnings("ignore", message=r".*An input example was not provided when logging the model",
                            category=UserWarning)


quiet_input_example_warning()


def log_pyfunc(export_dir: str, sample: np.ndarray | dict[str, np.ndarray], probs: np.ndarray,
               name: str = MODEL_DIR) -> str:
    """Log the export as a pyfunc model with a signature (``sample``: a batch, or one per input of an export with
    several); returns its model URI."""
    import tensorflow as tf

    sample = ({k: v.astype(np.float32) for k, v in sample.items()} if isinstance(sample, dict)
              else sample.astype(np.float32))

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={MODEL_EXPORT: str(export_dir)},
        signature=mlflow.models.infer_signature(sample, probs.astype(np.float32)),
        pip_requirements=[f"tensorflow=={tf.__version__}", f"mlflow=={mlflow.__version__}", "numpy"],
    )
    return info.model_uri


def log_export(run_id: str, export_dir: str, sample: np.ndarray | dict[str, np.ndarray], probs: np.ndarray) -> str:
    """Log an export to ``run_id`` as its pyfunc model (tagged with its URI); returns the model URI.

    The SavedModel is stored once, inside the model (its artifact ``export``; ``download_export`` gets it
    back): at 224 px that is tens of MB a trial, which a second copy under ``savedmodel/`` doubled.
    Reopening the run marks it FINISHED; callers that close it with another status do so afterwards.
    """
    with mlflow.start_run(run_id=run_id):  # the active run is per thread
        uri = log_pyfunc(str(export_dir), sample, probs)
        mlflow.set_tag(MODEL_URI, uri)
    return uri


def download_export(run: mlflow.entities.Run, dst: str | Path) -> Path:
    """The trial's SavedModel export folder (SavedModel + labels.txt + metadata), downloaded into ``dst``: from
    inside its pyfunc model, or from ``savedmodel/`` for runs logged before the model held the only copy."""
    client = mlflow.tracking.MlflowClient()
    if client.list_artifacts(run.info.run_id, SAVEDMODEL_DIR):
        return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=SAVEDMODEL_DIR,
                                                        dst_path=str(dst)))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=run.data.tags[MODEL_URI], dst_path=str(dst)))
    flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
    return local / flavor["artifacts"][MODEL_EXPORT]["path"]
