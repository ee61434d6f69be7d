from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from support import make_class_folder, write_image
from pipeline.data import check_dataset, check_memory, load_data, skipped_lines, unreadable_files
from pipeline.errors import UserError
from pipeline.image_cache import MappedSplits


def _labels(data, split):
    return sorted(int(y) for _, y in data.splits[split].as_numpy_iterator())


def test_class_folder_split_is_stratified_and_seeded(class_folder):
    data = load_data(str(class_folder), 24, seed=3)
    assert data.class_names == ["blue", "green", "red"]
    assert data.sizes == {"train": 27, "validation": 6, "test": 3}
    assert data.split_spec == "75/15/10 (seed 3)"
    assert _labels(data, "validation") == [0, 0, 1, 1, 2, 2]
    again = load_data(str(class_folder), 24, seed=3)
    other = load_data(str(class_folder), 24, seed=4)
    assert again.fingerprint == data.fingerprint and other.fingerprint != data.fingerprint


def test_images_of_every_kind_come_out_rgb_uint8_at_image_size(class_folder):
    data = load_data(str(class_folder), 20)
    images = np.stack([x for x, _ in data.splits["train"].as_numpy_iterator()])
    assert images.shape == (27, 20, 20, 3) and images.dtype == np.uint8
    batch_x, batch_y = next(iter(data.batches("train", 8, shuffle=True, seed=1)))
    assert batch_x.dtype.name == "float32" and batch_x.shape == (8, 20, 20, 3) and batch_y.dtype.name == "int32"
    assert 0 <= float(np.min(batch_x)) and float(np.max(batch_x)) <= 255


def test_grayscale_images_become_rgb(tmp_path):
    make_class_folder(tmp_path, per_class=8, classes=("blue", "red"))
    write_image(tmp_path / "red" / "gray.png", (200, 200, 200), mode="L")
    data = load_data(str(tmp_path), 16, split="50/25/25")
    images = [x for x, _ in data.splits["train"].as_numpy_iterator()]
    assert all(x.shape == (16, 16, 3) for x in images)


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    make_class_folder(tmp_path, per_class=8, classes=("blue", "red"))
    (tmp_path / "blue" / "empty.jpg").write_bytes(b"")
    (tmp_path / "blue" / "notes.txt").write_text("not an image")
    (tmp_path / "red" / "corrupt.jpg").write_bytes(b"JUNK" * 100)
    (tmp_path / "LICENSE.txt").write_text("top-level files are not images of a class")
    data = load_data(str(tmp_path), 16)
    assert data.skipped == 3
    assert sorted(Path(p).name for p in data.skipped_files) == ["corrupt.jpg", "empty.jpg", "notes.txt"]
    assert sum(data.sizes.values()) == 16
    assert data.lineage()["skipped_files"] == 3


def test_truncated_jpeg_is_dropped_not_fatal(tmp_path):
    make_class_folder(tmp_path, per_class=8, classes=("blue", "red"))
    good = (tmp_path / "blue" / "blue_000.jpg").read_bytes()
    (tmp_path / "blue" / "truncated.jpg").write_bytes(good[:40])
    data = load_data(str(tmp_path), 16)
    # the truncated file passes the header check, fails to decode, and is counted as skipped
    assert [Path(p).name for p in data.skipped_files] == ["truncated.jpg"]
    assert sum(data.sizes.values()) == 16
    assert {k: len(list(ds)) for k, ds in data.splits.items()} == data.sizes
    assert all(int(ds.cardinality()) == data.sizes[k] for k, ds in data.splits.items())
    lazy = load_data(str(tmp_path), 16, cache=False)  # too big to cache: dropped while training
    assert sum(len(list(ds)) for ds in lazy.splits.values()) == 16


def test_train_validation_folders_carve_a_test_split(split_folder):
    data = load_data(str(split_folder), 16, seed=1)
    assert data.class_names == ["blue", "red"]
    assert data.sizes == {"train": 16, "validation": 4, "test": 4}
    assert data.split_spec == "train/,validation/[:50%],validation/[50%:] (seed 1)"
    assert _labels(data, "test") == [0, 0, 1, 1]


