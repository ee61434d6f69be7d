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
        check_credentials(uri)
    elif scheme == "sqlite":
        check_sqlite(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_credentials(uri: str) -> None:
    """A server with basic auth (``make server`` on another address than 127.0.0.1) refuses a client
    without MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: say so before any work."""
    import base64

    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT).read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            given = (f"the user name and password of MLFLOW_TRACKING_USERNAME ({user!r}) / MLFLOW_TRACKING_PASSWORD "
                     "were refused" if user and password else
                     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not both set")
            raise UserError(f"MLflow tracking server {uri} requires authentication (HTTP {e.code}) and {given}; "
                            "set them to a user of the server (its admin is the one `make server` was started "
                            "with)") from e
    except (urllib.error.URLError, OSError):
        pass  # the health check answered; let MLflow report anything else


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
