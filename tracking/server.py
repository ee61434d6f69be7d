"""``python -m tracking.server``: start ``mlflow server`` for distributed sweeps, never open to the network.

The server's port exposes every run, artifact and registered model, and MLflow's plain server has no
authentication: it listens on 127.0.0.1 unless told otherwise. Listening on another address (other
machines' workers) requires MLflow's basic-auth app, whose admin is MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD from the environment (the variables MLflow's clients send), never a file
in the repository.

``spawn_group`` / ``stop_group`` start and stop a server (or any helper that starts processes of its own) so that
nothing outlives it: ``mlflow server`` runs uvicorn (or gunicorn) as a child, which runs its own workers, and
stopping only the process started left those behind, orphaned (seen: a uvicorn of a test's server still running
14 minutes after ``make test-slow``). The process starts in its own session, so its whole process group can be
signalled, and dies with the process that started it (Linux: PR_SET_PDEATHSIG), even after a ``kill -9``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Callable, Mapping, Optional, Sequence

from pydantic import Field

from pipeline.errors import UserError, typed
from pipeline.settings import Options, add_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def server_command(host: str, port: int, store: str, artifacts: str, auth: bool = False, workers: int | None = None,
                   environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and environment; refuses a non-loopback host without credentials."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # none of MLflow 3's GenAI job consumers (7 processes)
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
            f"clients send the same variables), or keep {typed('--host 127.0.0.1', 'SERVER_HOST=127.0.0.1')} (the "
            f"default) and reach it through an SSH tunnel (ssh -L {port}:127.0.0.1:{port} <server>)"
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


class ServerOptions(Options):
    host: str = Field("127.0.0.1", description="address to listen on (default 127.0.0.1: this machine only); any "
                      "other needs MLFLOW_TRACKING_USERNAME/PASSWORD and turns on basic auth")
    port: int = Field(5000, ge=1, le=65535, description="port to listen on")
    store: str = Field(default_factory=lambda: f"sqlite:///{Path.cwd() / 'mlflow-server.db'}",
                       description="backend store URI")
    artifacts: str = Field(default_factory=lambda: str(Path.cwd() / "mlartifacts-server"),
                           description="artifact destination")
    auth: bool = Field(False, description="basic auth on 127.0.0.1 too")
    workers: Optional[int] = Field(None, ge=1, description="server worker processes (MLflow's default if unset)")


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether the ``mlflow server`` (or ``mlflow ui``) at ``uri`` answers its health check now; a refused connection
    answers at once, where MLflow's client would retry for minutes."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        return True
    except OSError:  # refused, reset, timed out (URLError is an OSError)
        return False


def wait_until_up(uri: str, proc: subprocess.Popen, seconds: float) -> bool:
    """Until the server that ``proc`` started answers at ``uri``: False if ``proc`` ended or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while not answers(uri, timeout=2.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def start_local(store: str, artifacts: str, log: Path, port: int | None = None, workers: int = 1,
                seconds: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 (a free port unless ``port``), in its own process group (``stop_group`` ends
    it), its output appended to ``log``; returns it and its URI once it answers. ``RuntimeError`` with the log's
    last line if it ended or did not answer within ``seconds`` (it is stopped then)."""
    port = port or free_port()
    argv, env = server_command("127.0.0.1", port, store, artifacts, workers=workers)
    with log.open("a") as out:
        proc = spawn_group(argv, out, env)
    uri = f"http://127.0.0.1:{port}"
    if not wait_until_up(uri, proc, seconds):
        stop_group(proc)
        lines = log.read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"mlflow server did not start over {store} (log {log}): {lines[-1] if lines else 'no output'}")
    return proc, uri


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in this process: a child calls it between fork and exec, where loading a library is
    unsafe (another thread may hold the loader's lock)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


def dies_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` when the process that started it dies, even by ``kill -9`` (Linux; None
    elsewhere, where the children are stopped on the way out only)."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before the call: nothing would signal this child now
            os.kill(os.getpid(), sig)

    return preexec


def spawn_group(command: Sequence[str], log: IO | int | None = None, env: Mapping[str, str] | None = None,
                cwd: str | os.PathLike | None = None, death_signal: int = signal.SIGTERM) -> subprocess.Popen:
    """Start ``command`` in its own session (its own process group, which ``stop_group`` ends whole: a server's
    workers included), getting ``death_signal`` when this process dies (SIGTERM: ``mlflow server`` passes it on
    to its workers)."""
    return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
                            preexec_fn=dies_with_parent(death_signal))


def stop_group(proc: subprocess.Popen, seconds: float = 30.0) -> None:
    """SIGTERM to ``proc``'s whole process group (``spawn_group``), SIGKILL to whatever of it is left after
    ``seconds``; returns when the group is gone (or, for processes that left it, when ``proc`` has ended)."""
    group = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(group)):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10  # SIGKILL cannot be refused: only the kernel's bookkeeping is left
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(group: int) -> bool:
    """A process of the group still runs (zombies aside: they wait only for whoever reaps them)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == group:
                return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tracking.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, ServerOptions)
    return parser


def serve(options: ServerOptions) -> int:
    """Become ``mlflow server`` (this process: signals reach it directly)."""
    command, env = server_command(options.host, options.port, options.store, options.artifacts, auth=options.auth,
                                  workers=options.workers)
    auth = "basic auth (admin: $MLFLOW_TRACKING_USERNAME)" if "--app-name" in command else "no authentication"
    print(f"mlflow server on {options.host}:{options.port}, {auth}; store {options.store}, artifacts "
          f"{options.artifacts}", flush=True)
    os.execve(sys.executable, command, env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    try:
        return serve(ServerOptions.of(build_parser().parse_args(argv)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
