"""Bad data, each class of it made of real files: FIFOs, sockets, devices, links, unreadable files, WebP/TIFF/AVIF,
EXIF-rotated photos, split-folder layouts, copies across splits, SPLIT= and seeds. The rows of
docs/troubleshooting-data.md."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from support import make_class_folder, write_image
from pipeline.data import (check_dataset, check_seed, load_data, read_image, skip_reason, skipped_lines,
                           unreadable_files, walk)
from pipeline.errors import UserError
from tracking.runs import values

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED = ".jpg, .jpeg, .jfif, .png, .gif, .bmp, .webp, .tif, .tiff"
LAYOUTS = ("Layouts accepted: <folder>/<class>/<images>, or <folder>/train/<class>/<images> beside val/ (or valid/, "
           "validation/) and/or test/ (any case; training/ and testing/ too)")


@contextlib.contextmanager
def no_hang(seconds: int = 120):
    """Fail, instead of hanging the suite, if something blocks (a FIFO opened for reading waits for a writer)."""
    def alarm(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def odd_entries(folder: Path, elsewhere: Path, monkeypatch) -> dict[str, str]:
    """Every kind of entry that is not an image file, made in ``folder``: name -> the reason it is skipped."""
    elsewhere.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.jpg")
    monkeypatch.chdir(folder)  # a socket's path is at most 107 bytes: bind it by its relative name
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("sock.jpg")
    (folder / "null.jpg").symlink_to("/dev/null")
    (folder / "gone.jpg").symlink_to(elsewhere / "missing.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    write_image(folder / "dir.jpg" / "inside.png", (0, 0, 0))
    write_image(elsewhere / "photos" / "a.png", (0, 0, 0))
    (folder / "linked").symlink_to(elsewhere / "photos")
    Image.new("RGB", (8, 8)).save(folder / "photo.heic", "AVIF")  # no HEIC encoder here: an AVIF named .heic
    Image.new("RGB", (8, 8)).save(folder / "avif.jpg", "AVIF")
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"JUNK" * 10)
    (folder / "broken.tif").write_bytes(b"II*\x00" + b"\x07" * 60)  # a TIFF header, then nothing Pillow can read
    good = next(folder.glob("*_000.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[:40])  # passes the header check, does not decode
    return {
        "pipe.jpg": "a FIFO (named pipe), not a regular file",
        "sock.jpg": "a socket, not a regular file",
        "null.jpg": "a character device, not a regular file",
        "gone.jpg": f"a symlink to {elsewhere / 'missing.jpg'}, which does not exist",
        "loop.jpg": "cannot be read: Too many levels of symbolic links",
        "dir.jpg": "a folder named like an image file",
        "linked": "a link to a folder (links to folders are not followed)",
        "photo.heic": "unsupported format (.heic)",
        "avif.jpg": "unsupported format (AVIF content in a .jpg file)",
        "notes.txt": "unsupported format (.txt)",
        "empty.png": "an empty file",
        "junk.jpg": "not a readable image",
        "broken.tif": "not a readable image",
        "truncated.jpg": "not a readable image",
    }


def expected_lines(folder: Path, reasons: dict[str, str]) -> set[str]:
    return {f"  skipped ({reason}): {folder / name}" for name, reason in reasons.items()}


def test_entries_that_are_not_image_files_are_skipped_and_named_never_opened(tmp_path, monkeypatch):
    data = make_class_folder(tmp_path / "data", per_class=8, classes=("blue", "red"))
    reasons = odd_entries(data / "blue", tmp_path / "elsewhere", monkeypatch)
    write_image(tmp_path / "elsewhere" / "real.jpg", (30, 40, 210))
    (data / "blue" / "link.jpg").symlink_to(tmp_path / "elsewhere" / "real.jpg")  # a link to a regular file is read
    with no_hang():
        loaded = load_data(str(data), 16, seed=0)  # train, and every trial of a sweep
        before_trials = unreadable_files(str(data))  # what a sweep names before its first trial
    assert sorted(loaded.skipped_files) == before_trials
    from sweeps.state import data_identity  # a sweep's identity of its data: it crashed on the dangling link

    # dir.jpg/ and linked/ are folders, not files; link.jpg and dir.jpg/inside.png are files
    assert data_identity(str(data), None, 0)["files"] == 16 + len(reasons) - 2 + 2
    lines = skipped_lines(loaded.skipped_files, limit=100)
    assert lines[0] == f"{len(reasons)} file(s) skipped (images read: {SUPPORTED}):"
    assert set(lines[1:]) == expected_lines(data / "blue", reasons)
    assert sum(loaded.sizes.values()) == 8 + 1 + 8


def test_pillows_unnamed_warnings_about_a_broken_file_are_held_back(tmp_path):
    """"Corrupt EXIF data" names no file (the skipped lines do): a process reading a broken TIFF prints nothing."""
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x07" * 60)
    code = ("import sys; from pipeline.datafolder import orientation, skip_reason\n"
            "print(orientation(sys.argv[1]), skip_reason(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "broken.tif")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "1 None\n", "")
    bare = subprocess.run([sys.executable, "-c", "import sys; from PIL import Image; Image.open(sys.argv[1])",
                           str(tmp_path / "broken.tif")], capture_output=True, text=True, timeout=120)
    assert "Corrupt EXIF data" in bare.stderr  # what the filter holds back


def test_a_file_that_cannot_be_read_is_skipped_and_named():
    """Permission denied. Root reads every file: run as root, the listing runs in a child turned into nobody."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tlsweep-test-") as base:  # in /tmp: a place nobody can reach
        os.chmod(base, 0o755)
        data = make_class_folder(Path(base) / "data", per_class=2, classes=("blue", "red"))
        secret = data / "red" / "secret.jpg"
        secret.write_bytes((data / "red" / "red_000.jpg").read_bytes())
        secret.chmod(0)
        assert as_nobody(lambda: skipped_lines([str(p) for p in walk(data / "red")[1]])) == [
            f"1 file(s) skipped (images read: {SUPPORTED}):", f"  skipped (cannot be read: Permission denied): {secret}"]


