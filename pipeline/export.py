"""Serving-ready export: a TF SavedModel directory with ``labels.txt`` and a ``.keras`` file.

``tf.saved_model.load(out).signatures["serving_default"]`` takes a float32 batch ``image`` ``[N, H, W, 3]`` of raw
0..255 pixels and returns class probabilities ``[N, classes]``. An ensemble whose members were trained at several
image sizes takes one such batch per size instead, ``image_<size>`` (the same photos, each resized to that size).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import keras
import numpy as np
import tensorflow as tf

from pipeline import safepath
from pipeline.errors import UserError

LABELS = "labels.txt"
KERAS_FILE = "model.keras"
METADATA = "metadata.json"


def export_model(
    model: keras.Model,
    output_dir: str | os.PathLike,
    class_names: list[str],
    metadata: dict | None = None,
    overwrite: bool = False,
    graph_cache: str | os.PathLike | None = None,
    keras_file: bool = True,
    fix: str = "--output",
) -> Path:
    """Write the export to ``output_dir`` atomically (a half-written export never appears). ``overwrite`` replaces
    an export there, never anything else (``pipeline.safepath``; ``fix``: the flag that gives another folder).
    ``graph_cache``: a folder for the model's architecture, where the traced graph is kept for the next export of
    the same architecture (``_write_savedmodel``); ``keras_file``: also write ``model.keras``."""
    out = Path(output_dir)
    safepath.check_replaceable(out, safepath.EXPORT, fix, overwrite)
    if model.output_shape[-1] != len(class_names):
        raise ValueError(f"model has {model.output_shape[-1]} outputs but {len(class_names)} class names")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tlsweep-export-", dir=out.parent))
    try:
        saved = tmp / "export"
        _write_savedmodel(model, saved, Path(graph_cache) if graph_cache else None)
        (saved / LABELS).write_text("".join(f"{c}\n" for c in class_names))
        if keras_file:
            model.save(saved / KERAS_FILE)
        sizes = dict(zip(input_names(model), (int(t.shape[1]) for t in model.inputs)))
        meta = {"image_size": max(sizes.values()), "image_sizes": sorted(sizes.values()),
                "class_names": list(class_names),
                "input": ", ".join(f"{name}: float32 [N, {s}, {s}, 3] raw 0..255" for name, s in sizes.items())}
        (saved / METADATA).write_text(json.dumps({**meta, **(metadata or {})}, indent=2, default=str))
        safepath.replace_dir(saved, out, safepath.EXPORT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_savedmodel(model: keras.Model, path: Path, graph_cache: Path | None = None) -> None:
    """The serving signature alone: a ``tf.Module`` holding the model's variables and one traced function.

    Not ``model.export()``: it calls the model with the training flag unset, and Keras augmentation layers default
    to training=True, so serving would augment; here it is ``training=False``. Not ``keras.export.ExportArchive``
    either: it also saves the Keras object graph, which wrote every variable twice (measured on a Lite1 trial's
    model: 35.7 MB and 6.1 s against 18.5 MB and 2.6 s this way, the same outputs).

    A sweep exports many models of one architecture: the same graph, other weights. With ``graph_cache`` the graph
    is traced and written once (``saved_model.pb`` there); a later export of a model with the same variables (shapes
    and dtypes, in order) links that graph and writes only its own variables, as the module would have saved them
    (``weights/<i>``), in a fraction of the time."""
    weights = [v.value for v in model.variables]  # the tf.Variables the function reads, in the module's order
    signature = json.dumps([[list(v.shape), v.dtype.name] for v in weights])
    cached = graph_cache / "saved_model.pb" if graph_cache else None
    if cached is not None and cached.exists() and (graph_cache / "variables.json").read_text() == signature:
        (path / "variables").mkdir(parents=True)
        try:
            os.link(cached, path / "saved_model.pb")
        except OSError:  # another file system
            shutil.copy(cached, path / "saved_model.pb")
        tf.train.Checkpoint(weights=weights).write(str(path / "variables" / "variables"))
        return
    specs = [tf.TensorSpec([None, *t.shape[1:]], tf.float32, name=name) for t, name in zip(model.inputs,
                                                                                        input_names(model))]
    if len(specs) == 1:
        serve = tf.function(lambda image: model(image, training=False), input_signature=specs)
    else:  # an ensemble fed at several sizes: one named input each
        serve = tf.function(lambda *images: model(list(images), training=False), input_signature=specs)
    module = tf.Module()
    module.weights = weights
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve.get_concrete_function()})
    if graph_cache is not None:  # whole or absent: processes of one sweep share the folder
        graph_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{graph_cache.name}.", dir=graph_cache.parent))
        shutil.copy(path / "saved_model.pb", tmp / "saved_model.pb")
        (tmp / "variables.json").write_text(signature)
        try:
            os.replace(tmp, graph_cache)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)


def input_names(model: keras.Model) -> list[str]:
    """The serving signature's input names: ``image`` for a model with one input (whatever Keras named it), else
    the model's own (``image_<size>``, see ``pipeline.model.average_of``)."""
    return ["image"] if len(model.inputs) == 1 else [t.name for t in model.inputs]


