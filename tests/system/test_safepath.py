"""tlsweep replaces or writes into only folders it made (pipeline.safepath): a user's folder where an export, a
report, a cache or a sweep's state would go is one line, never lost; so is a path that cannot be a folder. Real
folders and files, the real commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import make_class_folder
from pipeline import safepath
from pipeline.errors import UserError
from sweeps.cli import main as sweeps_main

ROOT = Path(__file__).resolve().parents[2]
LONG = "a" * 300  # bytes: longer than any file system's name (255)


def photos(folder: Path) -> dict[str, bytes]:
    """A user's data folder of 36 photos, and its files' contents (to check that nothing was lost)."""
    make_class_folder(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- --overwrite replaces only tlsweep's own exports --------------------------------------------------------------


def test_best_export_overwrite_never_replaces_the_users_data_folder(tmp_path, tracking_store, monkeypatch, capsys):
    kept = photos(tmp_path / "photos")  # ./photos: the user's data, named as the experiment
    monkeypatch.chdir(tmp_path)
    code = sweeps_main(["best-export", "--experiment", "photos", "--export-dir", ".", "--overwrite"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: photos already exists and is not tlsweep's export: it holds 3 entries (blue/, green/, red/) and no "
        ".tlsweep marker; tlsweep replaces only what it wrote itself, even with --overwrite. Give --export-dir a new "
        "or empty folder\n")
    assert contents(tmp_path / "photos") == kept and len(kept) == 36
    monkeypatch.setenv("MAKELEVEL", "1")  # `make best-export EXPORT_DIR=. OVERWRITE=1`: the variables typed
    assert sweeps_main(["best-export", "--experiment", "photos", "--export-dir", ".", "--overwrite"]) == 2
    assert "tlsweep replaces only what it wrote itself, even with OVERWRITE=1. Give EXPORT_DIR= a new or empty " \
           "folder" in capsys.readouterr().err


def test_train_refuses_an_output_that_is_not_an_export_before_training(tmp_path, class_folder, capsys):
    from pipeline.cli import main as train_main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert train_main(["train", "--dataset", str(class_folder), "--output", str(user), "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"error: {user} already exists and is not tlsweep's export: it holds 1 entry (notes.txt) and no .tlsweep "
        "marker; tlsweep replaces only what it wrote itself, even with --overwrite. Give --output a new or empty "
        "folder\n")
    assert (user / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    assert train_main(["train", "--dataset", str(class_folder), "--output", str(tmp_path / "file" / "e")]) == 2
    assert capsys.readouterr().err == (f"error: export {tmp_path / 'file' / 'e'} cannot be made: {tmp_path / 'file'} "
                                       "is a file; give --output another path, or move the file away\n")


def test_an_export_is_replaced_only_with_overwrite_and_an_old_one_is_known_by_its_layout(tmp_path):
    export = tmp_path / "e"
    (export / "variables").mkdir(parents=True)
    for name in ("saved_model.pb", "labels.txt", "metadata.json"):  # as tlsweep wrote exports before the marker
        (export / name).write_text("x")
    with pytest.raises(UserError) as e:
        safepath.check_replaceable(export, safepath.EXPORT, "--output", overwrite=False)
    assert str(e.value) == (f"export {export} already exists (tlsweep's export); pass --overwrite to replace it, or "
                            "give --output another folder")
    assert safepath.check_replaceable(export, safepath.EXPORT, "--output", overwrite=True)
    new = tmp_path / "new"
    new.mkdir()
    (new / "saved_model.pb").write_text("new")
    safepath.replace_dir(new, export, safepath.EXPORT)
    assert sorted(p.name for p in export.iterdir()) == [".tlsweep", "saved_model.pb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"], "the old export removed, nothing left aside"
    assert safepath.marked_kind(export) == "export"

    (export / safepath.MARKER).unlink()
    (export / "labels.txt").write_text("a\n")
    (export / "holiday.jpg").write_bytes(b"\xff\xd8")  # an old layout plus a file tlsweep never writes: not ours
    with pytest.raises(UserError, match=r"is not tlsweep's export: it holds 3 entries \(holiday.jpg, labels.txt, "
                                        r"saved_model.pb\)"):
        safepath.check_replaceable(export, safepath.EXPORT, "--output", overwrite=True)
    report = tmp_path / "r"
    report.mkdir()
    safepath.mark(report, safepath.REPORT)
    (report / "report.html").write_text("<html>")
    with pytest.raises(UserError, match=r"is not tlsweep's export: it holds tlsweep's report folder"):
        safepath.check_replaceable(report, safepath.EXPORT, "--output", overwrite=True)


# -- the report folder ---------------------------------------------------------------------------------------------


def test_a_report_replaces_its_own_folder_whole_and_refuses_anyone_elses(tmp_path, tracking_store, monkeypatch):
    from test_report_fit import log_trials
    from tracking.report import write_report

    monkeypatch.setenv("TMP_PLOTS", str(tmp_path / "plots"))
    log_trials("fake", 3)
    first = write_report("fake", tmp_path / "reports")
    (first.parent / "stale.png").write_bytes(b"old chart")
    second = write_report("fake", tmp_path / "reports")
    assert second == first and not (first.parent / "stale.png").exists(), "written whole: no chart of an old report"
    assert safepath.marked_kind(first.parent) == "report"
    kept = photos(tmp_path / "mine" / "fake")
    with pytest.raises(UserError) as e:
        write_report("fake", tmp_path / "mine")
    assert str(e.value) == (f"{tmp_path / 'mine' / 'fake'} already exists and is not tlsweep's report folder: it holds "
                            "3 entries (blue/, green/, red/) and no .tlsweep marker; tlsweep replaces only what it "
                            "wrote itself. Give --out-dir a new or empty folder")
    assert contents(tmp_path / "mine" / "fake") == kept


# -- paths that cannot be folders ------------------------------------------------------------------------------------


def test_state_report_and_export_paths_that_are_files_or_too_long_are_one_line_before_any_work(
        tmp_path, tracking_store, class_folder, capsys):
    (tmp_path / "file").write_text("x")
    sweep = ["sweep", "--dataset", str(class_folder), "--sweep", "quick"]
    assert sweeps_main([*sweep, "--state-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (
        f"error: sweep state folder {tmp_path / 'file' / class_folder.name} cannot be made: {tmp_path / 'file'} is a "
        "file; give --state-dir (the state goes to <state dir>/<experiment>) another path, or move the file away\n")
    assert sweeps_main([*sweep, "--state-dir", str(tmp_path / "s"), "--experiment", LONG]) == 2
    assert capsys.readouterr().err == (
        f"error: experiment name '{'a' * 40}…{'a' * 12}' is 300 bytes long; it names folders, and a folder name may be "
        "at most 255 bytes; give --experiment a shorter name\n")
    assert not (tmp_path / "s").exists() and not (tmp_path / "mlflow.db").exists(), "refused before any work"
    assert sweeps_main(["best-export", "--experiment", LONG, "--export-dir", str(tmp_path / "x")]) == 2
    assert "error: experiment name 'aaaa" in capsys.readouterr().err
    assert sweeps_main(["best-export", "--experiment", "e", "--export-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (f"error: export {tmp_path / 'file' / 'e'} cannot be made: {tmp_path / 'file'} is "
                                       "a file; give --export-dir another path, or move the file away\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "e").write_text("a file where the report folder goes")
    with pytest.raises(UserError) as e:
        from tracking.report import write_report

        write_report("e", tmp_path / "reports")
    assert str(e.value) == (f"report folder {tmp_path / 'reports' / 'e'} is a file, not a folder; give --out-dir another "
                            "path, or move the file away")
    with pytest.raises(UserError) as e:  # /proc takes no new folder, even from root (whom permissions do not stop)
        safepath.check_path("/proc/exports/e", "export", "--output")
    assert str(e.value) == ("export /proc/exports/e cannot be made: no folder can be made in /proc (No such file or "
                            "directory); give --output a folder you can write to")
    with pytest.raises(UserError) as e:
        safepath.check_path(tmp_path / ("b" * 300) / "e", "export", "--output")
    assert str(e.value) == (f"export path has a name of 300 bytes ('{'b' * 40}…{'b' * 12}'), and the file system of "
                            f"{tmp_path} takes at most 255 bytes per name; give --output a shorter one")


# -- caches ----------------------------------------------------------------------------------------------------------


def test_a_cache_path_that_is_a_file_or_a_users_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache.txt"))
    (tmp_path / "cache.txt").write_text("x")
    with pytest.raises(UserError) as e:
        safepath.check_caches()
    assert str(e.value) == (f"TLSWEEP_CACHE='{tmp_path / 'cache.txt'}' is a file, not a folder; point it at a folder "
                            "(it holds tlsweep's caches) or unset it for ~/.cache/tlsweep")  # read as a setting
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    kept = photos(tmp_path / "images")  # a folder of the user's where the decoded-image cache would go
    with pytest.raises(UserError) as e:
        safepath.check_caches()
    assert str(e.value) == (f"cache {tmp_path / 'images'} is not tlsweep's: it holds 3 entries (blue/, green/, red/) "
                            "and no .tlsweep marker; give TLSWEEP_CACHE (where tlsweep keeps its caches) another folder")
    assert contents(tmp_path / "images") == kept


def test_make_clean_cache_removes_only_tlsweeps_caches(tmp_path, monkeypatch):
    import numpy as np

    from pipeline import features

    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    features.save("0123456789abcdef0123", {"train": (np.zeros((2, 3)), np.zeros(2))})  # as a trial writes it
    assert safepath.marked_kind(tmp_path / "features") == "cache"
    (tmp_path / "cuts" / "0123456789abcdef0123").mkdir(parents=True)  # from before markers: known by its names
    kept = photos(tmp_path / "images")
    done = subprocess.run(["make", "-s", "clean-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TLSWEEP_CACHE": str(tmp_path)})
    assert done.returncode != 0, "a kept folder is not a clean run"
    assert done.stdout.splitlines() == [
        f"removed {tmp_path / 'features'} (0.0 MB)", f"removed {tmp_path / 'cuts'} (0.0 MB)",
        f"kept {tmp_path / 'images'}: it is not tlsweep's cache (3 entries (blue/, green/, red/), no .tlsweep marker); "
        "delete it yourself if it is"]
    assert contents(tmp_path / "images") == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# -- tlsweep never writes into the data it reads -------------------------------------------------------------------


def test_a_sweep_run_inside_its_data_folder_is_refused_and_old_outputs_there_are_not_to_be_deleted(
        tmp_path, class_folder, monkeypatch, capsys):
    data = tmp_path / "photos"
    kept = photos(data)
    monkeypatch.chdir(data)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert sweeps_main(["sweep", "--dataset", ".", "--sweep", "quick"]) == 2
    assert capsys.readouterr().err == (
        f"error: data folder . (the working directory) would hold the sweep state {data / 'sweeps_state' / 'photos'}, "
        f"the tracking store {data / 'mlflow.db'}, its artifacts {data / 'mlartifacts'}: tlsweep's own outputs, which "
        "it must not write into the data it reads (a later run would take them for a class). Run tlsweep from another "
        f"folder (e.g. cd {tmp_path}; --dataset photos), moving any mlflow.db, mlartifacts/ and sweeps_state/ there "
        "with it: they hold your runs, do not delete them\n")
    assert contents(data) == kept, "nothing written into the data folder"
    from pipeline.cli import main as train_main

    assert train_main(["train", "--dataset", ".", "--output", "model"]) == 2  # an export into the data: the same
    assert capsys.readouterr().err.startswith(f"error: data folder . (the working directory) would hold the export "
                                              f"{data / 'model'}: tlsweep's own outputs")
    (data / "mlartifacts" / "1").mkdir(parents=True)  # a store an earlier version left there
    monkeypatch.chdir(tmp_path)
    assert sweeps_main(["sweep", "--dataset", str(data), "--sweep", "quick", "--tracking-uri",
                        f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data folder {data} holds mlartifacts from an earlier run: tlsweep's own outputs") \
        and "do not delete them" in err


@pytest.mark.parametrize("kind, written", [(safepath.EXPORT, ("saved_model.pb", "labels.txt")),
                                           (safepath.REPORT, ("report.html", "report.md", "a.png"))])
def test_a_folder_of_tlsweeps_with_a_users_file_added_is_not_replaced_even_with_overwrite(tmp_path, kind, written):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in written:
        (folder / name).write_text("tlsweep's")
    safepath.mark(folder, kind)
    assert safepath.check_replaceable(folder, kind, "--export-dir", overwrite=True), "tlsweep's alone: replaced"
    (folder / "mynotes.txt").write_text("the user's")
    with pytest.raises(UserError, match=rf"^{kind.noun} {folder} is tlsweep's, but holds files tlsweep did not write "
                                        r"\(mynotes.txt\), which replacing it would delete, even with --overwrite. "
                                        r"Move them out of it, or give --export-dir another folder$"):
        safepath.check_replaceable(folder, kind, "--export-dir", overwrite=True)
    (tmp_path / "new").mkdir()
    with pytest.raises(UserError):  # and never removed by the replacement itself
        safepath.replace_dir(tmp_path / "new", folder, kind)
    assert (folder / "mynotes.txt").read_text() == "the user's"