def as_nobody(work):
    """``work()``, in a forked child that is user nobody when the tests run as root (pure Python: no TensorFlow)."""
    import json

    if os.geteuid() != 0:
        return work()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, json.dumps(work()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


# --- formats -------------------------------------------------------------------------------------------------


def quadrants(height: int = 12, width: int = 20) -> np.ndarray:
    """A picture whose every turn and mirror differs: four coloured quadrants, wider than high."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2] = (255, 0, 0)
    a[: height // 2, width // 2 :] = (0, 255, 0)
    a[height // 2 :, : width // 2] = (0, 0, 255)
    a[height // 2 :, width // 2 :] = (250, 250, 0)
    return a


def test_webp_and_tiff_are_read_with_the_same_pixels_as_png(tmp_path):
    picture = Image.fromarray(quadrants())
    picture.save(tmp_path / "a.png")
    picture.save(tmp_path / "a.webp", lossless=True)
    picture.save(tmp_path / "a.tif")
    picture.save(tmp_path / "lzw.tiff", compression="tiff_lzw")
    png = read_image(tmp_path / "a.png", 16)
    for name in ("a.webp", "a.tif", "lzw.tiff"):
        assert skip_reason(tmp_path / name) is None
        np.testing.assert_array_equal(read_image(tmp_path / name, 16), png, err_msg=name)


def test_a_folder_of_webp_and_tiff_trains_and_other_formats_are_named_unsupported(tmp_path):
    for c, color in (("blue", (30, 40, 210)), ("red", (210, 30, 40))):
        for i, ext in enumerate(("webp", "tif", "tiff", "webp", "tif", "webp", "tif", "jpg")):
            write_image(tmp_path / c / f"{c}_{i}.{ext}", color, seed=i)
    Image.new("RGB", (8, 8)).save(tmp_path / "red" / "phone.avif", "AVIF")
    data = load_data(str(tmp_path), 16, seed=0)
    assert sum(data.sizes.values()) == 16
    assert skipped_lines(data.skipped_files)[1:] == [f"  skipped (unsupported format (.avif)): {tmp_path / 'red' / 'phone.avif'}"]
    x, y = data.first("train", 16)
    blue = x[y == 0].reshape(-1, 3).mean(axis=0)
    assert blue[2] > 150 and blue[0] < 80  # WebP and TIFF pixels, not zeros


def test_a_class_of_unsupported_files_only_says_which_and_what_is_read(tmp_path):
    make_class_folder(tmp_path, per_class=8, classes=("blue", "red"))
    (tmp_path / "green").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "green" / f"IMG_{i}.heic", "AVIF")
    with pytest.raises(UserError) as e:
        load_data(str(tmp_path), 16)
    assert str(e.value) == (f"class folder {tmp_path / 'green'} holds no images (3 file(s) skipped there, e.g. "
                            f"IMG_0.heic: unsupported format (.heic)); images read: {SUPPORTED}; add images to it or "
                            "remove it (an empty class would be a class the model can never learn)")


# --- EXIF orientation -----------------------------------------------------------------------------------------


def with_orientation(path: Path, pixels: np.ndarray, turn: int, **save) -> Path:
    exif = Image.Exif()
    exif[0x0112] = turn
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **save)
    return path


@pytest.mark.parametrize("turn", range(1, 9))
def test_every_exif_orientation_is_read_as_displayed(tmp_path, turn):
    pixels = quadrants()
    for name, save in (("o.png", {}), ("o.webp", {"lossless": True}), ("o.tif", {})):
        path = with_orientation(tmp_path / name, pixels, turn, **save)
        with Image.open(path) as image:
            ImageOps.exif_transpose(image).convert("RGB").save(tmp_path / "shown.png")  # Pillow's reading of it
        np.testing.assert_array_equal(read_image(path, 16), read_image(tmp_path / "shown.png", 16), err_msg=name)


def test_exif_rotated_jpegs_train_and_predict_as_displayed(tmp_path):
    """A phone photo held upright is stored sideways with Orientation 6: training, the image cache and predict all
    read it upright, as Pillow's exif_transpose (and a browser) shows it."""
    pixels = quadrants(16, 24)
    folder = tmp_path / "data"
    for split, n in (("train", 4), ("val", 1), ("test", 1)):
        for c in ("other", "up"):
            for i in range(n):
                write_image(folder / split / c / f"{c}_{i}.png", (128, 128, 128), seed=i)
    stored = np.ascontiguousarray(np.rot90(pixels, 1))  # as the camera wrote it, with Orientation 6 to turn it back
    photo = with_orientation(folder / "test" / "up" / "phone.jpg", stored, 6, quality=95)
    upright = read_image(photo, 16)
    with Image.open(photo) as image:
        ImageOps.exif_transpose(image).save(tmp_path / "shown.png")
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    for reference in ("shown.png", "plain.png"):  # JPEG's loss aside (about 8 of 255 here), the upright picture
        assert np.abs(upright.astype(int) - read_image(tmp_path / reference, 16).astype(int)).mean() < 15
    assert np.abs(upright.astype(int) - read_image(_png(tmp_path / "stored.png", stored), 16).astype(int)).mean() > 40
    for _ in range(2):  # decoded, then memory-mapped from the image cache
        data = load_data(str(folder), 16, seed=0)
        x, y = data.first("test", 3)  # test/other/other_0.png, test/up/phone.jpg, test/up/up_0.png
        assert list(y) == [0, 1, 1]
        np.testing.assert_array_equal(x[1], upright)


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


# --- layouts ---------------------------------------------------------------------------------------------------


def split_layout(root: Path, names: dict[str, int], classes=("blue", "red")) -> Path:
    """Split folders of class folders, every image its own (conftest's folders repeat the same images)."""
    seed = 0
    for folder, n in names.items():
        for c in classes:
            for i in range(n):
                seed += 1
                write_image(root / folder / c / f"{c}_{i:03d}.{'jpg' if i % 2 else 'png'}", (30, 40, 210), seed=seed)
    return root


@pytest.mark.parametrize("names,spec,sizes", [
    ({"train": 4, "valid": 2, "test": 3}, "train/,valid/,test/", (8, 4, 6)),
    ({"Train": 4, "Validation": 2, "TEST": 3}, "Train/,Validation/,TEST/", (8, 4, 6)),
    ({"training": 20, "testing": 3}, "training/ split 85/15 into train/validation (stratified, seed 42),testing/",
     (34, 6, 6)),
    ({"Train": 4, "Val": 4}, "Train/,Val/[:50%],Val/[50%:] (seed 42)", (8, 4, 4)),
], ids=["valid", "case", "training-testing", "Train-Val"])
def test_split_folders_are_found_by_any_common_name_in_any_case(tmp_path, names, spec, sizes):
    data = load_data(str(split_layout(tmp_path, names)), 16)
    assert data.split_spec == spec
    assert (data.sizes["train"], data.sizes["validation"], data.sizes["test"]) == sizes


@pytest.mark.parametrize("names,extra,message", [
    ({"train": 2, "val": 1, "test": 1}, "roses",
     "folder {root} has split folders (train/, val/, test/) and also roses/, which is not a split and would be ignored; "
     "move class folders into train/ (and the validation and test folders), or move roses/ out. " + LAYOUTS),
    ({"train": 2, "val": 1, "validation": 1}, None,
     "folder {root} has val/ and validation/, both the validation split; keep one (merge the other into it). " + LAYOUTS),
    ({"val": 1, "test": 1}, None,
     "folder {root} has val/, test/ but no train/ folder; add train/<class>/<images> beside it, or pass a folder of "
     "class folders. " + LAYOUTS),
    ({"Train": 2}, None,
     "folder {root} has Train/ and no validation or test folder beside it; pass {root}/Train itself (split by --split), "
     "or add val/ or test/ beside it. " + LAYOUTS),
], ids=["stray-class", "two-validations", "no-train", "train-only"])
def test_ambiguous_layouts_are_refused_before_any_work_naming_the_folders(tmp_path, names, extra, message):
    root = split_layout(tmp_path / "data", names)
    if extra:
        write_image(root / extra / "r.jpg", (200, 0, 0))
    expected = message.format(root=root)
    for check in (lambda: check_dataset(str(root)), lambda: load_data(str(root), 16), lambda: unreadable_files(str(root))):
        with pytest.raises(UserError) as e:
            check()
        assert str(e.value) == expected


def test_a_class_of_validation_or_test_that_train_lacks_is_refused(tmp_path):
    root = split_layout(tmp_path, {"train": 4, "val": 2, "test": 2})
    write_image(root / "test" / "green" / "g.jpg", (30, 200, 40))
    for check in (lambda: check_dataset(str(root)), lambda: load_data(str(root), 16)):
        with pytest.raises(UserError) as e:
            check()
        assert str(e.value) == (f"{root / 'test'} has class folder(s) green that the train split does not have (its "
                                "classes: blue, red); every split needs the same classes: add them to the train "
                                "split or remove them")


def test_classes_named_like_splits_in_a_folder_of_classes_stay_classes(tmp_path):
    """A vehicles data set: bus/, car/ and train/ are classes (train/ holds images, not class folders)."""
    for c in ("bus", "car", "train"):
        for i in range(10):
            write_image(tmp_path / c / f"{i}.jpg", (100, 100, 100), seed=i)
    data = load_data(str(tmp_path), 16, seed=0)
    assert data.class_names == ["bus", "car", "train"] and data.split_spec == "75/15/10 (seed 0)"


# --- copies of train images in validation or test -------------------------------------------------------------


def test_byte_identical_copies_across_splits_are_warned_in_one_line_not_refused(tmp_path):
    """Warned, not refused: flower_photos itself holds three byte-identical pairs (one across two classes)."""
    root = split_layout(tmp_path, {"train": 4, "val": 2, "test": 2})
    for i, (split, name) in enumerate((("test", "copy_a.jpg"), ("test", "copy_b.png"), ("val", "copy_c.jpg"))):
        source = sorted((root / "train" / "blue").iterdir())[i]
        (root / split / "blue" / name).write_bytes(source.read_bytes())
    with pytest.warns(UserWarning) as caught:
        data = load_data(str(root), 16)
    (line,) = [str(w.message) for w in caught if "byte-identical" in str(w.message)]
    assert line == (f"2 test image(s) and 1 validation image(s) of {root} are byte-identical copies of train images "
                    "(e.g. test/blue/copy_a.jpg = train/blue/blue_000.png): they are scored on images the model "
                    "trained on, so their accuracy reads higher than on new photos; delete one file of each pair to "
                    "measure it")
    assert data.sizes == {"train": 8, "validation": 5, "test": 6}
    shown = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught]
    assert f"warning: {line}\n" in shown  # as the CLIs print it: one line, no file:line, no source line
    with warnings.catch_warnings():  # the same images, different bytes: no warning
        warnings.simplefilter("error")
        (root / "test" / "blue" / "copy_a.jpg").unlink()
        (root / "test" / "blue" / "copy_b.png").unlink()
        (root / "val" / "blue" / "copy_c.jpg").unlink()
        load_data(str(root), 16)


