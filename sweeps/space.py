"""The search space in Keras Tuner terms: every hyperparameter has a default."""

from __future__ import annotations

from typing import Any

import keras_tuner as kt

from pipeline.hparams import DEFAULTS, FINE_TUNE_ONLY


def define(hp: kt.HyperParameters, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Declare the space on ``hp`` and return this trial's values for every hyperparameter.

    ``fine_tune_at``, ``fine_tune_epochs`` and ``fine_tune_learning_rate`` are conditional on
    ``fine_tune`` (when it is searched); values left out of the space are their defaults.
    """
    values: dict[str, Any] = {}
    for name in DEFAULTS:
        if name in FINE_TUNE_ONLY:
            continue
        values[name] = _declare(hp, name, space.get(name))
    fine_tune_searched = "fine_tune" in space and "fixed" not in space["fine_tune"]
    for name in FINE_TUNE_ONLY:
        if fine_tune_searched:
            with hp.conditional_scope("fine_tune", [True]):
                value = _declare(hp, name, space.get(name))
            values[name] = value if values["fine_tune"] else None
        else:
            values[name] = _declare(hp, name, space.get(name)) if values["fine_tune"] else None
    return values


def _declare(hp: kt.HyperParameters, name: str, entry: dict[str, Any] | None) -> Any:
    default = DEFAULTS[name] if entry is None or "default" not in entry else entry["default"]
    if entry is None or "fixed" in entry:
        value = default if entry is None else entry["fixed"]
        return hp.Fixed(name, value) if isinstance(value, (int, float, str, bool)) else value
    if "choice" in entry:
        choices = list(entry["choice"])
        if len({type(c) for c in choices}) > 1:  # Keras Tuner wants one type: e.g. [100, 0.75] -> strings
            choices, default = [str(c) for c in choices], str(default)
        return hp.Choice(name, choices, default=default if default in choices else choices[0])
    if "boolean" in entry:
        return hp.Boolean(name, default=bool(default))
    low, high = entry.get("float") or entry.get("int")
    if "float" in entry:
        default = min(max(float(default), low), high)
        return hp.Float(name, float(low), float(high), step=entry.get("step"),
                        sampling=entry.get("sampling", "linear"), default=default)
    default = min(max(int(default), low), high)
    return hp.Int(name, int(low), int(high), step=entry.get("step", 1), sampling=entry.get("sampling", "linear"),
                  default=default)