def test_train_validation_test_folders_are_used_as_given(tmp_path):
    for split, n in (("train", 4), ("validation", 2), ("test", 3)):
        make_class_folder(tmp_path / split, per_class=n, classes=("blue", "red"))
    data = load_data(str(tmp_path), 16)
    assert data.sizes == {"train": 8, "validation": 4, "test": 6}


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: None, r"has no class subfolders; expected"),
        (lambda p: make_class_folder(p, 3, ("blue",)), r"has a single class \('blue'\); classification needs at least two"),
        (lambda p: [(p / "a").mkdir(), (p / "b").mkdir()], r"holds no images"),
        (lambda p: [make_class_folder(p, 8, ("blue", "red")), (p / "green").mkdir(), (p / "green" / "x.txt").touch()],
         r"class folder .*green holds no images \(1 file\(s\) skipped there, e.g. x.txt: unsupported format \(.txt\)\); "
         r"images read: .jpg, .jpeg, .jfif, .png, .gif, .bmp, .webp, .tif, .tiff; add images to it or remove it"),
        (lambda p: make_class_folder(p, 3, ("blue", "red")),
         r"the test split of .* is empty \(split 75/15/10 \(seed 42\)\); add images \(10 or more per class\) or "
         r"give another --split whose test share is above 0, e.g. 75/15/10"),
    ],
    ids=["empty", "single-class", "no-images", "empty-class", "empty-test-split"],
)
def test_bad_folders_are_clear_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        load_data(str(tmp_path), 16)


def test_missing_folder_and_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match=r"data folder '.*missing' does not exist"):
        load_data(str(tmp_path / "missing"), 16)
    with pytest.raises(UserError, match=r"unknown data set 'tf_flower': .*did you mean tf_flowers"):
        load_data("tf_flower", 16)


@pytest.mark.parametrize("split,reason", [
    ("80/20", "it has 2 part(s)"),
    ("50/30/30", "they add up to 110"),
    ("60/20/10", "they add up to 90"),
    ("nan/20/10", "the train share nan is not a finite number"),
    ("-10/60/50", "the train share is -10"),
    ("0/50/50", "the train share is 0"),
    ("75/25/0", "the test share is 0"),
    ("75//10", "a part is empty"),
    ("75/15/ten", "'ten' is not a number"),
])
def test_bad_split_specs_are_one_line_before_anything_runs(class_folder, split, reason):
    message = (f"split '{split}' for a folder must be three train/validation/test percentages above zero that add up "
               f"to 100, such as 75/15/10; {reason}")
    for check in (lambda: check_dataset(str(class_folder), split), lambda: load_data(str(class_folder), 16, split=split)):
        with pytest.raises(UserError) as e:
            check()
        assert str(e.value) == message
    check_dataset(str(class_folder), "70/20/10")
    check_dataset(str(class_folder), "33.4/33.3/33.3")


def test_tfds_default_split_for_tf_flowers():
    with tfds.testing.mock_data(num_examples=40):
        data = load_data("tf_flowers", 24)
    assert data.source == "tfds"
    assert data.split_spec == "train[:75%],train[75%:90%],train[90%:]"
    assert data.class_names == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    # mock_data serves num_examples per split whatever the slice; sizes must be what is served.
    assert data.sizes == {k: len(list(ds)) for k, ds in data.splits.items()}
    x, y = next(data.splits["train"].as_numpy_iterator())
    assert x.shape == (24, 24, 3) and x.dtype == np.uint8 and 0 <= y < 5


def test_tfds_split_option_and_cats_vs_dogs_default():
    with tfds.testing.mock_data(num_examples=20):
        data = load_data("cats_vs_dogs", 16)
        custom = load_data("tf_flowers", 16, split="train[:50%],train[50%:75%],train[75%:]")
    assert data.split_spec == "train[:40%],train[40%:50%],train[50%:60%]"
    assert data.class_names == ["cat", "dog"]
    assert custom.split_spec == "train[:50%],train[50%:75%],train[75%:]"
    with pytest.raises(UserError, match=r"must name three tfds splits"):
        with tfds.testing.mock_data(num_examples=20):
            load_data("tf_flowers", 16, split="train[:50%],train[50%:]")


def test_train_and_test_folders_carve_validation_from_train(tmp_path):
    # The layout of many public data sets: train/ and test/, no validation/.
    for split, n in (("train", 20), ("test", 3)):
        make_class_folder(tmp_path / split, per_class=n, classes=("blue", "red"))
    data = load_data(str(tmp_path), 16, seed=5)
    assert data.class_names == ["blue", "red"]
    assert data.sizes == {"train": 34, "validation": 6, "test": 6}
    assert data.split_spec == "train/ split 85/15 into train/validation (stratified, seed 5),test/"
    assert _labels(data, "validation") == [0, 0, 0, 1, 1, 1] and _labels(data, "test") == [0, 0, 0, 1, 1, 1]
    assert load_data(str(tmp_path), 16, seed=6).fingerprint != data.fingerprint
    with pytest.raises(UserError, match=r"already has train/ and test/ subfolders .*--split '60/20/20' does not apply"):
        load_data(str(tmp_path), 16, split="60/20/20")


def test_a_folder_of_data_sets_is_refused_naming_them(tmp_path):
    make_class_folder(tmp_path / "flowers", per_class=4, classes=("blue", "red"))
    make_class_folder(tmp_path / "pets", per_class=4, classes=("green", "red"))
    with pytest.raises(UserError, match=r"folder .* looks like a folder of data sets, not of classes: flowers, pets hold "
                                        r"no images of their own, only subfolders \(flowers/blue, red\); pass one "
                                        r"data set, e.g. .*flowers$"):
        load_data(str(tmp_path), 16)


