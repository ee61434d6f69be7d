import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.export import ExportedModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_prints_scores_and_exports(class_folder, tmp_path, capsys):
    out = tmp_path / "model"
    code = main([
        "train", "--dataset", str(class_folder), "--backbone", "efficientnet_lite0", "--image-size", "32",
        "--epochs", "2", "--fine-tune-epochs", "1", "--fine-tune-at", "120", "--batch-size", "8",
        "--learning-rate", "0.01", "--output", str(out),
    ])
    text = capsys.readouterr().out
    assert code == 0
    assert "classes ['blue', 'green', 'red']" in text and "skipped files 0" in text
    assert "Epoch 3/3" in text, "per-epoch progress over both phases"
    assert "frozen backbone features:" in text
    assert "test_accuracy=" in text and "(fine-tuned from layer 120)" in text
    assert "95 % Wilson interval" in text and "val_accuracy=" in text and "] test_accuracy=" in text
    exported = ExportedModel(out)
    assert exported.class_names == ["blue", "green", "red"]
    assert exported.predict(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 3)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "no_such_data"], "error: unknown data set 'no_such_data'"),
        (["--dataset", "{folder}", "--backbone", "vgg99"], "error: unknown backbone 'vgg99'; known backbones:"),
        (["--dataset", "{folder}", "--fine-tune-at", "999"], "error: fine_tune_at '999' is beyond the depth"),
        (["--dataset", "{folder}", "--backbone", "xception", "--image-size", "64"],
         "error: image size 64 is too small for backbone 'xception'"),
    ],
    ids=["dataset", "backbone", "fine-tune-at", "image-size"],
)
def test_bad_input_is_one_clear_line(class_folder, capsys, args, message):
    args = [a.format(folder=class_folder) for a in args]
    assert main(["train", *args, "--epochs", "1"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    (tmp_path / "only").mkdir()
    Path(tmp_path / "only" / "a.jpg").write_bytes(b"")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--dataset", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert "has a single class ('only')" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    for flag in ("--dataset", "--backbone", "--epochs", "--fine-tune-epochs", "--fine-tune-at", "--dropout",
                 "--batch-size", "--learning-rate", "--fine-tune-learning-rate", "--image-size", "--augment",
                 "--seed", "--output", "--split", "--weights"):
        assert flag in proc.stdout


def test_predict_prints_top_k_per_image_from_an_export(class_folder, tmp_path, capsys):
    from pipeline.export import export_model
    from pipeline.model import build_model

    model = build_model("efficientnet_lite0", 3, 32, seed=0)
    out = export_model(model, tmp_path / "export", ["blue", "green", "red"])
    images = tmp_path / "images"
    images.mkdir()
    for name in ("blue_000.jpg", "red_001.png"):
        src = next(class_folder.rglob(name))
        (images / name).write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"")
    assert main(["predict", "--model", str(out), "--images", str(images), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert lines[2:] == ["1 file(s) skipped (images read: .jpg, .jpeg, .jfif, .png, .gif, .bmp, .webp, .tif, .tiff):",
                         f"  skipped (an empty file): {images / 'broken.jpg'}"]
    for line in lines[:2]:
        scores = line.split(": ", 1)[1].split(", ")
        assert len(scores) == 2 and all(s.split()[0] in ("blue", "green", "red") for s in scores)
        assert float(scores[0].split()[1]) >= float(scores[1].split()[1])
    assert main(["predict", "--model", str(tmp_path), "--images", str(images)]) == 2
    assert "is not an export" in capsys.readouterr().err


def test_the_printed_board_shows_the_hyperparameters_that_tell_the_trials_apart(tracking_store, tmp_path, capsys,
                                                                                 monkeypatch):
    from sweeps.cli import _print_board
    from test_report_fit import log_trials

    monkeypatch.setenv("TMP_PLOTS", str(tmp_path / "plots"))
    log_trials("board", 4)
    _print_board("board", None, top=10)
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| trial_id"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert {"fine_tune_learning_rate", "dropout", "epochs", "fine_tune_epochs", "augment"} <= set(columns)
    assert "batch_size" not in columns and "image_size" not in columns, "one value in every trial: not a column"
    assert columns[:3] == ["trial_id", "status", "backbone"]
