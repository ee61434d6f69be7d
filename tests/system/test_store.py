"""A tracking store that cannot be used is one line naming the URI and the fix, at once (MLflow itself would
retry for minutes or create a mistyped folder); a new SQLite store is made without MLflow's INFO lines."""

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.cli import main as sweeps_main
from tracking.server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("uri,message", [
    ("foo://x", r"tracking URI 'foo://x' has an unknown scheme 'foo://'; give sqlite:///<path>/mlflow.db, "
                r"http://<host>:<port> .* or unset MLFLOW_TRACKING_URI"),
    ("sqlite:///{tmp}/no/such/dir/mlflow.db", r"SQLite tracking store sqlite:///.*/no/such/dir/mlflow.db: folder "
                                              r".*/no/such/dir does not exist; create it \(mkdir -p .*\) or fix the path"),
    # /proc refuses new files to everyone, root included (chmod would not stop root)
    ("sqlite:////proc/mlflow.db", r"SQLite tracking store sqlite:////proc/mlflow.db is not writable \(.*\); give a "
                                  r"path in a folder you can write to"),
    ("http://127.0.0.1:{port}", r"MLflow tracking server http://127.0.0.1:\d+ does not answer .*; start it "
                                r"\(tlsweep server\)"),
], ids=["unknown-scheme", "missing-folder", "read-only-folder", "no-server"])
def test_an_unusable_store_is_one_line_at_once(tmp_path, capsys, uri, message):
    import re

    uri = uri.format(tmp=tmp_path, port=free_port())
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


# -- store files that MLflow cannot open: one line each, with real files ------------------------------------------


def _real_store(path: Path, runs: int = 0) -> None:
    """A store MLflow made, in a fresh process (as another tlsweep run would have), with ``runs`` runs in it."""
    code = ("import sys; from mlflow.tracking import MlflowClient; c = MlflowClient(sys.argv[1]); "
            "e = c.create_experiment('x') if int(sys.argv[2]) else None; "
            "[c.set_terminated(c.create_run(e).info.run_id) for _ in range(int(sys.argv[2]))]; c.search_experiments()")
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{path}", str(runs)], check=True, timeout=300,
                   capture_output=True)


def _report(tmp_path: Path, uri: str, capsys) -> tuple[int, str]:
    code = sweeps_main(["report", "--experiment", "x", "--tracking-uri", uri, "--out-dir", str(tmp_path / "r")])
    return code, capsys.readouterr().err


def test_a_store_file_that_is_text_a_folder_or_cut_short_is_one_line(tmp_path, capsys):
    text = tmp_path / "mlflow.db"
    text.write_text("my notes, not a database\n")
    code, err = _report(tmp_path, f"sqlite:///{text}", capsys)
    assert (code, err) == (2, f"error: tracking store sqlite:///{text}: {text} is not an SQLite database (it starts "
                              "with 'my notes, not a database'); give another file (a new one is created), or unset "
                              "MLFLOW_TRACKING_URI (and --tracking-uri) to use ./mlflow.db\n")
    assert text.read_text() == "my notes, not a database\n"
    folder = tmp_path / "store.db"
    folder.mkdir()
    start = time.perf_counter()
    code, err = _report(tmp_path, f"sqlite:///{folder}", capsys)  # MLflow itself retried for minutes
    assert (code, err) == (2, f"error: SQLite tracking store sqlite:///{folder} is a folder, not a database file; give "
                              f"the path of a file in it (sqlite:///{folder / 'mlflow.db'}), or unset "
                              "MLFLOW_TRACKING_URI (and --tracking-uri) to use ./mlflow.db\n")
    assert time.perf_counter() - start < 5
    cut = tmp_path / "cut.db"
    _real_store(cut, runs=2)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a copy or a disk that stopped half-way
    code, err = _report(tmp_path, f"sqlite:///{cut}", capsys)
    assert code == 2 and err.startswith(f"error: tracking store sqlite:///{cut}: {cut} is a damaged SQLite database (it "
                                        "is ") and "it was cut short); restore it from a backup, or give another " \
                                        "file (a new one is created), or unset MLFLOW_TRACKING_URI" in err, err


@pytest.mark.parametrize("given", ["plain", "file"])
def test_a_plain_path_or_file_store_says_mlflow_no_longer_opens_it_and_gives_the_sqlite_uri(tmp_path, capsys, given):
    runs = tmp_path / "mlruns"
    runs.mkdir()
    uri = str(runs) if given == "plain" else runs.as_uri()
    code, err = _report(tmp_path, uri, capsys)
    what = "a plain path: MLflow reads it as its file store" if given == "plain" else "MLflow's file store"
    assert (code, err) == (2, f"error: tracking URI {uri!r} is {what} (a folder of files), which MLflow keeps in "
                              f"maintenance mode and no longer opens; give an SQLite store, "
                              f"sqlite:///{tmp_path / 'mlflow.db'} (`mlflow migrate-filestore --source {runs} --target "
                              f"sqlite:///{tmp_path / 'mlflow.db'}` moves the runs already in it over), or unset "
                              "MLFLOW_TRACKING_URI (and --tracking-uri) to use ./mlflow.db\n")


FULL_DISK = """import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (250_000, 250_000))
from mlflow.tracking import MlflowClient
try:
    MlflowClient(sys.argv[1]).search_experiments()
except Exception as e:
    print(type(e).__name__, str(e).splitlines()[0])
"""


@pytest.mark.slow
def test_a_store_left_half_made_by_a_full_disk_is_made_anew_when_empty_and_named_when_not(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tracking import store

    db = tmp_path / "mlflow.db"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, f"sqlite:///{db}"], capture_output=True, text=True,
                         timeout=300).stdout
    assert "disk I/O error" in out or "database or disk is full" in out, out  # MLflow stopped half-way
    again = subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                            "MlflowClient(sys.argv[1]).search_experiments()", f"sqlite:///{db}"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr, "MLflow alone fails on it every time after"
    half = db.read_bytes()
    store.configure(f"sqlite:///{db}")
    (aside,) = tmp_path.glob("mlflow.db.half-made-*")
    assert aside.read_bytes() == half, "kept aside, not deleted"
    err = capsys.readouterr().err
    assert err.startswith(f"note: the tracking store {db} holds no run and is not at the schema this MLflow writes (")
    assert err.endswith(f"moved it to {aside}; a new one is made in its place (delete the old one when you like)\n")
    client = MlflowClient(f"sqlite:///{db}")
    client.set_terminated(client.create_run(client.create_experiment("works")).info.run_id)

    kept = tmp_path / "kept.db"
    _real_store(kept, runs=3)
    with contextlib.closing(sqlite3.connect(kept)) as con:  # the same half-way state, in a store with runs in it
        con.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")
        con.commit()
    code, err = _report(tmp_path, f"sqlite:///{kept}", capsys)
    assert code == 2 and err.startswith(f"error: tracking store sqlite:///{kept} holds 3 run(s) but its schema is at "
                                        "0584bdc529eb, not "), err
    assert (f"back it up (cp {kept} {kept}.bak) and run `mlflow db upgrade sqlite:///{kept}` (a newer MLflow's store "
            "needs that MLflow); if a full disk stopped its creation or upgrade, restore your backup") in err
    assert kept.exists() and not list(tmp_path.glob("kept.db.*")), "a store with runs is never moved"