def test_images_in_subfolders_of_a_class_belong_to_that_class(tmp_path):
    make_class_folder(tmp_path, per_class=10, classes=("blue", "red"))
    make_class_folder(tmp_path / "red" / "more", per_class=10, classes=("red",))
    data = load_data(str(tmp_path), 16)
    assert sum(data.sizes.values()) == 30
    assert sum(1 for s in data.splits.values() for _, y in s.as_numpy_iterator() if y == 1) == 20


def test_unreadable_files_are_found_before_any_trial_and_named(tmp_path):
    make_class_folder(tmp_path, per_class=8, classes=("blue", "red"))
    good = (tmp_path / "blue" / "blue_000.jpg").read_bytes()
    (tmp_path / "blue" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "red" / "notes.txt").write_text("not an image")
    found = unreadable_files(str(tmp_path))
    assert [Path(p).name for p in found] == ["truncated.jpg", "notes.txt"]
    assert sorted(found) == sorted(load_data(str(tmp_path), 16).skipped_files)  # the files the loader drops
    assert skipped_lines(found) == [
        "2 file(s) skipped (images read: .jpg, .jpeg, .jfif, .png, .gif, .bmp, .webp, .tif, .tiff):",
        f"  skipped (not a readable image): {found[0]}", f"  skipped (unsupported format (.txt)): {found[1]}"]
    assert skipped_lines([]) == []
    many = [f"f{i}.jpg" for i in range(12)]
    assert skipped_lines(many, limit=10)[-1] == "  ... and 2 more skipped files (all counted in skipped_files)"
    assert unreadable_files("tf_flowers") == []


def test_an_image_size_whose_decoded_cache_exceeds_memory_is_refused_before_decoding(class_folder):
    import psutil

    available = psutil.virtual_memory().available
    size = int((2 * available / (3 * 36)) ** 0.5)  # twice the memory available: refused whatever runs meanwhile
    with pytest.raises(UserError, match=rf"36 images decoded at {size} px need about .* GiB in memory \(36 x {size} x "
                                        rf"{size} x 3 bytes\), but .* GiB is available; use an image size of \d+ px"):
        load_data(str(class_folder), size)
    with pytest.raises(UserError, match=r"100 images decoded at 5000 px need about 7.0 GiB .* but 1.0 GiB is available; "
                                        r"use an image size of 1336 px or less"):
        check_memory(100, 5000, available=2**30)
    check_memory(100, 224, available=2**30)


def test_an_empty_tfds_split_is_refused():
    # mock_data serves the same number of examples to every split: 0 empties them all, train first.
    with pytest.raises(UserError, match=r"the train split of tf_flowers is empty \(split train\[:75%\],.*\); it needs "
                                        r"more images per class"):
        with tfds.testing.mock_data(num_examples=0):
            load_data("tf_flowers", 16)


def test_training_pipelines_run_without_autotuning_and_prefetch_a_fixed_number_of_batches(class_folder):
    """An ending iterator with tf.data's autotuning on waited for its optimizer thread, up to 4 s per `fit`
    (benchmarks/results/2026-11-25-bench-fixed-cost-steps-timed.md): the pipelines that training and evaluation read have it off."""
    from pipeline.features import feature_batches

    data = load_data(str(class_folder), 32, seed=0)
    x, y = np.zeros((5, 3), np.float32), np.arange(5, dtype=np.int32)
    for ds in (data.batches("train", 4, shuffle=True, seed=1), data.batches("validation", 4),
               feature_batches((x, y), 2, shuffle=True), feature_batches((x, y), 2)):
        assert ds.options().autotune.enabled is False
    assert [len(b) for b, _ in feature_batches((x, y), 2)] == [2, 2, 1]


def test_first_examples_are_the_first_rows_of_the_unshuffled_batches(class_folder):
    """A trial's prediction grid takes the first test images this way (sliced from the image cache, no pipeline)."""
    import dataclasses

    load_data(str(class_folder), 32, seed=0)  # decoded into the image cache if not there yet
    data = load_data(str(class_folder), 32, seed=0)
    assert isinstance(data.splits, MappedSplits)
    images, labels = next(iter(data.batches("test", 3)))
    for source in (data, dataclasses.replace(data, splits={k: data.splits[k] for k in data.splits})):  # mapped, tf.data
        x, y = source.first("test", 3)
        assert x.dtype == np.uint8 and x.shape == (3, 32, 32, 3)
        np.testing.assert_array_equal(x, images.numpy())
        np.testing.assert_array_equal(y, labels.numpy())
