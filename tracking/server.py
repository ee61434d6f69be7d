"""``python -m tracking.server``: start ``mlflow server`` for distributed sweeps, never open to the network.

The server's port exposes every run, artifact and registered model, and MLflow's plain server has no
authentication: it listens on 127.0.0.1 unless told otherwise. Listening on another address (other
machines' workers) requires MLflow's basic-auth app, whose admin is MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD from the environment (the variables MLflow's clients send), never a file
in the repository.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import urllib.parse
from pathlib import Path

from pipeline.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def server_command(host: str, port: int, store: str, artifacts: str, auth: bool = False, workers: int | None = None,
                   environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and environment; refuses a non-loopback host without credentials."""
    env = dict(os.environ if environ is None else environ)
    if host not in LOOPBACK:
        auth = True
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
            artifacts, "--host", host, "--port", str(port)]
    if workers:
        argv += ["--workers", str(workers)]
    if not auth:
        return argv, env
    missing = [name for name in CREDENTIALS if not env.get(name)]
    if missing:
        why = f"serving other machines (host {host})" if host not in LOOPBACK else "the basic-auth server"
        raise UserError(
            f"{why} needs authentication, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            f"export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the admin of MLflow's basic-auth app; "
            f"clients send the same variables), or keep SERVER_HOST=127.0.0.1 and reach it through an SSH tunnel "
            f"(ssh -L {port}:127.0.0.1:{port} <server>)"
        )
    folder = _server_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    # No secret in the file: MLflow reads the admin's name and password from MLFLOW_AUTH_ADMIN_* (used only
    # when its user database is created; change the password later through MLflow's update-password API).
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_USERNAME=env[CREDENTIALS[0]],
               MLFLOW_AUTH_ADMIN_PASSWORD=env[CREDENTIALS[1]])
    # The auth app's CSRF protection needs a key shared by the server's workers: one per start unless given.
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    return [*argv, "--app-name", "basic-auth"], env


def _server_folder(store: str) -> Path:
    """Where the auth database lives: beside a SQLite store, else in the working directory."""
    if store.startswith("sqlite:///"):
        return Path(urllib.parse.unquote(store[len("sqlite:///"):].split("?")[0])).resolve().parent
    return Path.cwd()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tracking.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only); any other needs MLFLOW_TRACKING_USERNAME/PASSWORD and turns on basic auth")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--store", default=f"sqlite:///{Path.cwd() / 'mlflow-server.db'}", help="backend store URI")
    parser.add_argument("--artifacts", default=str(Path.cwd() / "mlartifacts-server"), help="artifact destination")
    parser.add_argument("--auth", action="store_true", help="basic auth on 127.0.0.1 too")
    parser.add_argument("--workers", type=int, default=None, help="server worker processes (MLflow's default if unset)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        command, env = server_command(args.host, args.port, args.store, args.artifacts, auth=args.auth,
                                      workers=args.workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    auth = "basic auth (admin: $MLFLOW_TRACKING_USERNAME)" if "--app-name" in command else "no authentication"
    print(f"mlflow server on {args.host}:{args.port}, {auth}; store {args.store}, artifacts {args.artifacts}",
          flush=True)
    os.execve(sys.executable, command, env)  # the server is this process: signals reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
