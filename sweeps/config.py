"""Sweep configuration: the sweep file's keys declared once as the typed fields of ``SweepConfig``.

A sweep file names the tuner, the trial budget, the objective and the space. Each space entry is
one of ``choice: [...]``, ``float: [lo, hi]`` (``sampling: log``, ``step``), ``int: [lo, hi]``
(``step``), ``boolean: true`` or ``fixed: value``, with an optional ``default``. Hyperparameters
left out keep their default (``pipeline.hparams.DEFAULTS``), so an empty space is the baseline.
The file is read strictly (``read_yaml``): a key given twice is an error, ``1e-3`` is a number.
The same fields give ``tlsweep sweep`` its overriding flags (``--max-trials``, ``--tuner``, ...).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationInfo, model_validator
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from pipeline.errors import UserError
from pipeline.hparams import DEFAULTS, FINE_TUNE_ONLY, MixedPrecision, Seed, Switch
from pipeline.settings import Whole, checked, flag

SWEEPS_DIR = Path(__file__).resolve().parent
TUNERS = ("random", "bayesian", "tpe", "hyperband", "grid")
# Which trials log a SavedModel + pyfunc model: every trial; a trial that beats those before it; or
# none ("best": trials log their checkpoint, a few KB for a head, and best-export exports the winner).
LOG_MODELS = ("all", "improving", "best")
# Where a trial runs: "fresh" = its own process, whose memory is all given back when it exits
# (TensorFlow keeps some of every model built in a process); "same" = the sweep's process;
# "auto" = a fresh process for trials that train the whole network (fine-tuning, augmentation, features
# not cached yet), the sweep's process for heads on cached features.
TRIAL_PROCESSES = ("auto", "fresh", "same")
# Stop trials clearly behind the earlier ones (pipeline.pruning): `prune: false`, `prune: true` (these defaults)
# or a mapping of PRUNE_KEYS. ``head: false`` compares fine-tuning epochs only: a head on cached features costs
# seconds, and a slow head (a low learning rate) is no sign of a bad trial; absent means true (it names no default so
# that a saved search's settings stay as they were).
PRUNE_DEFAULTS = {"rule": "median", "min_trials": 3, "warmup_epochs": 2}
PRUNE_KEYS = (*PRUNE_DEFAULTS, "head")
PRUNE_RULES = ("median",)  # pipeline.pruning's
ENSEMBLE_DEFAULT = 5  # `ensemble: true`
MAX_TRIALS = 10_000  # more is a typo (weeks of trials at minutes each), not a plan
TFLITE_MODES = ("float16", "dynamic")  # best-export's TFLite options
KINDS = ("choice", "float", "int", "boolean", "fixed")
ENTRY_KEYS = (*KINDS, "default", "sampling", "step")
SAMPLINGS = ("linear", "log", "reverse_log")  # Keras Tuner's
OBJECTIVES = ("val_accuracy",)
NAME_PUNCTUATION = "-_. "  # experiment names: letters, digits and these (they name folders)
# Local copies of tfds data sets use their tfds sweep.
DATASET_ALIASES = {"flower_photos": "tf_flowers", "cats_and_dogs_filtered": "cats_vs_dogs", "PetImages": "cats_vs_dogs"}
COMMAND_LINE = "the command line"


def _where(info: ValidationInfo) -> str:
    """Where the value was given, e.g. "sweep quick.yaml" (``pipeline.settings.checked``'s context)."""
    return (info.context or {}).get("where", "")


def _source(info: ValidationInfo) -> str:
    """The sweep file (or "the command line")."""
    return (info.context or {}).get("source", "")


def _empty(value: Any) -> Any:
    """A key written with nothing after it (``stage2:``) is an empty mapping."""
    return {} if value is None else value


def _check_space(space: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    for hp, entry in space.items():
        _check_entry(hp, entry, _source(info))
    return space


def _check_stage2_space(space: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    for hp in space:
        if hp not in FINE_TUNE_ONLY:
            raise UserError(f"stage2 of sweep {_source(info)} searches {hp!r}; it searches only {', '.join(FINE_TUNE_ONLY)}")
    return space


def _prune(value: Any, info: ValidationInfo) -> dict[str, Any] | None:
    return check_prune(value, _source(info))


def _ensemble(value: Any) -> Any:
    return (ENSEMBLE_DEFAULT if value else 0) if isinstance(value, bool) else value


def _not_one(value: int) -> int:
    if value == 1:
        raise ValueError("an ensemble of one trial is that trial")
    return value


Space = Annotated[dict[str, Any], BeforeValidator(_empty), AfterValidator(_check_space)]


class Hyperband(TypedDict, total=False):
    """Keras Tuner's Hyperband brackets (tuner: hyperband)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    max_epochs: Annotated[Whole, Field(ge=1)]
    factor: Annotated[Whole, Field(ge=2)]
    iterations: Annotated[Whole, Field(ge=1)]


class Stage2(TypedDict, total=False):
    """A staged search's stage 2: fine-tune the top_k stage-1 trials, trials_per_config trials each."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    top_k: Annotated[Whole, Field(ge=1)]
    trials_per_config: Annotated[Whole, Field(ge=1)]
    space: Annotated[Space, AfterValidator(_check_stage2_space)]


@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class SweepConfig:
    """A sweep file, checked: its keys are these fields (up to ``name`` and ``source``), in this order."""

    tuner: Annotated[Literal[TUNERS], Field(description="the search (overrides the sweep file's tuner)", json_schema_extra={
        "refused": "unknown tuner {value!r} in {source}; known tuners: {choices}"})] = "bayesian"
    max_trials: Annotated[Whole, Field(ge=1, le=MAX_TRIALS, description="trials to run in all (a rerun continues "
                                       "to this many; overrides the sweep file's)")] = 10
    objective: Annotated[Literal[OBJECTIVES], Field(json_schema_extra={
        "refused": "objective {value!r}{in_where} is not supported; use one of {choice_list}"})] = "val_accuracy"
    seed: Seed = 42
    space: Space = dataclasses.field(default_factory=dict)
    hyperband: Annotated[Hyperband, BeforeValidator(_empty)] = dataclasses.field(default_factory=dict)
    description: str = ""
    max_consecutive_failed_trials: Annotated[Whole, Field(ge=1)] = 3
    log_models: Annotated[Literal[LOG_MODELS], Field(
        description="log the SavedModel + pyfunc model of every trial (all, the default: any trial of the "
        "comparison can be served or exported); only of trials that match the best so far within the validation "
        "split's noise (improving: those the selection rule may choose); or none, trials keeping a checkpoint that "
        "best-export turns into the SavedModel of the winner (best, fastest). Each trial exports in its own process; "
        "overrides the sweep file's")] = "all"
    mixed_precision: MixedPrecision = "auto"  # resolved by each trial on its device
    xla: Annotated[Switch, Field(description="XLA-compiled training steps, for GPUs")] = False
    # Staged search: stage 1 sweeps heads only; stage 2 fine-tunes the top_k stage-1 trials from their
    # trained heads, trials_per_config trials each over its own space (fine_tune_at, learning rate, ...).
    stage2: Annotated[Stage2, BeforeValidator(_empty)] = dataclasses.field(default_factory=dict)
    trial_process: Annotated[Literal[TRIAL_PROCESSES], Field(
        description="where trials run: auto runs a trial that trains the whole network (fine-tuning, "
        "augmentation, features not cached yet) in a fresh process, whose memory is all returned when it ends, "
        "and heads on cached features in the sweep's process; fresh: every trial in its own process; same: all "
        "in the sweep's process; overrides the sweep file's", json_schema_extra={
            "refused": "trial_process {value!r} in {source} is not one of {choices} (auto: a fresh process for "
                       "trials that train the whole network)"})] = "auto"
    prune: Annotated[Optional[dict[str, Any]], BeforeValidator(_prune)] = None  # PRUNE_KEYS, or None: no pruning
    # After the search: an ensemble of up to this many picks of the trials with a logged model, chosen greedily on
    # validation (sweeps.ensemble); kept only when it beats the best trial there. 0: none (on in the shipped sweeps).
    ensemble: Annotated[Whole, BeforeValidator(_ensemble), Field(ge=0), AfterValidator(_not_one), Field(
        json_schema_extra={"expected": "true, false or the most trials an ensemble picks (a whole number >= 2, or "
                                       "0 for none)"})] = 0
    name: str
    source: str = ""

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "SweepConfig":
        """Settings that contradict each other, in what the user wrote (the stages then set fine_tune themselves)."""
        if info.context is None:  # dataclasses.replace in the sweep's own code
            return self
        if self.prune and self.tuner == "hyperband":
            raise UserError(f"prune in {_where(info)} does not apply to tuner: hyperband, which stops trials itself; "
                            "set prune: false")
        unused = [k for k in ("fine_tune", *FINE_TUNE_ONLY) if k in self.space]
        if self.stage2 and unused:
            moved = [k for k in unused if k != "fine_tune"]
            raise UserError(
                f"the space of {_where(info)} sets {', '.join(unused)}, which a staged search does not use: stage 1 "
                "trains heads only and stage 2 fine-tunes over stage2's space; "
                + (f"move {', '.join(moved)} under stage2: space:" if moved else "")
                + (" and " if moved and "fine_tune" in unused else "")
                + ("remove fine_tune (the stages set it)" if "fine_tune" in unused else ""))
        return self

    def with_overrides(self, **overrides: Any) -> "SweepConfig":
        """Command-line overrides (--max-trials, --tuner, --seed, ...); None means not given."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("tuner") == "hyperband":  # Hyperband stops trials itself, by its brackets
            given["prune"] = False
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return checked(SweepConfig, {**values, **given}, name=flag, context={"source": COMMAND_LINE})


YAML_KEYS = tuple(f.name for f in dataclasses.fields(SweepConfig) if f.name not in ("name", "source"))
OVERRIDES = ("max_trials", "tuner", "seed", "log_models", "trial_process", "mixed_precision")  # sweep's own flags


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key given twice in one mapping is an error (PyYAML keeps the last one
    silently), and ``1e-3`` is a number as in YAML 1.2 (PyYAML's YAML 1.1 reads it as text)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(key, (str, int, float)) and key in seen:
                raise yaml.MarkedYAMLError(problem=f"key {key!r} is given twice, on line {seen[key]} and line {line} "
                                           "(the second would silently win); keep one")
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(  # a number with an exponent and no dot: 1e-3, 5E+2
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """YAML read strictly (``_StrictLoader``, a ``SafeLoader``)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506


def load_sweep(name_or_path: str) -> SweepConfig:
    path = resolve_path(name_or_path)
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"sweep file {path} is not valid YAML: {' '.join(str(e).split())}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"sweep file {path} cannot be read as text ({e}); give a YAML file such as "
                        f"{SWEEPS_DIR / 'quick.yaml'}") from e
    if not isinstance(raw, dict):
        raise UserError(f"sweep file {path} must be a mapping with keys {', '.join(YAML_KEYS)}")
    return parse_sweep(raw, name=path.stem, source=str(path))


def parse_sweep(raw: dict, name: str, source: str = "") -> SweepConfig:
    """A sweep file's mapping checked into a ``SweepConfig``: one line per problem, naming the key and the file."""
    where = source or name
    unknown = sorted(set(raw) - set(YAML_KEYS), key=str)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in sweep {where}; known keys: {', '.join(YAML_KEYS)}")
    return checked(SweepConfig, {**raw, "name": name, "source": source}, where=f"sweep {where}",
                   context={"source": where})


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
    if settings["rule"] not in PRUNE_RULES:
        raise UserError(f"prune rule {settings['rule']!r} in sweep {where} is not one of {', '.join(PRUNE_RULES)}")
    for key, low in (("min_trials", 1), ("warmup_epochs", 0)):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserError(f"prune {key} in sweep {where} must be a whole number >= {low}, got {v!r}")
    if not isinstance(settings.get("head", True), bool):
        raise UserError(f"prune head in sweep {where} must be true (prune head epochs too) or false (fine-tuning "
                        f"epochs only), got {settings['head']!r}")
    return settings


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
