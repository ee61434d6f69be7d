"""Serving-ready export: a TF SavedModel directory with ``labels.txt`` and a ``.keras`` file.

``tf.saved_model.load(out).signatures["serving_default"]`` takes a float32 batch
``[N, H, W, 3]`` of raw 0..255 pixels and returns class probabilities ``[N, classes]``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

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
) -> Path:
    """Write the export to ``output_dir`` atomically (a half-written export never appears)."""
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"export directory {out} already exists and is not empty; pick another or pass --overwrite")
    if model.output_shape[-1] != len(class_names):
        raise ValueError(f"model has {model.output_shape[-1]} outputs but {len(class_names)} class names")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        saved = tmp / "export"
        _write_savedmodel(model, saved)
        (saved / LABELS).write_text("".join(f"{c}\n" for c in class_names))
        model.save(saved / KERAS_FILE)
        size = int(model.input_shape[1])
        meta = {"image_size": size, "class_names": list(class_names), "input": "float32 [N, H, W, 3] raw 0..255"}
        (saved / METADATA).write_text(json.dumps({**meta, **(metadata or {})}, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(saved, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_savedmodel(model: keras.Model, path: Path) -> None:
    # Not model.export(): it calls the model with the training flag unset, and Keras augmentation
    # layers default to training=True, so serving would augment. Serve with training=False.
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image")
    archive.add_endpoint("serving_default", lambda image: model(image, training=False), input_signature=[spec])
    archive.write_out(str(path), verbose=False)


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
        (spec,) = self._serve.structured_input_signature[1].values()
        self.image_size = int(spec.shape[1])

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities for a float batch of raw 0..255 pixels at ``image_size``."""
        outs = []
        for i in range(0, len(images), batch_size):
            result = self._serve(tf.constant(images[i : i + batch_size], tf.float32))
            outs.append(next(iter(result.values())).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)


def load_keras_model(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` file written by ``export_model`` (registers this project's custom layers)."""
    import pipeline.preprocessing  # noqa: F401 - registers Preprocess
    import pipeline.hub  # noqa: F401 - registers HubFeatureVector

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

    def predict(self, images: np.ndarray) -> np.ndarray:
        outs = []
        for image in images:  # one at a time: the interpreter's input shape is fixed at [1, H, W, 3]
            (probs,) = self._runner(image=np.asarray(image, np.float32)[None]).values()
            outs.append(probs[0])
        return np.stack(outs) if outs else np.zeros((0, 0), np.float32)
