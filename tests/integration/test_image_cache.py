"""Decoded images are cached on disk once per (folder, split, image size) and memory-mapped by later loads."""

import os

import numpy as np

from pipeline import image_cache
from pipeline.data import load_data
from support import make_class_folder


def _arrays(data):
    return {k: [(x.tolist(), int(y)) for x, y in ds.as_numpy_iterator()] for k, ds in data.splits.items()}


def test_a_second_load_maps_the_decoded_pixels_and_reports_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))
    folder = make_class_folder(tmp_path / "photos", per_class=8, classes=("blue", "red"))
    good = (folder / "blue" / "blue_000.jpg").read_bytes()
    (folder / "blue" / "truncated.jpg").write_bytes(good[:40])  # passes the header check, fails to decode
    (folder / "red" / "notes.txt").write_text("not an image")
    first = load_data(str(folder), 16, seed=3)
    entries = list((tmp_path / "cache" / "images").glob("[!.]*"))  # beside the .tlsweep marker (pipeline.safepath)
    assert len(entries) == 1 and (entries[0] / "train_x.npy").exists()
    assert (tmp_path / "cache" / "images" / ".tlsweep").read_text().startswith("cache\n")
    again = load_data(str(folder), 16, seed=3)
    assert isinstance(image_cache.load(entries[0].name)[0]["train"][0], np.memmap)
    assert _arrays(again) == _arrays(first)
    assert again.fingerprint == first.fingerprint and again.sizes == first.sizes
    assert sorted(again.skipped_files) == sorted(first.skipped_files) and again.skipped == 2
    assert {k: int(ds.cardinality()) for k, ds in again.splits.items()} == again.sizes


def test_any_change_to_the_folder_or_the_size_decodes_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))
    folder = make_class_folder(tmp_path / "photos", per_class=8, classes=("blue", "red"))
    load_data(str(folder), 16, seed=3)
    load_data(str(folder), 24, seed=3)  # another size
    load_data(str(folder), 16, seed=4)  # another split
    photo = folder / "red" / "red_001.png"
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))  # a file changed
    load_data(str(folder), 16, seed=3)
    assert len(list((tmp_path / "cache" / "images").glob("[!.]*"))) == 4
    load_data(str(folder), 16, seed=3, cache=False)  # no cache asked: nothing written
    assert len(list((tmp_path / "cache" / "images").glob("[!.]*"))) == 4


def test_a_process_getting_ready_only_maps_images_decoded_before_and_never_decodes_them(tmp_path, monkeypatch):
    """The warm spare loads with ``decode=False``: it must not decode beside the trial that is decoding."""
    import pytest

    from pipeline.data import NotDecoded

    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "cache"))
    folder = make_class_folder(tmp_path / "photos", per_class=6, classes=("blue", "red"))
    with pytest.raises(NotDecoded):
        load_data(str(folder), 16, seed=3, decode=False)
    assert not (tmp_path / "cache" / "images").exists() or not list((tmp_path / "cache" / "images").glob("[!.]*"))
    first = load_data(str(folder), 16, seed=3)
    mapped = load_data(str(folder), 16, seed=3, decode=False)
    assert _arrays(mapped) == _arrays(first) and mapped.fingerprint == first.fingerprint
    with pytest.raises(NotDecoded):
        load_data(str(folder), 24, seed=3, decode=False)  # another size: not decoded yet
    with pytest.raises(NotDecoded):
        load_data("tf_flowers", 16, decode=False)  # tfds: each process reads its own
