"""What a model costs to deploy: its size, its parameter count and its CPU latency at batch 1.

Users deploy these models (TFLite, servers) and ask for "the smallest model within a point of the
best", so every trial measures its classifier. Latency is the median of ``RUNS`` calls on one
random image of raw 0..255 pixels, after ``WARMUP`` calls (tracing, caches), on this machine's CPU:
it moves with the machine's load, so compare trials of one sweep, not across machines.

The cost depends on the architecture only (backbone, image size, classes, augmentation layers), not
on the trained weights: a head trained on cached features is measured once per architecture per
process on the full classifier assembled from it (``cost_of_head``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Hashable

import keras
import numpy as np
import tensorflow as tf

RUNS, WARMUP = 20, 3
SAVEDMODEL, KERAS = "savedmodel", "keras"  # what was measured (tracking.layout.COST_SAVEDMODEL / COST_KERAS)


@dataclasses.dataclass(frozen=True)
class Cost:
    size_mb: float  # SAVEDMODEL: saved_model.pb + variables/ of the export; KERAS: the weights' bytes
    total_params: int
    latency_ms: float
    of: str  # SAVEDMODEL or KERAS


def latency_ms(call: Callable[[np.ndarray], object], shape: tuple[int, ...] | Mapping[str, tuple[int, ...]],
               runs: int = RUNS, warmup: int = WARMUP) -> float:
    """Median milliseconds of ``call(image)`` on one float32 image ``[1, *shape]`` after ``warmup`` calls (``shape``
    a mapping of input name -> shape: ``call`` gets a mapping of one image each)."""
    rng = np.random.default_rng(0)
    image = ({k: rng.uniform(0, 255, (1, *v)).astype(np.float32) for k, v in shape.items()}
             if isinstance(shape, Mapping) else rng.uniform(0, 255, (1, *shape)).astype(np.float32))
    for _ in range(warmup):
        call(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(image)
        times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))


def savedmodel_size_mb(export_dir: str | Path) -> float:
    """The SavedModel proper (``saved_model.pb`` and ``variables/``): what serving loads, without the export's
    ``model.keras`` copy, labels and metadata."""
    path = Path(export_dir)
    files = [path / "saved_model.pb", *(p for p in (path / "variables").rglob("*") if p.is_file())]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def savedmodel_cost(export_dir: str | Path, total_params: int, architecture: Hashable | None = None) -> Cost:
    """Size and latency of an export's SavedModel, loaded as serving loads it. Given its ``architecture``
    (``pipeline.recipe.Plan.architecture``), the latency is measured once per architecture in this process: a
    sweep's export helper exports many trials of one architecture, and loading and timing each export took
    1.4 to 1.5 s (Lite0 at 224 px). The size is read from each export."""
    latency = _SAVEDMODEL_LATENCY.get(architecture) if architecture is not None else None
    if latency is None:
        serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
        shapes = {name: tuple(int(d) for d in spec.shape[1:])
                  for name, spec in serve.structured_input_signature[1].items()}
        latency = latency_ms(lambda x: serve(**{k: tf.constant(v) for k, v in x.items()}), shapes)
        if architecture is not None:
            _SAVEDMODEL_LATENCY[architecture] = latency
    return Cost(savedmodel_size_mb(export_dir), int(total_params), latency, SAVEDMODEL)


_SAVEDMODEL_LATENCY: dict[Hashable, float] = {}


def keras_cost(model: keras.Model) -> Cost:
    """Size of the weights and latency of the full classifier in memory (``training=False``, one traced graph):
    for trials that export nothing (``log_models: best``)."""
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    latency = latency_ms(fn, tuple(int(d) for d in model.input_shape[1:]))
    size = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights) / 1e6
    return Cost(size, int(model.count_params()), latency, KERAS)


_BY_ARCHITECTURE: dict[Hashable, Cost] = {}


def cost_of_head(key: Hashable, build_full: Callable[[], keras.Model] | None, known: Cost | None = None) -> Cost:
    """The cost of a head's full classifier, measured once per architecture ``key`` in this process (``known``:
    measured before, by another process of the same sweep)."""
    if known is not None:
        _BY_ARCHITECTURE.setdefault(key, known)
    if key not in _BY_ARCHITECTURE:
        _BY_ARCHITECTURE[key] = keras_cost(build_full())
    return _BY_ARCHITECTURE[key]
