"""Which MLflow store to use and the experiment in it."""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow

from pipeline.errors import UserError

DEFAULT_DB = "mlflow.db"
# The tracking-store schemes MLflow knows (a driver may follow a `+`: postgresql+psycopg2://).
SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
HEALTH_TIMEOUT = 10  # seconds; a refused connection answers at once
FIX = "unset MLFLOW_TRACKING_URI (and --tracking-uri) to use ./mlflow.db"


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite ``mlflow.db`` in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def configure(uri: str | None = None) -> str:
    """Point MLflow at the store, checking first that it can be used: MLflow itself would retry for
    minutes (HTTP, a SQLite file it cannot open) or create a mistyped folder without a word."""
    uri = resolve_uri(uri)
    quiet_store_logs()
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+")[0]
    if scheme not in SCHEMES:
        raise UserError(
            f"tracking URI {uri!r} has an unknown scheme {scheme + '://'!r}; give sqlite:///<path>/mlflow.db, "
            f"http://<host>:<port> (an `mlflow server`) or postgresql://…, or {FIX}"
        )
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT).read()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"MLflow tracking server {uri} does not answer ({e}); start it (make server) or unset "
                "MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from e
    elif scheme == "sqlite":
        check_sqlite(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_sqlite(uri: str) -> None:
    """The SQLite file's folder must exist and be writable (SQLite writes a journal beside the file)."""
    path = urllib.parse.unquote(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return
    db = Path(path)
    if not db.parent.is_dir():
        raise UserError(
            f"SQLite tracking store {uri}: folder {db.parent} does not exist; create it (mkdir -p {db.parent}) or fix "
            f"the path, or {FIX}"
        )
    try:
        with tempfile.TemporaryFile(dir=db.parent):
            pass
        if db.exists():
            with open(db, "r+b"):
                pass
    except OSError as e:
        raise UserError(
            f"SQLite tracking store {uri} is not writable ({e.strerror}: {e.filename or db.parent}); give a path in a "
            f"folder you can write to, or {FIX}"
        ) from e


def quiet_store_logs() -> None:
    """No "Creating initial MLflow database tables" / alembic lines when a new SQLite store is made."""
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
