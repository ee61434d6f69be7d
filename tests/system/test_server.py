"""`make server` is never open: 127.0.0.1 by default; another address needs MLflow's basic-auth app with
the admin from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. Tested against a real server."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.errors import UserError
from tracking import store
from tracking.server import main as server_main
from tracking.server import (answers, free_port, server_command, spawn_group, start_local, stop_group,
                             wait_until_up)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::"])
def test_a_server_for_other_machines_without_credentials_is_refused(tmp_path, capsys, monkeypatch, host):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert server_main(["--host", host, "--store", f"sqlite:///{tmp_path / 's.db'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: serving other machines (host {host}) needs authentication, but MLFLOW_TRACKING_USERNAME "
                   "and MLFLOW_TRACKING_PASSWORD are not set: export MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD (the admin of MLflow's basic-auth app; clients send the same variables), "
                   "or keep --host 127.0.0.1 (the default) and reach it through an SSH tunnel "
                   "(ssh -L 5000:127.0.0.1:5000 <server>)\n")
    assert list(tmp_path.iterdir()) == []


def test_the_default_is_this_machine_only_and_credentials_never_reach_a_file(tmp_path):
    argv, env = server_command("127.0.0.1", 5000, f"sqlite:///{tmp_path / 's.db'}", str(tmp_path / "a"), environ={})
    assert "--app-name" not in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert env == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # none of MLflow 3's GenAI job consumers
    with pytest.raises(UserError, match=r"the basic-auth server needs authentication, but MLFLOW_TRACKING_USERNAME"):
        server_command("localhost", 5000, "sqlite:///x.db", "a", auth=True, environ={})
    env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "s3cret-pw"}
    argv, env = server_command("0.0.0.0", 5000, f"sqlite:///{tmp_path / 's.db'}", str(tmp_path / "a"), environ=env)
    assert argv[-2:] == ["--app-name", "basic-auth"]
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert config == tmp_path / "basic_auth.ini" and "s3cret-pw" not in config.read_text()
    assert f"database_uri = sqlite:///{tmp_path / 'basic_auth.db'}" in config.read_text()


def test_a_server_that_cannot_start_is_one_line_from_its_log_and_leaves_nothing_behind(tmp_path):
    """As `GPUS=` starts its server: a store it cannot open ends ``mlflow server``; the wait ends with it."""
    (tmp_path / "file").write_text("not a folder")
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"mlflow server did not start over sqlite:///{tmp_path}/file/s.db "
                                           rf"\(log {tmp_path}/server.log\): \S"):
        start_local(f"sqlite:///{tmp_path / 'file' / 's.db'}", str(tmp_path / "a"), tmp_path / "server.log",
                    seconds=120)
    assert time.monotonic() - began < 100, "it returned when the server ended, not at the deadline"


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    import base64

    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_a_basic_auth_server_refuses_anonymous_requests_and_serves_its_admin(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "a-long-test-password-42"}
    env = {**os.environ, **creds, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = spawn_group([sys.executable, "-m", "tracking.server", "--auth", "--host", "127.0.0.1", "--port",
                            str(port), "--store", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts",
                            str(tmp_path / "artifacts"), "--workers", "1"], out, env, cwd=tmp_path)
    try:
        assert wait_until_up(uri, proc, 300), f"the server did not start: {log.read_text()[-3000:]}"
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 401
        assert _get(api, ("admin", "wrong")) == 401
        assert _get(api, ("admin", creds["MLFLOW_TRACKING_PASSWORD"])) == 200
        for name in creds:
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(UserError, match=rf"MLflow tracking server {uri} requires authentication \(HTTP 401\) and "
                                            r"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not both set"):
            store.configure(uri)
        for name, value in creds.items():
            monkeypatch.setenv(name, value)
        store.configure(uri)
        client = MlflowClient(uri)
        exp = client.create_experiment("guarded")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "val_accuracy", 0.5)
        client.log_text(run.info.run_id, "hello", "note.txt")
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).data.metrics == {"val_accuracy": 0.5}
        assert "s3cret" not in (tmp_path / "basic_auth.ini").read_text()
    finally:
        stop_group(proc)
        mlflow.set_tracking_uri(None)


# -- nothing a server starts outlives it ---------------------------------------------------------------------------


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_stop_group_ends_the_process_and_all_it_started_even_what_ignores_sigterm(tmp_path):
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    parent = (f"import subprocess, sys, time; kids = [subprocess.Popen([sys.executable, '-c', {child!r}], "
              "stdout=subprocess.PIPE) for _ in range(2)]; [k.stdout.readline() for k in kids]; "
              "print('ready', flush=True); time.sleep(600)")
    with (tmp_path / "out.log").open("w") as log:
        proc = spawn_group([sys.executable, "-c", parent], log)
    deadline = time.monotonic() + 60
    while "ready" not in (tmp_path / "out.log").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    started = [proc.pid, *_descendants(proc.pid)]
    assert len(started) == 3
    began = time.monotonic()
    stop_group(proc, seconds=2)  # the two that ignore SIGTERM get SIGKILL after 2 s
    assert _alive(started) == [] and time.monotonic() - began < 15


@pytest.mark.slow
def test_a_server_whose_launcher_is_killed_leaves_no_process_behind(tmp_path):
    """A launcher killed by SIGKILL (no chance to stop anything): its `mlflow server` gets SIGTERM from the kernel
    (spawn_group) and stops its uvicorn supervisor, which stops its two workers; nothing is left orphaned."""
    port = free_port()
    store, artifacts = f"sqlite:///{tmp_path / 's.db'}", str(tmp_path / "a")
    launcher = ("import time; from tracking.server import server_command, spawn_group; "
                f"argv, env = server_command('127.0.0.1', {port}, {store!r}, {artifacts!r}, workers=2); "
                f"spawn_group(argv, open({str(tmp_path / 'server.log')!r}, 'w'), env); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while not answers(f"http://127.0.0.1:{port}") or len(_descendants(proc.pid)) < 4:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        started = _descendants(proc.pid)  # mlflow's CLI, uvicorn's supervisor, its two workers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(started) == [], (tmp_path / "server.log").read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()
