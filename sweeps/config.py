"""Sweep configuration: YAML at the edge, validated into a ``SweepConfig``.

A sweep file names the tuner, the trial budget, the objective and the space. Each space entry is
one of ``choice: [...]``, ``float: [lo, hi]`` (``sampling: log``, ``step``), ``int: [lo, hi]``
(``step``), ``boolean: true`` or ``fixed: value``, with an optional ``default``. Hyperparameters
left out keep their default (``pipeline.hparams.DEFAULTS``), so an empty space is the baseline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pipeline import precision
from pipeline.errors import UserError
from pipeline.hparams import DEFAULTS, FINE_TUNE_ONLY
from pipeline.precision import AUTO

SWEEPS_DIR = Path(__file__).resolve().parent
TUNERS = ("random", "bayesian", "hyperband", "grid")
TOP_KEYS = ("tuner", "max_trials", "objective", "seed", "space", "hyperband", "description",
            "max_consecutive_failed_trials", "log_models", "mixed_precision", "xla", "stage2", "trial_process", "prune",
            "ensemble")
STAGE2_KEYS = ("top_k", "trials_per_config", "space")
# Which trials log a SavedModel + pyfunc model: every trial; a trial that beats those before it; or
# none ("best": trials log their checkpoint, a few KB for a head, and best-export exports the winner).
LOG_MODELS = ("all", "improving", "best")
# Where a trial runs: "fresh" = its own process, whose memory is all given back when it exits
# (TensorFlow keeps some of every model built in a process); "same" = the sweep's process;
# "auto" = a fresh process for trials that train the whole network (fine-tuning, augmentation, features
# not cached yet), the sweep's process for heads on cached features.
TRIAL_PROCESSES = ("auto", "fresh", "same")
# Stop trials clearly behind the earlier ones (pipeline.pruning): `prune: false`, `prune: true` (these defaults)
# or a mapping of PRUNE_KEYS.
PRUNE_DEFAULTS = {"rule": "median", "min_trials": 3, "warmup_epochs": 2}
PRUNE_KEYS = tuple(PRUNE_DEFAULTS)
ENSEMBLE_DEFAULT = 5  # `ensemble: true`
TFLITE_MODES = ("float16", "dynamic")  # best-export's TFLite options
KINDS = ("choice", "float", "int", "boolean", "fixed")
ENTRY_KEYS = (*KINDS, "default", "sampling", "step")
SAMPLINGS = ("linear", "log", "reverse_log")  # Keras Tuner's
HYPERBAND_KEYS = ("max_epochs", "factor", "iterations")
OBJECTIVES = ("val_accuracy",)
NAME_PUNCTUATION = "-_. "  # experiment names: letters, digits and these (they name folders)
# Local copies of tfds data sets use their tfds sweep.
DATASET_ALIASES = {"flower_photos": "tf_flowers", "cats_and_dogs_filtered": "cats_vs_dogs", "PetImages": "cats_vs_dogs"}


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    tuner: str = "bayesian"
    max_trials: int = 10
    objective: str = "val_accuracy"
    seed: int = 42
    space: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    hyperband: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_consecutive_failed_trials: int = 3
    log_models: str = "improving"  # the winner always has its model; exports run off the training path
    mixed_precision: str = "auto"  # pipeline.precision.SETTINGS; resolved by each trial on its device
    xla: bool = False  # XLA-compiled training steps, for GPUs
    # Staged search: stage 1 sweeps heads only; stage 2 fine-tunes the top_k stage-1 trials from their
    # trained heads, trials_per_config trials each over its own space (fine_tune_at, learning rate, ...).
    stage2: dict[str, Any] = dataclasses.field(default_factory=dict)
    trial_process: str = "auto"  # see TRIAL_PROCESSES
    prune: dict[str, Any] | None = None  # PRUNE_KEYS, or None: no pruning
    # After the search: an ensemble of up to this many picks of the trials with a logged model, chosen greedily on
    # validation (sweeps.ensemble); kept only when it beats the best trial there. 0: none (on in the shipped sweeps).
    ensemble: int = 0
    source: str = ""

    def with_overrides(self, **overrides: Any) -> "SweepConfig":
        """Command-line overrides (MAX_TRIALS=, TUNER=, SEED=); None means not given."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "tuner" in given:
            _check_tuner(given["tuner"], "the command line")
        if "log_models" in given and given["log_models"] not in LOG_MODELS:
            raise UserError(f"log_models {given['log_models']!r} is not one of {', '.join(LOG_MODELS)}")
        if "trial_process" in given:
            _check_trial_process(given["trial_process"], "the command line")
        if "mixed_precision" in given:
            given["mixed_precision"] = precision.setting(given["mixed_precision"], "the command line")
        if "max_trials" in given and int(given["max_trials"]) < 1:
            raise UserError(f"MAX_TRIALS must be at least 1, got {given['max_trials']}")
        if given.get("tuner") == "hyperband":  # Hyperband stops trials itself, by its brackets
            given["prune"] = None
        return dataclasses.replace(self, **given)


