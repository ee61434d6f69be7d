"""Fine-tune only the top: cache the frozen backbone's activations at the cut, train the layers above it.

Without augmentation, everything below ``fine_tune_at`` is frozen and in inference mode (BatchNorm
frozen, ``base(x, training=False)``), so its output is a fixed function of the image, as the pooled
features are for heads (``pipeline.features``). The classifier is split into

- a **bottom** (raw pixels -> preprocessing -> backbone layers below the cut), run once per image and
  cached per (feature-cache key, cut), and
- a **top** (activations at the cut -> backbone layers from the cut -> pool -> dropout -> softmax),
  which is built from the classifier's own layer objects: training it trains the classifier's variables,
  so the full model needs no copying back and exports as it always did.

Where the cut goes: a Keras functional backbone can have more than one tensor crossing a given layer
index (a residual connection jumps over it). The cut is **snapped down** to the nearest layer index at
or below ``unfreeze_from`` where exactly one tensor crosses; the few layers between it and
``unfreeze_from`` stay frozen (``trainable=False``) inside the top. That is the same function and the
same trainable variables as the end-to-end model, just with those frozen layers recomputed each step.
For EfficientNet-Lite0 with ``fine_tune_at`` 0.75 (layer 105 of 141) the cut is at layer 103, the
output of ``block11_project_bn``: 7 x 7 x 192 float32 per image at 224 px (37.6 KB).

Activations are stored as float32 (the compute dtype of the bottom, float16 only under mixed precision),
never down-cast: the top must see exactly what the bottom computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import safepath
from pipeline.data import SPLITS, DataSplits
from pipeline.efficientnet_lite import cache_dir
from pipeline.model import backbone_of

CUTS_DIR = "cuts"

Activations = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (activations, labels)


@dataclasses.dataclass(frozen=True)
class Cut:
    """A classifier split at one backbone layer index; ``top`` shares the classifier's layers."""

    index: int  # first backbone layer inside the top (<= the unfreeze index)
    layer: str  # the backbone layer whose output crosses the cut
    bottom: keras.Model  # raw pixels -> activations at the cut
    top: keras.Model  # activations at the cut -> class probabilities
    pooled: keras.Model  # activations at the cut -> the pooled features the head takes (frozen-feature cache)

    def key(self, feature_key: str) -> str:
        """The activation-cache key: the frozen-feature key (backbone, weights, size, preprocessing, data,
        dtype) plus where the cut is."""
        return hashlib.sha256(f"{feature_key}|cut:{self.index}:{self.layer}|format:1".encode()).hexdigest()[:20]


def cache_root() -> Path:
    """``$TLSWEEP_CACHE/cuts`` (default ``~/.cache/tlsweep/cuts``)."""
    return cache_dir() / CUTS_DIR


def single_tensor_cut(base: keras.Model, unfreeze_from: int) -> tuple[int, keras.KerasTensor] | None:
    """The largest index ``j <= unfreeze_from`` where exactly one tensor of ``base`` crosses from its layers
    ``[:j]`` to ``[j:]`` (or to its output), and that tensor; None when the only such point is the input
    (nothing to cache) or the backbone is not a plain functional graph."""
    layers = base.layers
    position = {id(layer): i for i, layer in enumerate(layers)}
    last_use: dict[int, int] = {}  # id(tensor) -> last layer index that consumes it
    tensors: dict[int, tuple[int, keras.KerasTensor]] = {}  # id(tensor) -> (producer index, tensor)
    for i, layer in enumerate(layers):
        # The first node is the one in the backbone's own graph (a split adds nodes, calls on it too).
        for node in getattr(layer, "_inbound_nodes", [])[:1]:
            for t in node.input_tensors:
                producer = position.get(id(t._keras_history.operation))
                if producer is None:
                    return None
                tensors[id(t)] = (producer, t)
                last_use[id(t)] = max(last_use.get(id(t), -1), i)
    for t in keras.tree.flatten(base.outputs):
        producer = position.get(id(t._keras_history.operation))
        if producer is None:
            return None
        tensors[id(t)] = (producer, t)
        last_use[id(t)] = len(layers)
    for j in range(min(unfreeze_from, len(layers) - 1), 0, -1):
        crossing = [tensors[k] for k, last in last_use.items() if tensors[k][0] < j <= last]
        if len(crossing) == 1:
            producer, tensor = crossing[0]
            return None if producer == 0 else (j, tensor)
    return None


