"""A tracking store that cannot be used is one line naming the URI and the fix, at once (MLflow itself would
retry for minutes or create a mistyped folder); a new SQLite store is made without MLflow's INFO lines."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.cli import main as sweeps_main

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri,message", [
    ("foo://x", r"tracking URI 'foo://x' has an unknown scheme 'foo://'; give sqlite:///<path>/mlflow.db, "
                r"http://<host>:<port> .* or unset MLFLOW_TRACKING_URI"),
    ("sqlite:///{tmp}/no/such/dir/mlflow.db", r"SQLite tracking store sqlite:///.*/no/such/dir/mlflow.db: folder "
                                              r".*/no/such/dir does not exist; create it \(mkdir -p .*\) or fix the path"),
    # /proc refuses new files to everyone, root included (chmod would not stop root)
    ("sqlite:////proc/mlflow.db", r"SQLite tracking store sqlite:////proc/mlflow.db is not writable \(.*\); give a "
                                  r"path in a folder you can write to"),
    ("http://127.0.0.1:{port}", r"MLflow tracking server http://127.0.0.1:\d+ does not answer .*; start it "
                                r"\(make server\)"),
], ids=["unknown-scheme", "missing-folder", "read-only-folder", "no-server"])
def test_an_unusable_store_is_one_line_at_once(tmp_path, capsys, uri, message):
    import re

    uri = uri.format(tmp=tmp_path, port=_closed_port())
    start = time.perf_counter()
    assert sweeps_main(["report", "--experiment", "x", "--tracking-uri", uri, "--out-dir", str(tmp_path)]) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match("error: " + message, err), err
    assert seconds < 5, f"took {seconds:.1f} s"
    assert not (tmp_path / "no").exists()  # the mistyped folder was not created


def test_a_new_sqlite_store_is_made_without_mlflows_info_lines(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "report", "--experiment", "none", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'new.db'}", "--out-dir", str(tmp_path / "r")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "new.db").exists(), proc.stderr  # the store was created by this run
    for line in ("Creating initial MLflow database tables", "Updating database tables", "alembic", "Context impl",
                 "Will assume"):
        assert line not in proc.stderr, proc.stderr
