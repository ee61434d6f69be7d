"""The search space in Keras Tuner terms: every hyperparameter has a default."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras_tuner as kt

from pipeline.hparams import DEFAULTS, FINE_TUNE_ONLY, KNOBS

if TYPE_CHECKING:
    from sweeps.config import SweepConfig


def define(hp: kt.HyperParameters, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Declare the space on ``hp`` and return this trial's values for every hyperparameter.

    ``fine_tune_at``, ``fine_tune_epochs``, ``fine_tune_learning_rate``, ``fine_tune_schedule`` and
    ``warmup_epochs`` are conditional on ``fine_tune`` (when it is searched); values left out of the space are
    their defaults. The fine-tuning knobs (``KNOBS``) that can only be their default (left out, or fixed there, as a
    staged search's stage 2 fixes them) are not declared: each declared value moves Keras Tuner's random seed on, so
    a space without them draws exactly the trials it drew before they existed.
    """
    values: dict[str, Any] = {}
    undeclared = {n for n in KNOBS if values_of(space.get(n), n) == [DEFAULTS[n]]}
    for name in DEFAULTS:
        if name in FINE_TUNE_ONLY:
            continue
        values[name] = DEFAULTS[name] if name in undeclared else _declare(hp, name, space.get(name))
    fine_tune_searched = "fine_tune" in space and "fixed" not in space["fine_tune"]
    for name in FINE_TUNE_ONLY:
        if name in undeclared:
            values[name] = DEFAULTS[name] if values["fine_tune"] else None
        elif fine_tune_searched:
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


def values_of(entry: dict[str, Any] | None, name: str) -> list[Any]:
    """The values an entry can take that bound what a trial may see: its choices, a range's ends, both booleans."""
    if entry is None:
        return [DEFAULTS[name]]
    if "fixed" in entry:
        return [entry["fixed"]]
    if "choice" in entry:
        return list(entry["choice"])
    if "boolean" in entry:
        return [False, True]
    low, high = entry.get("float") or entry.get("int")
    return [low, high]


def searched(space: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The hyperparameters the space varies (more than one value): a trial's MLflow params (``layout.place``)."""
    return tuple(n for n in DEFAULTS if n in space and len({repr(v) for v in values_of(space[n], n)}) > 1)


def check(space: dict[str, dict[str, Any]], where: str) -> None:
    """Plan every configuration at the corners of ``space`` (``pipeline.recipe.plan``), so that a value no trial
    can run with is one line before the first trial, not a failed trial (or a traceback) later. Values that
    depend on each other (a backbone's depth and image sizes against ``fine_tune_at`` and ``image_size``;
    ``fine_tune_epochs`` against ``warmup_epochs``) are checked in every combination; the others one at a time on
    the default point."""
    import itertools

    from pipeline import recipe
    from pipeline.errors import UserError
    from pipeline.hparams import RunConfig

    joint = ("backbone", "fine_tune", "fine_tune_at", "image_size")
    combos = itertools.product(*(values_of(space.get(n), n) for n in joint))
    configs = [dict(zip(joint, combo)) for combo in combos]
    configs += [{name: value} for name in DEFAULTS if name not in joint
                for value in values_of(space.get(name), name)]
    configs += [{"fine_tune_epochs": epochs, "warmup_epochs": warmup}  # the warmup must end inside the phase
                for epochs in values_of(space.get("fine_tune_epochs"), "fine_tune_epochs")
                for warmup in values_of(space.get("warmup_epochs"), "warmup_epochs")]
    for changes in configs:
        if not changes.get("fine_tune", True):
            changes = {**changes, "fine_tune_at": None}  # not drawn: conditional on fine_tune
        try:
            recipe.plan(RunConfig(**{**DEFAULTS, **changes}))
        except UserError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in changes.items() if v is not None)
            raise UserError(f"sweep {where}: no trial can run with {shown}: {e}") from None


def check_weights(space: dict[str, dict[str, Any]], where: str) -> None:
    """A weights file in ``space`` loads into each backbone it may meet (built once each): a file of another model,
    or no weights at all, is one line before the first trial, not a failed trial."""
    from pipeline.backbones import check_weights_fit, get_spec
    from pipeline.errors import UserError

    files = [str(w) for w in values_of(space.get("weights"), "weights") if w not in (None, "", "none", "imagenet")]
    for name in values_of(space.get("backbone"), "backbone") if files else []:
        for weights in files:
            try:
                check_weights_fit(get_spec(str(name)), weights)
            except UserError as e:
                raise UserError(f"sweep {where}: no trial can run with backbone={name!r}, weights={weights!r}: {e}") \
                    from None


def check_sweep(config: "SweepConfig") -> None:
    """``check`` for a sweep: a staged search's stage 1 trains heads only, its stage 2 fine-tunes the single
    backbones among them (an ensemble stays as stage 1 trained it)."""
    from pipeline.backbones import get_spec

    where = config.source or config.name
    if not config.stage2:
        check(config.space, where)
    else:
        check({**config.space, "fine_tune": {"fixed": False}}, where)
        singles = [b for b in values_of(config.space.get("backbone"), "backbone") if not get_spec(str(b)).is_ensemble]
        if singles:
            check({**config.space, **(config.stage2.get("space") or {}), "backbone": {"choice": singles},
                   "fine_tune": {"fixed": True}}, where)
    check_weights(config.space, where)  # last: it builds a backbone per weights file


def fit_to_machine(config: "SweepConfig") -> "SweepConfig":
    """Drop the backbones whose weights cannot be had here (no internet and no local copy), one line each saying
    why and how to get them; a space left with no backbone is an error. No sweep fails trial after trial on
    downloads."""
    import dataclasses

    from pipeline.backbones import get_spec, weights_unavailable
    from pipeline.errors import UserError

    entry = config.space.get("backbone")
    names = values_of(entry, "backbone")
    weights = values_of(config.space.get("weights"), "weights")
    where = config.source or config.name
    kept = []
    for name in names:
        reasons = [r for w in weights if (r := weights_unavailable(get_spec(name), w)) is not None]
        if reasons:
            print(f"[sweep] backbone {name} leaves the search: {reasons[0]}", flush=True)
        else:
            kept.append(name)
    if not kept:
        raise UserError(f"sweep {where}: no backbone of {names} has weights on this machine; "
                        + "; ".join(f"{n}: {weights_unavailable(get_spec(n), weights[0])}" for n in names[:3]))
    if len(kept) == len(names):
        return config
    if "choice" in entry and len(kept) > 1:
        default = entry.get("default")
        fitted = {**entry, "choice": kept, **({"default": default if default in kept else kept[0]}
                                              if "default" in entry else {})}
    else:
        fitted = {"fixed": kept[0]}
    return dataclasses.replace(config, space={**config.space, "backbone": fitted})