def feeds(names: Mapping[str, object], images: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A model's inputs by name: ``images`` itself for a model with one input, else the mapping it is."""
    if isinstance(images, Mapping):
        if set(images) != set(names):
            raise ValueError(f"the model takes the inputs {sorted(names)}, given {sorted(images)}")
        return {k: np.asarray(images[k], np.float32) for k in names}
    if len(names) != 1:
        raise ValueError(f"the model takes {len(names)} inputs ({', '.join(names)}: the images at each size); "
                         "pass a mapping of input name -> batch")
    return {next(iter(names)): np.asarray(images, np.float32)}


def batch_count(images: np.ndarray | Mapping[str, np.ndarray]) -> int:
    return len(next(iter(images.values())) if isinstance(images, Mapping) else images)


T = TypeVar("T")


class ExportedModel:
    """An export loaded for inference with nothing but TensorFlow."""

    def __init__(self, export_dir: str | os.PathLike):
        path = Path(export_dir)
        if not (path / "saved_model.pb").exists() or not (path / LABELS).exists():
            raise UserError(f"{path} is not an export: expected saved_model.pb and {LABELS} in it")
        self.path = path
        self.class_names = (path / LABELS).read_text().splitlines()
        self._loaded = tf.saved_model.load(str(path))
        self._serve = self._loaded.signatures["serving_default"]
        specs = self._serve.structured_input_signature[1]
        self.inputs = {name: int(specs[name].shape[1])  # input name -> image size, smallest first
                       for name in sorted(specs, key=lambda n: (int(specs[n].shape[1]), n))}
        self.image_size = max(self.inputs.values())  # the one size, or an ensemble's largest

    @property
    def input_shape(self) -> tuple[int, int, int] | dict[str, tuple[int, int, int]]:
        """One image's shape, or each input's for an export with several."""
        return one_or_all({name: (s, s, 3) for name, s in self.inputs.items()})

    def predict(self, images: np.ndarray | Mapping[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Class probabilities for a float batch of raw 0..255 pixels at ``image_size`` (or, for an export with
        several inputs, a mapping of input name -> the same photos at that input's size)."""
        given, outs = feeds(self.inputs, images), []
        for i in range(0, batch_count(given), batch_size):
            result = self._serve(**{k: tf.constant(v[i : i + batch_size]) for k, v in given.items()})
            outs.append(next(iter(result.values())).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)

    def zeros(self) -> np.ndarray | dict[str, np.ndarray]:
        """One black image for each input: a sample for signatures."""
        return one_or_all({name: np.zeros((1, s, s, 3), np.float32) for name, s in self.inputs.items()})

    def load_data(self, dataset: str, seed: int, split: str | None = None) -> "ExportData":
        """The data set's splits at each input's size (see ``ExportData``)."""
        from pipeline.data import load_data

        return ExportData({name: load_data(dataset, size, seed=seed, split=split)
                           for name, size in self.inputs.items()})


def one_or_all(by_input: dict[str, T]) -> T | dict[str, T]:
    """The value alone for an export with one input, else the mapping of input name -> value: a single-input
    export keeps the plain-array interface every caller had before multi-size ensembles."""
    return next(iter(by_input.values())) if len(by_input) == 1 else by_input


class ExportData:
    """A data set's splits as an export takes them: at its one image size, or at each of its inputs' sizes, the
    same photos in the same order (an ensemble whose members were trained at several sizes)."""

    def __init__(self, by_input: dict[str, object]):
        self._by_input = by_input
        first = next(iter(by_input.values()))
        self.sizes, self.class_names = first.sizes, first.class_names

    def batches(self, split: str, batch_size: int = 64) -> Iterator[tuple[np.ndarray | dict[str, np.ndarray],
                                                                           np.ndarray]]:
        """``(images, labels)`` as numpy: images a batch, or a mapping of input name -> batch."""
        streams = {name: data.batches(split, batch_size) for name, data in self._by_input.items()}
        for parts in zip(*streams.values(), strict=True):
            labels = [y.numpy() for _, y in parts]
            if any(not np.array_equal(labels[0], other) for other in labels[1:]):
                raise RuntimeError(f"the {split} split came in another order at another image size")
            yield one_or_all({name: x.numpy() for name, (x, _) in zip(streams, parts)}), labels[0]


def load_keras_model(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` file written by ``export_model`` (registers this project's custom layers)."""
    import pipeline.preprocessing  # noqa: F401 - registers Preprocess
    import pipeline.hub  # noqa: F401 - registers HubFeatureVector
    import pipeline.model  # noqa: F401 - registers the label-smoothing loss and AdamW of a compiled checkpoint

    return keras.models.load_model(path)


TFLITE_FILE = "model.tflite"


def to_tflite(export_dir: str | os.PathLike, mode: str = "float16") -> Path:
    """Convert an export's SavedModel to ``model.tflite`` beside it: float16 weights or dynamic-range int8."""
    if mode not in ("float16", "dynamic"):
        raise UserError(f"TFLite mode {mode!r} is not one of float16, dynamic")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(export_dir), signature_keys=["serving_default"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    path = Path(export_dir) / TFLITE_FILE
    path.write_bytes(converter.convert())
    return path


class TFLiteModel:
    """A ``model.tflite`` for inference: float32 raw 0..255 pixels -> class probabilities."""

    def __init__(self, path: str | os.PathLike):
        self._runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("serving_default")
        self.inputs = self._runner.get_input_details()

    def predict(self, images: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """As ``ExportedModel.predict``."""
        given, outs = feeds(self.inputs, images), []
        for i in range(batch_count(given)):  # one at a time: the interpreter's input shape is fixed at [1, H, W, 3]
            (probs,) = self._runner(**{k: v[i : i + 1] for k, v in given.items()}).values()
            outs.append(probs[0])
        return np.stack(outs) if outs else np.zeros((0, 0), np.float32)
