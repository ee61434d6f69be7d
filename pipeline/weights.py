"""A trained classifier's weights in one ``.npz``: the checkpoint a trial writes on its path.

A trial that should keep its model (``log_models: improving`` when it improved, ``all``, ``best``) used to write a
``.keras`` archive with ``model.save``: 0.32 to 0.37 s of the trial's path for a fine-tuned EfficientNet-Lite0,
most of it Keras's own Python walking the model, plus its optimizer's state that nothing reads afterwards. Every
reader of such a checkpoint (the export helper, ``make best-export``, ensembles) rebuilds the classifier from the
trial's recipe anyway (``pipeline.recipe.load_checkpoint``), so the weights are all a checkpoint needs: written
with numpy in a few hundredths of a second. Each array keeps its variable's name and shape, and loading checks
both against the rebuilt model, so that a checkpoint never lands silently in another architecture. Runs that
continue a checkpoint with its optimizer (Hyperband) keep a ``.keras`` archive.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import keras
import numpy as np

from pipeline.errors import UserError

NAMES = "names"  # the variables' names (numbered layer names without their session-dependent number)


def save(model: keras.Model, path: str | Path) -> None:
    """Write every weight of ``model`` (trainable or not: BatchNorm statistics too) to ``path`` (``.npz``)."""
    arrays = {f"w{i:05d}": np.asarray(v) for i, v in enumerate(model.weights)}
    with open(path, "wb") as f:  # np.savez would append ".npz" to a name without it
        np.savez(f, **{NAMES: np.array([name_of(v) for v in model.weights])}, **arrays)


def load_into(model: keras.Model, path: str | Path) -> keras.Model:
    """Set ``model``'s weights from ``path``; a ``CheckpointMismatch`` if the model is not the one that wrote it."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            names = [str(n) for n in stored[NAMES]]
            arrays = [stored[f"w{i:05d}"] for i in range(len(names))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # not one this module wrote, or cut short
        raise CheckpointMismatch(f"the checkpoint {path} is not a readable weights checkpoint ({type(e).__name__}: {e}); "
                                 "it was cut short or replaced: run the trial again to write it") from e
    expected = [(name_of(v), tuple(v.shape)) for v in model.weights]
    given = [(n, tuple(a.shape)) for n, a in zip(names, arrays)]
    if given != expected:
        first = next((i for i, (g, e) in enumerate(zip(given, expected)) if g != e), min(len(given), len(expected)))
        found = given[first] if first < len(given) else "nothing"
        wanted = expected[first] if first < len(expected) else "nothing"
        raise CheckpointMismatch(
            f"the checkpoint {path} holds {len(given)} weights and the model rebuilt from its run's recipe "
            f"{len(expected)}; the first that differs is #{first}: {found} in the checkpoint, {wanted} in the model. "
            "It was written by another architecture or another tlsweep version: export it with that version")
    model.set_weights(arrays)
    return model


def name_of(variable: keras.Variable | object) -> str:
    """The variable's path without the numbers Keras appends to repeated layer names in one session
    (``dense_3/kernel`` -> ``dense/kernel``): the same model built in another process has the same names."""
    return re.sub(r"_\d+(?=/|$)", "", getattr(variable, "path", None) or variable.name)


class CheckpointMismatch(UserError):
    """A weights checkpoint that does not fit the model its run's recipe builds."""
