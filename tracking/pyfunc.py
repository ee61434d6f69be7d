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


def log_model(export_dir: str, sample: np.ndarray | dict[str, np.ndarray], probs: np.ndarray,
              run_id: str | None = None, params: dict[str, str] | None = None,
              name: str = MODEL_DIR) -> mlflow.models.model.ModelInfo:
    """Log the export as a pyfunc model (an MLflow LoggedModel) with a signature (``sample``: a batch, or one per
    input of an export with several), to ``run_id`` or else the active run, without reopening or closing it;
    ``params``: the model's own (MLflow copies the run's, which a run written model first does not have yet)."""
    sample = ({k: v.astype(np.float32) for k, v in sample.items()} if isinstance(sample, dict)
              else sample.astype(np.float32))
    from mlflow.tracking import fluent

    before = fluent._active_experiment_id  # MLflow creates the LoggedModel in the active experiment: the run's
    if run_id is not None:
        fluent._active_experiment_id = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id
    try:
        return _log(export_dir, sample, probs, run_id, params, name)
    finally:
        fluent._active_experiment_id = before


def _log(export_dir: str, sample, probs: np.ndarray, run_id: str | None, params: dict[str, str] | None,
         name: str) -> mlflow.models.model.ModelInfo:
    import tensorflow as tf

    return mlflow.models.Model.log(
        artifact_path=None,
        name=name,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=str(MODEL_CODE),
        artifacts={MODEL_EXPORT: str(export_dir)},
        signature=mlflow.models.infer_signature(sample, probs.astype(np.float32)),
        pip_requirements=[f"tensorflow=={tf.__version__}", f"mlflow=={mlflow.__version__}", "numpy"],
        params=params,
    )


def log_export(run_id: str, export_dir: str, sample: np.ndarray | dict[str, np.ndarray], probs: np.ndarray) -> str:
    """Log an export to ``run_id`` as its pyfunc model (tagged with its URI); returns the model URI.

    The SavedModel is stored once, inside the model (its artifact ``export``; ``download_export`` gets it
    back): at 224 px that is tens of MB a trial, which a second copy under ``savedmodel/`` doubled.
    The run's status stays as it is.
    """
    uri = log_model(export_dir, sample, probs, run_id=run_id).model_uri
    mlflow.tracking.MlflowClient().set_tag(run_id, MODEL_URI, uri)
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
