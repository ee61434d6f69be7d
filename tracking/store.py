"""Which MLflow store to use and the experiment in it."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import mlflow

from pipeline.errors import UserError

DEFAULT_DB = "mlflow.db"


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite ``mlflow.db`` in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def configure(uri: str | None = None) -> str:
    """Point MLflow at the store, checking a server answers before any work starts."""
    uri = resolve_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"MLflow tracking server {uri} does not answer ({e}); start it (make server) or unset "
                "MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from e
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """Get or create an experiment. Local SQLite stores keep artifacts beside the database."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id