def split(model: keras.Model, unfreeze_from: int) -> Cut | None:
    """Split a classifier built by ``pipeline.model.build_model`` at ``unfreeze_from`` (see the module doc),
    or None when it cannot be split usefully (augmentation inside, no single-tensor cut above the input)."""
    names = {layer.name for layer in model.layers}
    if "augmentation" in names or not {"preprocess", "dropout", "classifier"} <= names:
        return None
    base = backbone_of(model)
    found = single_tensor_cut(base, unfreeze_from)
    if found is None:
        return None
    index, tensor = found
    below = keras.Model(base.inputs, tensor, name="backbone_bottom")
    above = keras.Model(tensor, base.output, name="backbone_top")
    image = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name="image")
    bottom = keras.Model(image, below(model.get_layer("preprocess")(image), training=False), name="bottom")
    activations = keras.Input(shape=tuple(tensor.shape[1:]), dtype=tensor.dtype, name="activations")
    x = above(activations, training=False)  # BatchNorm in inference mode, as in the classifier
    if "pool" in names:
        x = model.get_layer("pool")(x)
    out = model.get_layer("classifier")(model.get_layer("dropout")(x))
    top = keras.Model(activations, out, name="top")
    pooled = keras.Model(activations, x, name="pooled")
    return Cut(index, tensor._keras_history.operation.name, bottom, top, pooled)


def pooled_features(cut: Cut, activations: Activations, batch_size: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The frozen-feature cache's pooled features from the activations at the cut (the rest of the frozen
    backbone run on them), so that a cold start computes both in one pass over the images."""
    out = {}
    for name, (x, y) in activations.items():
        width = int(cut.pooled.output.shape[-1])
        feats = cut.pooled.predict(x, batch_size=batch_size, verbose=0) if len(x) else np.zeros((0, width), np.float32)
        out[name] = (np.asarray(feats), y)
    return out


def _path(key: str, root: Path | None) -> Path:
    return (root or cache_root()) / key


def load(key: str, root: Path | None = None) -> Activations | None:
    """Activations and labels per split from the cache, or None when they are not there yet.

    The activations are memory-mapped (read-only), not read: the input pipeline copies them once into its
    own tensors anyway, and reading them first was a second copy of 100+ MB on a fine-tuning trial's path
    (flowers at 224 px: 0.05 to 1.0 s, measured in fresh processes). A cache replaced or removed while mapped
    stays readable (the mapping keeps the old file)."""
    path = _path(key, root)
    if not (path / "done").exists():
        return None
    return {s: (np.load(path / f"{s}_x.npy", mmap_mode="r"), np.load(path / f"{s}_y.npy")) for s in SPLITS}


def load_or_compute(cut: Cut, data: DataSplits, key: str, batch_size: int = 64,
                    root: Path | None = None) -> tuple[Activations, float]:
    """Activations at the cut per split, from the cache or computed now (one traced graph); and the seconds
    spent computing them (0 when cached)."""
    found = load(key, root)
    if found is not None:
        return found, 0.0
    start = time.perf_counter()
    spec = tf.TensorSpec([None, *cut.bottom.input_shape[1:]], cut.bottom.inputs[0].dtype)
    step = tf.function(lambda x: cut.bottom(x, training=False), input_signature=[spec])
    shape = tuple(int(d) for d in cut.bottom.output.shape[1:])
    out: Activations = {}
    for name in SPLITS:
        xs, ys = [], []
        for x, y in data.batches(name, batch_size):
            xs.append(step(tf.cast(x, spec.dtype)).numpy())
            ys.append(y.numpy())
        out[name] = (np.concatenate(xs) if xs else np.zeros((0, *shape), cut.bottom.output.dtype),
                     np.concatenate(ys) if ys else np.zeros((0,), np.int32))
    path = _path(key, root)
    safepath.make_dir(path.parent, safepath.CACHE)  # marked: `make clean-cache` removes only tlsweep's caches
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, (x, y) in out.items():
        np.save(tmp / f"{name}_x.npy", x)
        np.save(tmp / f"{name}_y.npy", y)
    (tmp / "done").touch()
    try:
        os.replace(tmp, path)  # atomic: a concurrent trial never reads half a cache
    except OSError:  # another process finished first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out, time.perf_counter() - start


def top_trainer(cut: Cut, model: keras.Model) -> keras.Model:
    """The top, compiled with the classifier's own optimizer and loss (call after ``compile_model(model)``)."""
    cut.top.compile(optimizer=model.optimizer, loss=model.loss,
                    metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                    jit_compile=bool(getattr(model, "jit_compile", False)))
    return cut.top
