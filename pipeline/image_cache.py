"""Decoded images on disk: each (folder data set, split, image size) is decoded and resized once, for every process.

A sweep runs fine-tuning trials in fresh processes; each used to decode and resize every photo again
(flower_photos at 224 px: about 17 s of a 2-core machine). The first load writes the decoded uint8
pixels of each split as ``.npy`` under ``$TLSWEEP_CACHE/images/<key>/`` (default ``~/.cache/tlsweep``);
later loads memory-map them. The key covers every input to the pixels: each listed file's path, size and
modification time, its split and class, the class names, the split spec, the image size and how files are
decoded (``pipeline.data.DECODING``: EXIF orientation applied since it was added), so any change to the
folder, or to the decoding, decodes again. Files that failed to decode and the data fingerprint are stored
with the pixels, so skipped-file reporting and lineage are the same either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from pipeline import safepath

IMAGES_DIR = "images"
FORMAT = 1


def cache_root() -> Path:
    """``$TLSWEEP_CACHE/images``."""
    return safepath.cache_dir() / IMAGES_DIR


def key_for(files: dict[str, list[tuple[Path, int]]], class_names: list[str], spec: str, image_size: int,
            decoding: str) -> str:
    """Changes whenever any file listed, the split, the classes, the image size or the decoding change."""
    h = hashlib.sha256(json.dumps([FORMAT, class_names, spec, image_size, decoding]).encode())
    for split, items in files.items():
        for path, label in items:
            stat = path.stat()
            h.update(f"\n{split}:{path}:{label}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load(key: str, root: Path | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, list[str]]], dict] | None:
    """Per split ``(pixels memory-mapped uint8 [N, S, S, 3], labels, kept paths)`` and the stored metadata
    (``skipped``), or None when not cached."""
    path = (root or cache_root()) / key
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    splits = {name: (np.load(path / f"{name}_x.npy", mmap_mode="r"), np.load(path / f"{name}_y.npy"),
                     list(paths)) for name, paths in meta["paths"].items()}
    return splits, meta


def save(key: str, splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], skipped: list[str],
         root: Path | None = None) -> None:
    """Write the decoded splits atomically (a concurrent reader sees all of it or nothing)."""
    path = (root or cache_root()) / key
    safepath.make_dir(path.parent, safepath.CACHE)  # marked: `make clean-cache` removes only tlsweep's caches
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, (x, y, _) in splits.items():
        np.save(tmp / f"{name}_x.npy", x)
        np.save(tmp / f"{name}_y.npy", y)
    meta = {"paths": {name: paths for name, (_, _, paths) in splits.items()}, "skipped": skipped}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, path)
    except OSError:  # another process wrote the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


class MappedSplits(Mapping):
    """Split name -> ``tf.data`` pipeline over the memory-mapped pixels, made when first asked for: making one
    copies the split into TensorFlow (all of flower_photos at 224 px: 550 MB, seconds), which a trial that
    trains on cached features or activations at the cut never needs."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self._arrays = arrays
        self._made: dict = {}

    def __getitem__(self, name: str):  # noqa: ANN204 - a tf.data.Dataset (TensorFlow imported late)
        if name not in self._made:
            import tensorflow as tf

            self._made[name] = tf.data.Dataset.from_tensor_slices(self._arrays[name])
        return self._made[name]

    def first(self, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` images and labels of a split, sliced from the mapping (no pipeline, no copy of the rest)."""
        x, y = self._arrays[name]
        return np.array(x[:n]), np.array(y[:n])

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)
