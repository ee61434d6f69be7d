"""Frozen-backbone feature cache: compute pooled backbone features once, train heads on them.

While the backbone is frozen (and there is no augmentation), everything below the head is a fixed
function of the image, so a sweep's trials share it: features are computed once per key (backbone,
weights, image size, preprocessing, data fingerprint) and kept on disk. The head trained on them
uses the classifier's own Dropout and Dense layers, so the full model is the same model as one
trained end to end, and goes on into fine-tuning and export as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import safepath
from pipeline.backbones import BackboneSpec
from pipeline.data import SPLITS, DataSplits, steady
from pipeline.efficientnet_lite import cache_dir

FEATURES_DIR = "features"


def cache_root() -> Path:
    """``$TLSWEEP_CACHE/features`` (default ``~/.cache/tlsweep/features``)."""
    return cache_dir() / FEATURES_DIR


def can_cache(model: keras.Model) -> bool:
    """Cached features stand in for the frozen part only when nothing random runs before the head."""
    names = {layer.name for layer in model.layers}
    return "augmentation" not in names and {"dropout", "classifier"} <= names


def feature_key(backbone: str, weights_id: str, image_size: int, preprocessing: dict, data: DataSplits,
                compute_dtype: str = "float32") -> str:
    """Changes whenever any input to the frozen features changes."""
    parts = {"backbone": backbone, "weights": weights_id, "image_size": image_size, "preprocessing": preprocessing,
             "data": data.fingerprint, "dtype": compute_dtype, "format": 1}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def weights_identity(weights: str | None, weight_source: str) -> str | None:
    """A stable id of the backbone weights, or None when they are random (nothing to share)."""
    if weights in (None, "none", ""):
        return None
    if weights == "imagenet":
        return f"imagenet:{weight_source}"
    stat = os.stat(weights)
    return f"file:{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}"


def extractor(model: keras.Model) -> keras.Model:
    """Raw pixels -> pooled backbone features: the classifier up to (not including) its Dropout."""
    return keras.Model(model.inputs, model.get_layer("dropout").input, name="feature_extractor")


def head(model: keras.Model) -> keras.Model:
    """Features -> probabilities through the classifier's own Dropout and Dense layers (shared weights)."""
    dropout = model.get_layer("dropout")
    inputs = keras.Input(shape=tuple(dropout.input.shape[1:]), name="features")
    return keras.Model(inputs, model.get_layer("classifier")(dropout(inputs)), name="head")


def key_for(spec: BackboneSpec, weights: str | None, image_size: int, data: DataSplits,
            precision: str = "float32") -> str | None:
    """The cache key of a classifier's frozen features, or None when random weights make them unshareable."""
    identity = weights_identity(weights, spec.weight_source)
    if identity is None:
        return None
    # Features computed in 16 bits differ from float32 ones: the key holds the policy (float32 keys as before).
    return feature_key(spec.name, identity, image_size, spec.preprocessing, data, precision)


def for_model(model: keras.Model, data: DataSplits, spec: BackboneSpec, weights: str | None, image_size: int,
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]] | None, float]:
    """Cached features for this classifier and data, or ``(None, 0)`` when they cannot stand in
    (augmentation before the head, or random backbone weights that no other run shares)."""
    key = key_for(spec, weights, image_size, data, model.get_layer("preprocess").dtype_policy.name)
    if key is None or not can_cache(model):
        return None, 0.0
    return load_or_compute(model, data, key)


def is_cached(key: str, root: Path | None = None) -> bool:
    return ((root or cache_root()) / f"{key}.npz").exists()


def load(key: str, root: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Features and labels per split from the cache, or None when they are not there yet."""
    path = (root or cache_root()) / f"{key}.npz"
    if not path.exists():
        return None
    with np.load(path) as stored:
        return {s: (stored[f"{s}_x"], stored[f"{s}_y"]) for s in SPLITS}


def load_or_compute(model: keras.Model, data: DataSplits, key: str, batch_size: int = 64,
                    root: Path | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Features and labels per split, from the cache or computed now. Returns them and the seconds spent."""
    found = load(key, root)
    if found is not None:
        return found, 0.0
    start = time.perf_counter()
    fx = extractor(model)
    # One graph for every batch size (traced once, ~1 s for EfficientNet-Lite0; op by op is 2x slower).
    spec = tf.TensorSpec([None, *fx.input_shape[1:]], fx.inputs[0].dtype)
    step = tf.function(lambda x: fx(x, training=False), input_signature=[spec])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        xs, ys = [], []
        for x, y in data.batches(split, batch_size):
            xs.append(step(tf.cast(x, spec.dtype)).numpy())
            ys.append(y.numpy())
        width = int(fx.output.shape[-1])
        out[split] = (np.concatenate(xs) if xs else np.zeros((0, width), np.float32),
                      np.concatenate(ys) if ys else np.zeros((0,), np.int32))
    save(key, out, root)
    return out, time.perf_counter() - start


def save(key: str, out: dict[str, tuple[np.ndarray, np.ndarray]], root: Path | None = None) -> None:
    """Keep features and labels per split under ``key`` (atomic: concurrent trials never read half a file)."""
    path = (root or cache_root()) / f"{key}.npz"
    safepath.make_dir(path.parent, safepath.CACHE)  # marked: `make clean-cache` removes only tlsweep's caches
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f"{s}_{k}": v for s, (x, y) in out.items() for k, v in (("x", x), ("y", y))})
    os.replace(tmp, path)


def feature_batches(features: tuple[np.ndarray, np.ndarray], batch_size: int, shuffle: bool = False,
                    seed: int = 0) -> tf.data.Dataset:
    """Batched features, shuffled exactly like ``DataSplits.batches`` shuffles images.

    The pipeline shuffles and batches the row *indices* and gathers each batch's rows from the arrays (which may
    be memory-mapped caches) as it goes: ``from_tensor_slices`` on the arrays would first copy all of them into a
    tensor, then every epoch into its shuffle buffer, row by row (the activations at a cut are 100+ MB: measured
    0.3 to 0.5 s before the first step). The shuffle depends on the seed and the number of rows only, so the
    batches are the same rows in the same order as before."""
    x, y = features
    shape_x, shape_y = (None, *x.shape[1:]), (None, *y.shape[1:])

    def gather(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(x[rows]), np.ascontiguousarray(y[rows])

    @tf.autograph.experimental.do_not_convert  # nothing for autograph to convert; converting it cost each process time
    def rows_of(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        bx, by = tf.numpy_function(gather, [indices], [tf.as_dtype(x.dtype), tf.as_dtype(y.dtype)], stateful=False)
        return tf.ensure_shape(bx, shape_x), tf.ensure_shape(by, shape_y)

    ds = tf.data.Dataset.range(len(x))
    if shuffle:
        ds = ds.shuffle(max(len(x), 1), seed=seed, reshuffle_each_iteration=True)
    return steady(ds.batch(batch_size).map(rows_of))