# --- seeds --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 10**30, "abc", 1.5, True])
def test_a_seed_out_of_range_is_one_line_before_any_work(class_folder, seed):
    message = f"seed must be a whole number from 0 to 4294967295 (2**32 - 1, the largest numpy takes), got {seed!r}"
    for check in (lambda: check_seed(seed), lambda: check_dataset(str(class_folder), seed=seed),
                  lambda: load_data(str(class_folder), 16, seed=seed)):
        with pytest.raises(UserError) as e:
            check()
        assert str(e.value) == message
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1


def test_a_sweep_refuses_a_bad_split_before_any_run(class_folder, tmp_path, capsys, monkeypatch):
    from sweeps.cli import main as sweeps_main

    monkeypatch.chdir(tmp_path)
    assert sweeps_main(["sweep", "--dataset", str(class_folder), "--sweep", "quick", "--split", "50/30/30",
                        "--state-dir", str(tmp_path / "state"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert capsys.readouterr().err == ("error: split '50/30/30' for a folder must be three train/validation/test "
                                       "percentages above zero that add up to 100, such as 75/15/10; they add up to "
                                       "110\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_clis_refuse_a_seed_out_of_range_before_any_work(class_folder, tmp_path, capsys, monkeypatch):
    """The flags' own bound (pipeline.hparams.Seed) is the same as check_seed's."""
    from pipeline.cli import main
    from sweeps.cli import main as sweeps_main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", str(class_folder), "--seed", str(2**32), "--image-size", "32"]) == 2
    train = capsys.readouterr().err
    assert sweeps_main(["sweep", "--dataset", str(class_folder), "--sweep", "quick", "--seed", str(2**32),
                        "--state-dir", str(tmp_path / "state"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    for err in (train, capsys.readouterr().err):
        assert err.startswith("error: ") and err.endswith("seed must be a whole number <= 4294967295, got 4294967296\n")
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- predict -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from pipeline.export import export_model
    from pipeline.model import build_model

    return export_model(build_model("efficientnet_lite0", 3, 32, seed=0), tmp_path_factory.mktemp("p") / "export",
                        ["blue", "green", "red"])


def predict(export: Path, images: Path, *more: str) -> int:
    from pipeline.cli import main

    with no_hang():
        return main(["predict", "--model", str(export), "--images", str(images), *more])


def test_predict_names_what_it_skips_as_training_does(export, tmp_path, monkeypatch, capsys):
    folder = make_class_folder(tmp_path / "photos", per_class=1, classes=("blue",)) / "blue"
    reasons = odd_entries(folder, tmp_path / "elsewhere", monkeypatch)
    Image.fromarray(quadrants()).save(folder / "a.webp", lossless=True)
    Image.fromarray(quadrants()).save(folder / "a.tif")
    assert predict(export, folder, "--top-k", "2") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in out[:3]] == [str(folder / n) for n in ("a.tif", "a.webp", "blue_000.jpg")]
    assert out[3] == f"{len(reasons)} file(s) skipped (images read: {SUPPORTED}):"
    assert len(out) == 4 + 10 + 1 and set(out[4:14]) < expected_lines(folder, reasons)  # ten named, as in training
    assert out[14] == f"  ... and {len(reasons) - 10} more skipped files (all counted in skipped_files)"


@pytest.mark.parametrize("make,message", [
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "{path}: unsupported format (.txt)"),
    (lambda p: os.mkfifo(p / "pipe.jpg") or p / "pipe.jpg", "{path}: a FIFO (named pipe), not a regular file"),
    (lambda p: (p / "junk.jpg").write_bytes(b"JUNK") and p / "junk.jpg", "{path}: not a readable image"),
    (lambda p: (p / "cut.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40) and p / "cut.jpg",
     "{path}: not a readable image (it did not decode: "),
    (lambda p: p / "missing.jpg", "{path} does not exist; give an image file or a folder of images"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "folder {path} holds no images; images read: " + SUPPORTED),
    (lambda p: (p / "bad").mkdir() or (p / "bad" / "a.heic").write_bytes(b"x") and p / "bad",
     "folder {path} holds no images it can read (the skipped files are named above); images read: " + SUPPORTED),
], ids=["text-file", "fifo", "junk", "undecodable", "missing", "empty-folder", "nothing-readable"])
def test_predict_on_nothing_it_can_read_is_an_error(export, tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert predict(export, path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(path=path)) and err.count("\n") == 1, err
    if message.startswith("{path}:") and "decode" not in message:
        assert err == f"error: {message.format(path=path)}; images read: {SUPPORTED}\n"


def test_predict_top_k_is_refused_below_one_and_clipped_to_the_classes(export, tmp_path, capsys):
    photo = tmp_path / "a.png"
    Image.fromarray(quadrants()).save(photo)
    for k in ("0", "-2"):
        assert predict(export, photo, "--top-k", k) == 2
        assert capsys.readouterr().err == f"error: --top-k must be a whole number >= 1, got {k}\n"
    assert predict(export, photo, "--top-k", "10") == 0
    out, err = capsys.readouterr()
    assert err == "note: --top-k 10 is more than the model's 3 classes; showing all 3\n"
    assert out.startswith(f"{photo}: ") and len(out.split(": ", 1)[1].split(", ")) == 3


# --- a sweep -----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # one real trial: about 25 s of CPU
def test_a_sweep_names_the_same_skipped_entries_before_its_first_trial_and_runs(tmp_path, tracking_store, monkeypatch,
                                                                             capsys):
    """A FIFO froze a sweep for minutes and a dangling link crashed it: both are named and the trial runs."""
    import mlflow
    import yaml

    from sweeps.cli import main as sweeps_main

    data = make_class_folder(tmp_path / "data", per_class=8, classes=("blue", "red"))
    os.mkfifo(data / "blue" / "pipe.jpg")
    (data / "red" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    Image.new("RGB", (8, 8)).save(data / "red" / "IMG_1.heic", "AVIF")
    space = {"backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "fine_tune": {"fixed": False},
             "epochs": {"fixed": 1}, "batch_size": {"fixed": 8}, "learning_rate": {"fixed": 0.01}}
    sweep = tmp_path / "one.yaml"
    sweep.write_text(yaml.safe_dump({"tuner": "grid", "max_trials": 1, "trial_process": "same", "space": space}))
    monkeypatch.chdir(tmp_path)
    with no_hang(600):
        code = sweeps_main(["sweep", "--dataset", str(data), "--sweep", str(sweep), "--state-dir", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "\n".join(skipped_lines(load_data(str(data), 32, seed=42).skipped_files)) + "\n" in out
    assert f"  skipped (a FIFO (named pipe), not a regular file): {data / 'blue' / 'pipe.jpg'}\n" in out
    assert f"  skipped (a symlink to {tmp_path / 'missing.jpg'}, which does not exist): {data / 'red' / 'gone.jpg'}\n" in out
    assert f"  skipped (unsupported format (.heic)): {data / 'red' / 'IMG_1.heic'}\n" in out
    exp = mlflow.get_experiment_by_name("data").experiment_id
    (trial,) = [r for r in mlflow.tracking.MlflowClient().search_runs([exp]) if r.data.tags["tlsweep.kind"] == "trial"]
    assert trial.info.status == "FINISHED" and values(trial)["skipped_files"] == "3"
