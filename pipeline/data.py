"""Load an image-classification data set into train/validation/test ``tf.data`` pipelines.

Sources: a tensorflow-datasets name (split slicing such as ``train[:75%]``), a folder of class
subfolders (``class/*.jpg``; split made from the seed), a folder with ``train/``, ``validation/``
(or ``val/``, ``valid/``; any case) and optionally ``test/`` subfolders each holding class subfolders, or one
with ``train/`` and ``test/`` only (validation carved from train by the seed); see
``pipeline.datafolder.split_folders``. Images come out as raw 0..255 RGB pixels at ``image_size``, turned as
their EXIF Orientation says (as a phone or a browser displays them); class names come from the data. Images
in subfolders of a class folder belong to that class; a class folder with no images of its own, only
subfolders of images, is refused (it is a folder of data sets, not of classes).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import image_cache
from pipeline.datafolder import (IMAGE_EXTENSIONS, SKIPPED_SHOWN, SUPPORTED, DataWarning, check_seed,  # noqa: F401
                                 check_split, copies_line, copies_of_train, orientation, skip_reason, skipped_lines,
                                 split_folders, subfolders, walk)
from pipeline.errors import DataError, UserError
from pipeline.tfstart import quiet_decoders

DEFAULT_FOLDER_SPLIT = "75/15/10"
# A train/ + test/ folder (no validation/): this share of each class of train/ becomes validation.
CARVED_VALIDATION = 0.15
# How files become pixels; in the data fingerprint, so features cached from pixels decoded otherwise are not reused.
DECODING = "exif-orientation"
# Default train/validation/test splits per tfds data set (as in the seeds).
DEFAULT_TFDS_SPLITS = {
    "tf_flowers": "train[:75%],train[75%:90%],train[90%:]",
    "cats_vs_dogs": "train[:40%],train[40%:50%],train[50%:60%]",
}
SPLITS = ("train", "validation", "test")

AUTOTUNE = tf.data.AUTOTUNE
PREFETCH = 2  # batches a training or evaluation pipeline keeps ready ahead of the step


def steady(ds: tf.data.Dataset) -> tf.data.Dataset:
    """A batched training or evaluation pipeline, prefetched ``PREFETCH`` batches ahead, with tf.data's autotuning
    off: its optimizer thread gains nothing when a batch is rows copied from memory, and the iterator of a pipeline
    that ends waits for that thread: up to 4.1 s at the end of a `fit` on flowers' activations at the cut, in 3 of 4
    fits measured, with the steps no faster (benchmarks/results/2026-11-25-bench-fixed-cost-steps-timed.md). Maps upstream that ask for
    ``AUTOTUNE`` parallelism (a tfds data set's resizing, done as it trains) then use every core; the one-time
    decoding of a folder into the image cache keeps autotuning."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH).with_options(options)


@dataclasses.dataclass
class DataSplits:
    """Three unbatched pipelines of ``(uint8 image [S, S, 3], int32 label)`` plus their lineage."""

    name: str
    source: str  # "tfds" or "folder"
    class_names: list[str]
    image_size: int
    split_spec: str
    sizes: dict[str, int]
    fingerprint: str
    skipped_files: list[str]
    splits: dict[str, tf.data.Dataset]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
        """Batched ``(float32 pixels 0..255, label)``, shuffled each epoch if asked, prefetched."""
        ds = self.splits[split]
        if shuffle:
            ds = ds.shuffle(max(self.sizes[split], 1), seed=seed, reshuffle_each_iteration=True)
        return steady(ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE))

    def first(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` images (uint8) and labels of a split, in the unshuffled order of ``batches``: sliced from the
        image cache when the split is mapped from it (a pipeline would first copy the whole split into TensorFlow)."""
        if isinstance(self.splits, image_cache.MappedSplits):
            return self.splits.first(split, n)
        x, y = next(iter(self.splits[split].batch(n)))
        return x.numpy(), y.numpy()

    def with_validation_in_train(self) -> DataSplits:
        """The same data with the validation images added to the training split: for a refit once the validation
        split has chosen (nothing is left to choose with it). Its fingerprint differs, so no cache of the split as it
        was stands in for it; the validation split stays, for Keras's per-epoch report on images it now trains on."""
        splits = {name: self.splits[name] for name in self.splits}
        splits["train"] = splits["train"].concatenate(splits["validation"])
        return dataclasses.replace(self, splits=splits, sizes={**self.sizes, "train": self.sizes["train"] +
                                                               self.sizes["validation"]},
                                   fingerprint=f"{self.fingerprint}+validation")

    def lineage(self) -> dict[str, object]:
        """What a tracker records about where the data came from."""
        return {
            "data_name": self.name,
            "data_source": self.source,
            "split_spec": self.split_spec,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            **{f"{k}_size": v for k, v in self.sizes.items()},
            "skipped_files": self.skipped,
            "data_fingerprint": self.fingerprint,
        }


def load_data(
    dataset: str,
    image_size: int,
    seed: int = 42,
    split: str | None = None,
    data_dir: str | None = None,
    cache: bool = True,
    decode: bool = True,
) -> DataSplits:
    """Load ``dataset`` (tfds name or folder) resized to ``image_size`` square RGB images. With ``decode=False``
    only a folder whose images are already in the image cache is loaded (mapped); else ``NotDecoded`` is raised:
    a process getting ready ahead of its trial must not decode beside the trial that is decoding them."""
    if not isinstance(image_size, int) or image_size < 8:
        raise UserError(f"image size must be an integer of at least 8 px, got {image_size!r}")
    check_seed(seed)
    folder = _folder(dataset)
    if folder is not None:
        return _load_folder(folder, image_size, seed, split, cache, decode)
    if not decode:
        raise NotDecoded(f"{dataset} is a tfds data set, read and decoded by each process")
    data = _load_tfds(dataset, image_size, split, data_dir)
    if cache:
        check_memory(sum(data.sizes.values()), image_size)
        data.splits = {k: ds.cache() for k, ds in data.splits.items()}
    return data


def check_dataset(dataset: str, split: str | None = None, seed: int | None = None) -> None:
    """Fail at once, before any work, on a data set that cannot be found (missing folder, unknown tfds name), a
    folder whose layout is ambiguous (``split_folders``), a ``split`` it cannot take, or a seed out of range."""
    if seed is not None:
        check_seed(seed)
    folder = _folder(dataset)
    if folder is None:
        _check_tfds_name(dataset)
        if split is not None:
            _tfds_parts(dataset, split)
        return
    layout = split_folders(folder)
    if layout is not None:
        if split is not None:
            _refuse_split(folder, layout, split)
        class_names = _class_names(layout["train"])
        for role in ("validation", "test"):
            if role in layout:
                _same_classes(layout[role], class_names)
    elif split is not None:
        check_split(split)


def _folder(dataset: str) -> Path | None:
    """The data set's folder, or None for a tensorflow-datasets name."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(
            f"data set {dataset!r} is a file, not a folder; give a folder of class subfolders "
            "(class/*.jpg) or a tensorflow-datasets name such as tf_flowers"
        )
    if os.sep in dataset or dataset.startswith("."):
        raise DataError(f"data folder {dataset!r} does not exist; check the path (relative to {os.getcwd()})")
    return None


# --- tensorflow-datasets -------------------------------------------------------------------------


def _check_tfds_name(name: str) -> None:
    import tensorflow_datasets as tfds

    known = tfds.list_builders()
    if name.split(":")[0] not in known:
        close = difflib.get_close_matches(name, known, n=5)
        raise DataError(
            f"unknown data set {name!r}: it is not a folder and not a tensorflow-datasets name"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " Give a folder of class subfolders, or a tfds name such as tf_flowers or cats_vs_dogs."
        )


def _load_tfds(name: str, image_size: int, split: str | None, data_dir: str | None) -> DataSplits:
    import tensorflow_datasets as tfds

    _check_tfds_name(name)
    builder = tfds.builder(name, data_dir=data_dir)
    spec = split or DEFAULT_TFDS_SPLITS.get(name) or _default_tfds_split(builder.info)
    parts = _tfds_parts(name, spec)
    if not builder.info.supervised_keys:
        raise DataError(f"tfds data set {name!r} has no (image, label) supervised keys; it is not image classification")
    try:
        datasets, info = tfds.load(name, split=parts, as_supervised=True, with_info=True, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - downloads fail offline; say so plainly
        raise DataError(
            f"could not load tfds data set {name!r} with split {spec!r}: {e}. Without internet, download it "
            "elsewhere into TFDS_DATA_DIR, or point DATASET at a local folder"
        ) from e
    label = info.features[info.supervised_keys[1]]
    class_names = list(getattr(label, "names", None) or [str(i) for i in range(label.num_classes)])
    sizes = {k: _tfds_size(ds, info, p) for k, ds, p in zip(SPLITS, datasets, parts)}
    _check_sizes(name, sizes, spec, example="'train[:75%],train[75%:90%],train[90%:]'")
    resize = _resizer(image_size)
    splits = {
        k: ds.map(lambda x, y: (resize(x), tf.cast(y, tf.int32)), num_parallel_calls=AUTOTUNE)
        for k, ds in zip(SPLITS, datasets)
    }
    fingerprint = _hash([name, str(info.version), spec, str(image_size)])
    return DataSplits(name, "tfds", class_names, image_size, spec, sizes, fingerprint, [], splits)


def _tfds_parts(name: str, spec: str) -> list[str]:
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 3 or not all(parts):
        raise DataError(
            f"split {spec!r} for {name} must name three tfds splits, train,validation,test, "
            "e.g. 'train[:75%],train[75%:90%],train[90%:]'"
        )
    return parts


def _tfds_size(ds: tf.data.Dataset, info, split: str) -> int:
    count = int(ds.cardinality())
    return count if count >= 0 else int(info.splits[split].num_examples)


def _default_tfds_split(info) -> str:
    have = set(info.splits.keys())
    if {"train", "validation", "test"} <= have:
        return "train,validation,test"
    if {"train", "test"} <= have:
        return "train[:90%],train[90%:],test"
    return "train[:80%],train[80%:90%],train[90%:]"


# --- folders -------------------------------------------------------------------------------------


class NotDecoded(Exception):
    """``load_data(..., decode=False)`` of images that are not in the image cache yet (not a user error)."""


def _load_folder(root: Path, image_size: int, seed: int, split: str | None, cache: bool,
                 decode_all: bool = True) -> DataSplits:
    layout = split_folders(root)
    skipped: list[str] = []
    if layout is not None:
        if split:
            _refuse_split(root, layout, split)
        train_dir = layout["train"]
        class_names = _class_names(train_dir)
        files = {"train": _scan(train_dir, class_names, skipped, each_class=True)}
        if "validation" in layout:
            val_dir = layout["validation"]
            val = _scan(val_dir, class_names, skipped)
            if "test" in layout:
                files["validation"], files["test"] = val, _scan(layout["test"], class_names, skipped)
                spec = f"{train_dir.name}/,{val_dir.name}/,{layout['test'].name}/"
            else:
                files["validation"], files["test"] = _split(val, (1, 1), seed)
                spec = f"{train_dir.name}/,{val_dir.name}/[:50%],{val_dir.name}/[50%:] (seed {seed})"
        else:
            share = round(CARVED_VALIDATION * 100)
            files = dict(zip(("train", "validation"), _split(files["train"], (100 - share, share), seed)))
            files["test"] = _scan(layout["test"], class_names, skipped)
            spec = (f"{train_dir.name}/ split {100 - share}/{share} into train/validation (stratified, seed {seed}),"
                    f"{layout['test'].name}/")
    else:
        class_names = _class_names(root)
        spec = split or DEFAULT_FOLDER_SPLIT
        parts = _split(_scan(root, class_names, skipped, each_class=True), check_split(spec), seed)
        files = dict(zip(SPLITS, parts))
        spec = f"{spec} (seed {seed})"
    _check_sizes(str(root), {k: len(v) for k, v in files.items()}, spec)
    if cache:
        check_memory(sum(len(v) for v in files.values()), image_size)
    _warn_unmeasured(files, class_names)
    resize = _resizer(image_size)

    def decode(path, turn, label):
        return path, resize(_decode(tf.io.read_file(path), turn)), label

    key = image_cache.key_for(files, class_names, spec, image_size, DECODING) if cache else None
    stored = image_cache.load(key) if key else None
    if stored is not None:  # decoded once before, by any process: memory-mapped, not decoded again
        arrays, meta = stored
        skipped.extend(meta["skipped"])
        kept = {name: set(paths) for name, (_, _, paths) in arrays.items()}
        files = {name: [it for it in files[name] if str(it[0]) in kept[name]] for name in files}
        splits = image_cache.MappedSplits({name: (x, y) for name, (x, y, _) in arrays.items()})
    elif not decode_all:
        raise NotDecoded(f"the images of {root} at {image_size} px are not in the image cache yet")
    else:
        dropped: list[str] = []
        splits = _decode_folder(files, decode, dropped, cache)
        skipped.extend(dropped)
        if cache:  # every image of a split may have failed to decode
            _check_sizes(str(root), {k: len(v) for k, v in files.items()}, spec)
        if key:
            image_cache.save(key, _materialize(splits, files, image_size), dropped)
    if line := copies_line(copies_of_train(files), root):
        warnings.warn(line, DataWarning, stacklevel=3)
    listing = [f"{s}:{p.relative_to(root)}:{p.stat().st_size}" for s, items in files.items() for p, _ in items]
    fingerprint = _hash([*sorted(listing), *class_names, spec, str(image_size), DECODING])
    sizes = {k: len(v) for k, v in files.items()}
    return DataSplits(str(root), "folder", class_names, image_size, spec, sizes, fingerprint, skipped, splits)


def _decode_folder(files: dict[str, list], decode, dropped: list[str], cache: bool) -> dict[str, tf.data.Dataset]:
    """Decode every split's files (in parallel); with ``cache`` at once, naming the files that failed in
    ``dropped`` and removing them from ``files``."""
    splits = {}
    for name, items in files.items():
        paths = tf.constant([str(p) for p, _ in items], tf.string, shape=[len(items)])
        turns = np.array([orientation(p) for p, _ in items], dtype=np.int32)  # EXIF: about 0.1 ms a photo
        labels = np.array([c for _, c in items], dtype=np.int32)
        # Files that pass the header check but still fail to decode are dropped, not fatal.
        ds = tf.data.Dataset.from_tensor_slices((paths, turns, labels)).map(decode, num_parallel_calls=AUTOTUNE)
        ds = ds.ignore_errors()
        if cache:
            # Decode once now into the in-memory cache: later epochs read it, the exact size is known
            # (Keras needs it for whole epochs), and files that failed to decode are named.
            ds = ds.cache()
            with quiet_decoders():  # libjpeg's unnamed lines; the skipped files are named instead
                decoded = {p.decode() for p in ds.map(lambda p, x, y: p).as_numpy_iterator()}
            dropped.extend(str(p) for p, _ in items if str(p) not in decoded)
            files[name] = [it for it in items if str(it[0]) in decoded]
            ds = ds.apply(tf.data.experimental.assert_cardinality(len(decoded)))
        splits[name] = ds.map(lambda p, x, y: (x, y))
    return splits


def _materialize(splits: dict[str, tf.data.Dataset], files: dict[str, list], image_size: int,
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """The decoded splits as arrays (for ``pipeline.image_cache``), with the paths they came from."""
    out = {}
    for name, ds in splits.items():
        xs, ys = [], []
        for x, y in ds.as_numpy_iterator():
            xs.append(x)
            ys.append(y)
        x = np.stack(xs) if xs else np.zeros((0, image_size, image_size, 3), np.uint8)
        out[name] = (x, np.asarray(ys, np.int32), [str(p) for p, _ in files[name]])
    return out


def _check_sizes(name: str, sizes: dict[str, int], spec: str, example: str = "75/15/10") -> None:
    """An empty split would train on nothing or report an accuracy of nothing: refuse it."""
    for split in SPLITS:
        if not sizes.get(split):
            how = ("add images (10 or more per class) or give another --split whose test share is above 0, "
                   f"e.g. {example}" if split == "test" else "it needs more images per class")
            raise DataError(f"the {split} split of {name} is empty (split {spec}); {how}")


def check_memory(images: int, image_size: int, available: int | None = None) -> None:
    """Refuse, before decoding, a cache of decoded images larger than the memory available (it would
    swap or be killed without a word)."""
    need = images * image_size * image_size * 3
    available = _available_memory() if available is None else available
    if need <= available:
        return
    fits = int((available / 2 / (3 * images)) ** 0.5) // 8 * 8  # half the memory, the rest for the model
    raise DataError(
        f"{images} images decoded at {image_size} px need about {need / 2**30:.1f} GiB in memory "
        f"({images} x {image_size} x {image_size} x 3 bytes), but {available / 2**30:.1f} GiB is available; "
        f"use an image size of {fits} px or less, or fewer images"
    )


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def unreadable_files(dataset: str) -> list[str]:
    """The files of a folder data set that ``load_data`` skips (``skip_reason``) or that do not decode, found before
    any trial (JPEGs decoded at 1/8 scale: about 2.4 s for 3,670 photos on 2 cores), so a sweep names them."""
    root = _folder(dataset)
    if root is None:
        return []
    layout = split_folders(root)
    images: list[str] = []
    bad: list[str] = []
    for top in layout.values() if layout else [root]:
        for folder in subfolders(top):
            found, skipped = walk(folder)
            images += [str(p) for p in found]
            bad += [str(p) for p in skipped]
    if not images:
        return sorted(bad)

    def decodes(path):
        data = tf.io.read_file(path)
        if tf.io.is_jpeg(data):
            image = tf.io.decode_jpeg(data, channels=3, ratio=8)
        else:
            image = _decode(data, tf.constant(1))
        return path, tf.shape(image)[0]

    ds = tf.data.Dataset.from_tensor_slices(images).map(decodes, num_parallel_calls=AUTOTUNE).ignore_errors()
    with quiet_decoders():  # libjpeg's unnamed lines; the skipped files are named instead
        decoded = {p.decode() for p, _ in ds.as_numpy_iterator()}
    return sorted(bad + [p for p in images if p not in decoded])


def _refuse_split(root: Path, layout: dict[str, Path], split: str) -> None:
    """A folder of split folders has its split: ``SPLIT=`` does not apply."""
    train = layout["train"].name
    if "validation" in layout:
        raise DataError(f"folder {root} already has {train}/ and {layout['validation'].name}/ subfolders, so "
                        f"--split {split!r} does not apply; leave it out")
    raise DataError(f"folder {root} already has {train}/ and {layout['test'].name}/ subfolders (validation is "
                    f"{CARVED_VALIDATION:.0%} of {train}/, chosen by the seed), so --split {split!r} does not apply; "
                    "leave it out")


def _warn_unmeasured(files: dict[str, list], class_names: list[str]) -> None:
    """Say which classes a split lacks (e.g. a class with one image): its accuracy cannot measure them."""
    for split in ("validation", "test"):
        present = {c for _, c in files.get(split, [])}
        missing = [class_names[c] for c in range(len(class_names)) if c not in present]
        if files.get(split) and missing:
            counts = {class_names[c]: sum(1 for _, k in files["train"] if k == c) for c in range(len(class_names))}
            warnings.warn(
                f"the {split} split has no image of class(es) {', '.join(missing)} "
                f"({', '.join(f'{n}: {counts[n]} in train' for n in missing)}), so {split} accuracy does not "
                "measure them; add images (10 or more per class)", DataWarning, stacklevel=3)


def _class_names(root: Path) -> list[str]:
    names = [d.name for d in subfolders(root)]
    if not names:
        raise DataError(
            f"folder {root} has no class subfolders; expected {root}/<class>/*.jpg "
            f"(or train/ and validation/ folders that hold class subfolders)"
        )
    if len(names) < 2:
        raise DataError(
            f"folder {root} has a single class ({names[0]!r}); classification needs at least two class subfolders"
        )
    return names


def _same_classes(root: Path, class_names: list[str]) -> None:
    """A validation or test folder: a class folder the train split lacks would be ignored."""
    extra = [d.name for d in subfolders(root) if d.name not in class_names]
    if extra:
        raise DataError(f"{root} has class folder(s) {', '.join(extra)} that the train split does not have (its "
                        f"classes: {', '.join(class_names)}); every split needs the same classes: add them to the "
                        "train split or remove them")


def _scan(root: Path, class_names: list[str], skipped: list[str], each_class: bool = False) -> list[tuple[Path, int]]:
    """List ``(file, class index)`` under ``root/<class>/`` (subfolders included); the entries not read
    (``skip_reason``) go to ``skipped``. ``each_class``: the folder that defines the classes, where every class needs
    images; in the others a class folder the classes lack would be ignored, and is refused."""
    if not each_class:
        _same_classes(root, class_names)
    items = []
    nested = []
    for index, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder {folder} is missing: every split needs the same classes {class_names}")
        images, passed = walk(folder)
        skipped.extend(str(p) for p in passed)
        items.extend((p, index) for p in images)
        if images and not any(p.parent == folder for p in images):
            nested.append(name)
        elif each_class and not images:
            seen = f" ({len(passed)} file(s) skipped there, e.g. {passed[0].name}: {skip_reason(passed[0])})" \
                if passed else ""
            raise DataError(
                f"class folder {folder} holds no images{seen}; images read: {SUPPORTED}; add images to it or "
                "remove it (an empty class would be a class the model can never learn)"
            )
    if nested:
        first = root / nested[0]
        inner = [d.name for d in subfolders(first)]
        raise DataError(
            f"folder {root} looks like a folder of data sets, not of classes: {', '.join(nested)} hold no images "
            f"of their own, only subfolders ({nested[0]}/{', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}); "
            f"pass one data set, e.g. {first}"
        )
    if not items:
        raise DataError(f"folder {root} holds no images; expected {SUPPORTED} files in class folders")
    return items


def _split(items: list[tuple[Path, int]], fractions: tuple[float, ...], seed: int) -> list[list]:
    """Stratified, seeded split of ``items`` into ``len(fractions)`` parts."""
    rng = np.random.default_rng(seed)
    total = sum(fractions)
    bounds = np.cumsum(fractions)[:-1] / total
    parts: list[list] = [[] for _ in fractions]
    for label in sorted({c for _, c in items}):
        members = [it for it in items if it[1] == label]
        order = rng.permutation(len(members))
        cuts = [int(round(b * len(members))) for b in bounds]
        for i, chunk in enumerate(np.split(order, cuts)):
            parts[i].extend(members[j] for j in chunk)
    return [sorted(p, key=lambda it: str(it[0])) for p in parts]


def read_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file as uint8 RGB ``[S, S, 3]``, decoded, turned and resized exactly as for training."""
    if reason := skip_reason(path):
        raise UserError(f"{path}: {reason}; images read: {SUPPORTED}")
    try:
        with quiet_decoders():  # the error below names the file
            image = _decode(tf.io.read_file(str(path)), tf.constant(orientation(path)))
    except Exception as e:  # noqa: BLE001 - TensorFlow's errors, or Pillow's (eager numpy_function) for a TIFF
        message = getattr(e, "message", None) or str(e) or type(e).__name__
        raise UserError(f"{path}: not a readable image (it did not decode: {message.splitlines()[0]})") from e
    return _resizer(image_size)(image).numpy()


def _decode(data: tf.Tensor, turn: tf.Tensor) -> tf.Tensor:
    """The bytes of an image file as uint8 ``[H, W, 3]``, as displayed. TensorFlow decodes JPEG, PNG, GIF, BMP and
    WebP, then turns the pixels by ``turn``, the file's EXIF Orientation (``datafolder.orientation``); TIFF goes
    through Pillow, which turns it itself."""
    head = tf.strings.substr(data, 0, 4)
    tiff = tf.logical_or(tf.equal(head, b"II*\x00"), tf.equal(head, b"MM\x00*"))
    return tf.cond(tiff, lambda: _pillow(data),
                   lambda: _turn(tf.io.decode_image(data, channels=3, expand_animations=False), turn))


def _pillow(data: tf.Tensor) -> tf.Tensor:
    def pixels(raw: np.ndarray) -> np.ndarray:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(raw.tobytes())) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))

    # As uint8 values: a string would reach numpy as bytes_, which drops the trailing NUL bytes a TIFF may end with.
    image = tf.numpy_function(pixels, [tf.io.decode_raw(data, tf.uint8)], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


def _turn(image: tf.Tensor, turn: tf.Tensor) -> tf.Tensor:
    """Apply EXIF Orientation ``turn`` (1..8) as Pillow's ``ImageOps.exif_transpose`` does."""
    swap = lambda: tf.transpose(image, [1, 0, 2])  # noqa: E731
    return tf.switch_case(tf.clip_by_value(turn, 1, 8) - 1, [
        lambda: image,
        lambda: tf.reverse(image, [1]),  # mirrored left-right
        lambda: tf.reverse(image, [0, 1]),  # upside down
        lambda: tf.reverse(image, [0]),  # mirrored top-bottom
        swap,  # transposed
        lambda: tf.image.rot90(image, 3),  # turned 90 degrees clockwise
        lambda: tf.reverse(swap(), [0, 1]),  # transversed
        lambda: tf.image.rot90(image, 1),  # turned 90 degrees counter-clockwise
    ])


def _resizer(image_size: int):
    def resize(image):
        if image.shape[-1] == 1:  # grayscale tfds images
            image = tf.image.grayscale_to_rgb(image)
        elif image.shape[-1] == 4:  # RGBA: drop alpha
            image = image[..., :3]
        image = tf.image.resize(image, [image_size, image_size], antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)

    return resize


def _hash(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
