"""Which MLflow store to use and the experiment in it."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow

from pipeline import safepath
from pipeline.errors import UserError, typed
from tracking.layout import CUSTOM_MODEL_DEVELOPMENT, EXPERIMENT_KIND

DEFAULT_DB = "mlflow.db"
ARTIFACTS = "mlartifacts"  # beside a SQLite store: its runs' artifacts
# The tracking-store schemes MLflow knows (a driver may follow a `+`: postgresql+psycopg2://).
SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
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
    if scheme in ("", "file"):
        raise UserError(file_store_message(uri))
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT).read()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"MLflow tracking server {uri} does not answer ({e}); start it ({typed('tlsweep server', 'make server')}) "
                "or unset "
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
                            "set them to a user of the server (its admin is the one the server was started "
                            "with)") from e
    except (urllib.error.URLError, OSError):
        pass  # the health check answered; let MLflow report anything else


def file_store_message(uri: str) -> str:
    """A plain path or ``file://`` URI is MLflow's file store, which MLflow no longer opens without
    MLFLOW_ALLOW_FILE_STORE: say so, and give the SQLite URI to use instead."""
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path) if uri.startswith("file:") else uri).expanduser()
    path = Path(os.path.abspath(path))
    is_db = path.suffix in (".db", ".sqlite", ".sqlite3") or _starts_with(path, SQLITE_HEADER)
    db = path if is_db else (path.parent if path.name == "mlruns" else path) / DEFAULT_DB
    moved = (f" (`mlflow migrate-filestore --source {path} --target sqlite:///{db}` moves the runs already in it "
             "over)" if path.is_dir() else "")
    what = "MLflow's file store" if uri.startswith("file:") else "a plain path: MLflow reads it as its file store"
    return (f"tracking URI {uri!r} is {what} (a folder of files), which MLflow keeps in maintenance mode and no "
            f"longer opens; give an SQLite store, sqlite:///{db}{moved}, or {FIX}")


def _starts_with(path: Path, header: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


def sqlite_path(uri: str | None) -> Path | None:
    """The file of a ``sqlite:///`` store (None for another store, or SQLite in memory)."""
    path = urllib.parse.unquote(uri[len("sqlite:///"):].split("?")[0]) if uri and uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def local_places(uri: str | None = None) -> dict[str, Path]:
    """Where a local store writes (its SQLite file and the artifacts beside it): none for a server."""
    db = sqlite_path(resolve_uri(uri))
    return {} if db is None else {"the tracking store": db, "its artifacts": db.parent / ARTIFACTS}


def check_sqlite(uri: str) -> None:
    """The SQLite file's folder must exist and be writable (SQLite writes a journal beside the file); the file, if
    there, must be an SQLite database that MLflow can open (``check_schema``)."""
    db = sqlite_path(uri)
    if db is None:
        return
    if not db.parent.is_dir():
        raise UserError(
            f"SQLite tracking store {uri}: folder {db.parent} does not exist; create it (mkdir -p {db.parent}) or fix "
            f"the path, or {FIX}"
        )
    if db.is_dir():
        raise UserError(f"SQLite tracking store {uri} is a folder, not a database file; give the path of a file in "
                        f"it (sqlite:///{db.resolve() / DEFAULT_DB}), or {FIX}")
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
    if db.exists() and db.stat().st_size:  # an empty file is a new database to SQLite
        if not _starts_with(db, SQLITE_HEADER):
            head = db.read_bytes()[:24].decode("utf-8", "replace")
            raise UserError(f"tracking store {uri}: {db} is not an SQLite database (it starts with {head!r}); give "
                            f"another file (a new one is created), or {FIX}")
        check_schema(uri, db)


def _check_length(db: Path) -> None:
    """A file shorter than the pages its SQLite header counts was cut short (SQLite itself may notice only later)."""
    with open(db, "rb") as f:
        header = f.read(100)
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(header[28:32], "big")
    valid = len(header) == 100 and header[24:28] == header[92:96]  # the page count is kept current
    if valid and pages and db.stat().st_size < pages * page:
        raise sqlite3.DatabaseError(f"it is {db.stat().st_size} bytes, its header counts {pages} pages of {page} "
                                    f"bytes: it was cut short")


def check_schema(uri: str, db: Path) -> None:
    """An SQLite store MLflow can open: whole, and at the schema this MLflow writes. A store left half-created (a
    full disk while MLflow made its tables: every later start then fails with "table ... already exists") is moved
    aside and made anew when it holds no run; with runs in it, one line says what to do."""
    try:
        _check_length(db)
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            revision = (con.execute("SELECT version_num FROM alembic_version").fetchone() or [None])[0] \
                if "alembic_version" in tables else None
            count = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed table names
                     for t in ("runs", "registered_models", "experiments") if t in tables}
    except sqlite3.DatabaseError as e:
        raise UserError(f"tracking store {uri}: {db} is a damaged SQLite database ({e}); restore it from a backup, "
                        f"or give another file (a new one is created), or {FIX}") from e
    from mlflow.store.db.utils import _get_latest_schema_revision

    head = _get_latest_schema_revision()
    if revision == head or not tables - {"alembic_version"}:
        return  # whole, or no table yet (MLflow makes them)
    empty = not count.get("runs") and not count.get("registered_models") and count.get("experiments", 0) <= 1
    if empty:  # nothing in it to keep: MLflow makes a new one where it was
        aside = db.with_name(f"{db.name}.half-made-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            db.rename(aside)
        except FileNotFoundError:  # another process starting at the same moment moved it first
            return
        print(f"note: the tracking store {db} holds no run and is not at the schema this MLflow writes "
              f"({revision or 'none'}, not {head}: a full disk while MLflow made its tables leaves it so); moved it to "
              f"{aside}; a new one is made in its place (delete the old one when you like)", file=sys.stderr, flush=True)
        return
    raise UserError(
        f"tracking store {uri} holds {count.get('runs', 0)} run(s) but its schema is at {revision or 'no revision'}, "
        f"not {head} that this MLflow ({mlflow.__version__}) writes: if an older MLflow made it, back it up "
        f"(cp {db} {db}.bak) and run `mlflow db upgrade sqlite:///{db}` (a newer MLflow's store needs that MLflow); "
        "if a full disk stopped its creation or upgrade, restore your backup of it (MLflow cannot repair it), or give "
        f"another file, or {FIX}")


def quiet_store_logs() -> None:
    """No "Creating initial MLflow database tables" / alembic lines when a new SQLite store is made."""
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def experiment_id(name: str) -> str:
    """Get or create an experiment. Local SQLite stores keep artifacts beside the database. It is tagged as model
    training (``layout.EXPERIMENT_KIND``), so that MLflow 3's UI shows its runs and charts, not its GenAI views; an
    experiment made by an older tlsweep gets the tag when a sweep next uses it."""
    safepath.check_name(name, "experiment name", typed("--experiment", "EXPERIMENT="))  # it names artifact folders
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND not in found.tags:
            mlflow.tracking.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND,
                                                              CUSTOM_MODEL_DEVELOPMENT)
        return found.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / ARTIFACTS / name).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND: CUSTOM_MODEL_DEVELOPMENT})
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id