def resolve_path(name_or_path: str) -> Path:
    """A sweep name (``quick`` -> ``sweeps/quick.yaml``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if path.is_dir():
            raise UserError(f"sweep file {path} is a folder; give the path of a .yaml file")
        if not path.is_file():
            raise UserError(f"sweep file {path} does not exist")
        return path
    candidate = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise UserError(f"unknown sweep {name_or_path!r}; known sweeps: {', '.join(known)} (or give a .yaml path)")
    return candidate


def default_sweep_for(dataset: str) -> str:
    """``sweeps/<dataset>.yaml`` when there is one, else ``default``."""
    name = Path(dataset.rstrip("/")).name
    name = DATASET_ALIASES.get(name, name)
    return name if (SWEEPS_DIR / f"{name}.yaml").is_file() else "default"


def load_sweep(name_or_path: str) -> SweepConfig:
    path = resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"sweep file {path} is not valid YAML: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"sweep file {path} cannot be read as text ({e}); give a YAML file such as "
                        f"{SWEEPS_DIR / 'quick.yaml'}") from e
    if not isinstance(raw, dict):
        raise UserError(f"sweep file {path} must be a mapping with keys {', '.join(TOP_KEYS)}")
    return parse_sweep(raw, name=path.stem, source=str(path))


def parse_sweep(raw: dict, name: str, source: str = "") -> SweepConfig:
    where = source or name
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in sweep {where}; known keys: {', '.join(TOP_KEYS)}")
    tuner = raw.get("tuner", "bayesian")
    _check_tuner(tuner, where)
    objective = raw.get("objective", "val_accuracy")
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} in sweep {where} is not supported; use one of {list(OBJECTIVES)}")
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        raise UserError(f"'space' in sweep {where} must map hyperparameter names to entries")
    for hp, entry in space.items():
        _check_entry(hp, entry, where)
    stage2 = dict(raw.get("stage2") or {})
    bad = sorted(set(stage2) - set(STAGE2_KEYS))
    if bad:
        raise UserError(f"unknown key(s) {bad} in stage2 of sweep {where}; known keys: {', '.join(STAGE2_KEYS)}")
    for hp, entry in (stage2.get("space") or {}).items():
        if hp not in FINE_TUNE_ONLY:
            raise UserError(f"stage2 of sweep {where} searches {hp!r}; it searches only {', '.join(FINE_TUNE_ONLY)}")
        _check_entry(hp, entry, where)
    log_models = raw.get("log_models", "improving")
    if log_models not in LOG_MODELS:
        raise UserError(f"log_models {log_models!r} in sweep {where} is not one of {', '.join(LOG_MODELS)}")
    trial_process = raw.get("trial_process", "auto")
    _check_trial_process(trial_process, where)
    max_trials = _whole(raw, "max_trials", 10, 1, where)
    hyperband = raw.get("hyperband") or {}
    if not isinstance(hyperband, dict) or set(hyperband) - set(HYPERBAND_KEYS):
        raise UserError(f"hyperband in sweep {where} must be a mapping with keys {', '.join(HYPERBAND_KEYS)}, "
                        f"got {hyperband!r}")
    for key, low in (("max_epochs", 1), ("factor", 2), ("iterations", 1)):
        _whole(hyperband, key, low, low, f"{where} (hyperband)")
    for key in ("top_k", "trials_per_config"):
        _whole(stage2, key, 1, 1, f"{where} (stage2)")
    prune = check_prune(raw.get("prune", False), where)
    if prune and tuner == "hyperband":
        raise UserError(f"prune in sweep {where} does not apply to tuner: hyperband, which stops trials itself; "
                        "set prune: false")
    ensemble = raw.get("ensemble", False)
    ensemble = {True: ENSEMBLE_DEFAULT, False: 0}.get(ensemble, ensemble) if isinstance(ensemble, bool) else ensemble
    if not isinstance(ensemble, int) or ensemble < 0 or ensemble == 1:
        raise UserError(f"ensemble in sweep {where} must be true, false or the most trials an ensemble picks (a whole "
                        f"number >= 2, or 0 for none), got {raw.get('ensemble')!r}")
    flags = {}
    for key in ("xla",):
        flags[key] = raw.get(key, False)
        if not isinstance(flags[key], bool):
            raise UserError(f"{key} in sweep {where} must be true or false, got {flags[key]!r}")
    return SweepConfig(
        name=name, tuner=tuner, max_trials=max_trials, objective=objective, seed=_whole(raw, "seed", 42, 0, where),
        space=space, hyperband=dict(hyperband),
        max_consecutive_failed_trials=_whole(raw, "max_consecutive_failed_trials", 3, 1, where), log_models=log_models,
        mixed_precision=precision.setting(raw.get("mixed_precision", AUTO), where), stage2=stage2,
        trial_process=trial_process, prune=prune, ensemble=ensemble, source=source, **flags,
    )


def _whole(raw: dict, key: str, default: int, low: int, where: str) -> int:
    """``raw[key]`` as a whole number of at least ``low`` (YAML's ``abc``, ``2.5``, ``true`` are errors)."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{key} in sweep {where} must be a whole number >= {low}, got {value!r}")
    return value


def check_prune(value: Any, where: str) -> dict[str, Any] | None:
    """``prune:`` of a sweep as its settings (None: off), or a one-line error saying what it takes."""
    example = "{rule: median, min_trials: 3, warmup_epochs: 2}"
    if value is False or value is None:
        return None
    if value is True:
        return dict(PRUNE_DEFAULTS)
    if not isinstance(value, dict):
        raise UserError(f"prune in sweep {where} must be false, true or a mapping such as {example}; got {value!r}")
    bad = sorted(set(value) - set(PRUNE_KEYS))
    if bad:
        raise UserError(f"unknown key(s) {bad} in prune of sweep {where}; known keys: {', '.join(PRUNE_KEYS)}")
    settings = {**PRUNE_DEFAULTS, **value}
    from pipeline.pruning import RULES

    if settings["rule"] not in RULES:
        raise UserError(f"prune rule {settings['rule']!r} in sweep {where} is not one of {', '.join(RULES)}")
    for key, low in (("min_trials", 1), ("warmup_epochs", 0)):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserError(f"prune {key} in sweep {where} must be a whole number >= {low}, got {v!r}")
    return settings


def _check_tuner(tuner: str, where: str) -> None:
    if tuner not in TUNERS:
        raise UserError(f"unknown tuner {tuner!r} in {where}; known tuners: {', '.join(TUNERS)}")


def _check_trial_process(value: Any, where: str) -> None:
    if value not in TRIAL_PROCESSES:
        raise UserError(f"trial_process {value!r} in {where} is not one of {', '.join(TRIAL_PROCESSES)} (auto: a fresh "
                        "process for trials that train the whole network)")


def _check_entry(hp: str, entry: Any, where: str) -> None:
    if hp not in DEFAULTS:
        raise UserError(
            f"unknown hyperparameter {hp!r} in sweep {where}; known hyperparameters: {', '.join(sorted(DEFAULTS))}"
        )
    if not isinstance(entry, dict):
        raise UserError(f"hyperparameter {hp!r} in sweep {where} must be a mapping such as {{choice: [a, b]}}")
    bad = sorted(set(entry) - set(ENTRY_KEYS))
    kinds = [k for k in KINDS if k in entry]
    if bad or len(kinds) != 1:
        raise UserError(
            f"hyperparameter {hp!r} in sweep {where} needs exactly one of {', '.join(KINDS)}"
            + (f"; unknown key(s) {bad}, known: {', '.join(ENTRY_KEYS)}" if bad else f", got {kinds or 'none'}")
        )
    kind = kinds[0]
    value = entry[kind]
    if kind == "choice" and (not isinstance(value, list) or not value):
        raise UserError(f"'choice' of {hp!r} in sweep {where} must be a non-empty list")
    if kind in ("float", "int") and (not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or value[0] > value[1]):
        raise UserError(f"'{kind}' of {hp!r} in sweep {where} must be [low, high] with low <= high, got {value!r}")
    if "default" in entry and kind == "choice" and entry["default"] not in value:
        raise UserError(f"default {entry['default']!r} of {hp!r} in sweep {where} is not one of its choices {value}")
    if ("sampling" in entry or "step" in entry) and kind not in ("float", "int"):
        raise UserError(f"'sampling' and 'step' of {hp!r} in sweep {where} apply to float and int ranges only")
    sampling = entry.get("sampling", "linear")
    if sampling not in SAMPLINGS:
        raise UserError(f"sampling {sampling!r} of {hp!r} in sweep {where} is not one of {', '.join(SAMPLINGS)}")
    if sampling != "linear" and value[0] <= 0:
        raise UserError(f"{sampling} sampling of {hp!r} in sweep {where} needs a range above 0, got {value!r}; "
                        "give a low bound such as 1.0e-5")
    step = entry.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0
                             or (kind == "int" and step != int(step))):
        raise UserError(f"step of {hp!r} in sweep {where} must be a number above 0 (whole for int), got {step!r}")


def check_experiment_name(name: str) -> str:
    """An experiment's name names folders (``sweeps_state/<name>``, ``exports/<name>``, ``reports/<name>``):
    a path such as ``../../x`` would write outside the project, so only plain names are accepted."""
    if name and not name.startswith(".") and all(c.isalnum() or c in NAME_PUNCTUATION for c in name):
        return name
    raise UserError(
        f"experiment name {name!r} is not a plain name: use letters, digits, '-', '_', '.' and spaces, not starting "
        f"with a dot (it names folders under sweeps_state/, exports/ and reports/), e.g. {safe_experiment_name(name)!r}"
    )


def safe_experiment_name(text: str) -> str:
    """``text`` (a data folder's name, a tfds name) made a plain experiment name: other characters become ``_``."""
    name = "".join(c if c.isalnum() or c in NAME_PUNCTUATION else "_" for c in text).lstrip(". ")
    return name or "experiment"
