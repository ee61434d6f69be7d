"""Typed settings, declared once: the fields of the sweep file, the command line and the ``TLSWEEP_*`` environment.

Each setting is a typed field (pydantic) with its description, its bounds or choices and its default. The
checks live in those declarations; ``checked`` turns pydantic's errors into one ``UserError`` line per problem
that names the key, flag or variable, what was given and what is expected (pydantic's own text never reaches
the user). ``add_options`` builds argparse options from the same fields, so a new field gets its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, Union

import annotated_types
import typing_extensions
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic.types import AllowInfNan
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import UserError

ENV_PREFIX = "TLSWEEP_"


def _not_bool(value: Any) -> Any:
    """YAML's ``true`` is not the number 1 (pydantic's lax mode would take it as one)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


Whole = Annotated[int, BeforeValidator(_not_bool)]  # 10, 10.0 and "10" are 10; 2.5 and true are refused
Number = Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]  # "1e-3" is 0.001; nan and inf refused
Seconds = Annotated[float, AllowInfNan(False)]


def fields_of(kind: Any) -> dict[str, FieldInfo]:
    """The declared fields of a pydantic model, a (stdlib or pydantic) dataclass or a TypedDict, in order."""
    if hasattr(kind, "model_fields"):
        return dict(kind.model_fields)
    if getattr(kind, "__pydantic_fields__", None) is not None:
        return dict(kind.__pydantic_fields__)
    hints = typing.get_type_hints(kind, include_extras=True)
    if dataclasses.is_dataclass(kind):
        return {f.name: FieldInfo.from_annotated_attribute(
            hints[f.name], f.default if f.default is not dataclasses.MISSING else ...) for f in dataclasses.fields(kind)}
    return {name: FieldInfo.from_annotation(hint) for name, hint in hints.items()}


def _bare(annotation: Any) -> Any:
    """The type under ``Annotated[...]`` and ``X | None``; a union of several types stays a union."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return _bare(args[0])
    return annotation


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def choices(field: FieldInfo) -> tuple[Any, ...] | None:
    """The values a ``Literal`` field takes, else None."""
    bare = _bare(field.annotation)
    return typing.get_args(bare) if typing.get_origin(bare) is Literal else None


def expected(field: FieldInfo, crossed: str = "") -> str:
    """What a field takes, in words: ``a whole number >= 1``, ``a number >= 0 and < 1``, ``true or false``. An ``le``
    bound is a sanity cap (``max_trials``, ``seed``): said only when ``crossed`` (pydantic's error type) is it."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "expected" in extra:
        return str(extra["expected"])
    bare = _bare(field.annotation)
    if typing_extensions.is_typeddict(bare) or hasattr(bare, "model_fields"):
        return "a mapping with keys " + ", ".join(fields_of(bare))
    if typing.get_origin(bare) is dict:
        return "a mapping"
    if choices(field):
        return "one of " + ", ".join(map(str, choices(field)))
    words = {bool: "true or false", int: "a whole number", float: "a number", Path: "a path"}.get(bare, "text")
    bounds = {}
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                bounds[attr] = f"{sign} {_number(getattr(item, attr))}"
    if crossed == "less_than_equal":
        bounds = {"le": bounds["le"]}
    else:
        bounds.pop("le", None)
    return " ".join([words, " and ".join(bounds.values())]).strip()


def _kind_at(kind: Any, loc: tuple) -> Any:
    """The declared type of the value at ``loc`` in ``kind`` (mapping keys skipped), or None."""
    for part in loc:
        bare = _bare(kind)
        if typing.get_origin(bare) is dict:
            kind = typing.get_args(bare)[1]
            continue
        try:
            field = fields_of(bare).get(str(part))
        except (TypeError, NameError):
            return None
        if field is None:
            return None
        kind = field.annotation
    return kind


def _field_at(kind: Any, loc: tuple) -> FieldInfo | None:
    """The declaration of the value at ``loc``, or None."""
    parent = _bare(_kind_at(kind, loc[:-1])) if loc else None
    try:
        return fields_of(parent).get(str(loc[-1])) if parent is not None else None
    except (TypeError, NameError):
        return None


def problems(error: ValidationError, kind: Any, where: str = "", name: Callable[[str], str] = str,
             source: str = "") -> list[str]:
    """One line per problem of ``error`` (the validation of ``kind``): the key (as ``name`` shows it, e.g. a flag),
    where it was given, what is expected and what was given. A validator's ``UserError`` is its own line; a field
    may word its refusal itself (``json_schema_extra={"refused": ...}``)."""
    lines: list[str] = []
    unknown: dict[tuple, list[str]] = {}
    for e in error.errors(include_url=False):
        cause = (e.get("ctx") or {}).get("error")
        loc = tuple(p for p in e["loc"] if not isinstance(p, int))
        place = where + (f" ({' '.join(map(str, loc[:-1]))})" if len(loc) > 1 else "")
        if isinstance(cause, UserError):
            lines.append(str(cause))
        elif e["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        else:
            field = _field_at(kind, loc)
            extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
            options = choices(field) if field is not None else None
            template = extra.get("refused") or ("{key} {value!r}{in_where} is not one of {choices}" if options else
                                                "{key}{in_where} must be {expected}, got {value!r}")
            if e["type"] == "missing":
                template = "{key} is missing{in_where}"
            lines.append(template.format(
                key=name(str(loc[-1])) if loc else "value", value=e.get("input"), source=source,
                expected=expected(field, e["type"]) if field is not None else e["msg"][0].lower() + e["msg"][1:],
                in_where=f" in {place}" if place else "", choices=", ".join(map(str, options or ())),
                choice_list=list(options or ())))
    for parent, keys in unknown.items():
        known = ", ".join(fields_of(_bare(_kind_at(kind, parent))))
        place = where + (f" ({' '.join(map(str, parent))})" if parent else "")
        lines.append(f"unknown key(s) {keys} in {place or 'the settings'}; known keys: {known}")
    return list(dict.fromkeys(lines))


def checked(kind: Any, data: Mapping[str, Any], where: str = "", name: Callable[[str], str] = str,
            context: Mapping[str, Any] | None = None) -> Any:
    """``data`` validated into ``kind``, or a ``UserError`` with one line per problem (``problems``). ``context``
    reaches validators (``where``: e.g. "sweep quick.yaml"; ``source``: the file or "the command line")."""
    context = {"where": where, "source": where, **(context or {})}
    try:
        return _adapter(kind).validate_python(dict(data), context=context)
    except ValidationError as e:
        raise UserError("\n".join(problems(e, kind, where, name, context["source"]))) from None


@functools.lru_cache(maxsize=None)
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


# -- the command line, built from the declarations --

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_bool(text: str) -> bool:
    """``true``/``false`` (and 1/0, yes/no, on/off) of a flag that takes a value."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_options(parser: argparse.ArgumentParser, kind: Any, *, only: Iterable[str] | None = None,
                skip: Iterable[str] = (), defaults: Mapping[str, Any] | None = None, switches: bool = True) -> None:
    """One option per field of ``kind``: its flag, type, choices, default and help from its declaration.

    ``switches``: a bool field is a bare flag (``--quiet``); otherwise it takes true/false (``--augment true``).
    ``defaults`` overrides declared defaults (None: "not given", e.g. a sweep file's value stays).
    """
    fields = fields_of(kind)
    names = [n for n in (only if only is not None else fields) if n not in set(skip)]
    for name in names:
        field = fields[name]
        bare = _bare(field.annotation)
        default = (defaults or {}).get(name, None if field.is_required() else field.get_default(call_default_factory=True))
        text = (field.description or "").replace("%", "%%")
        options: dict[str, Any] = {"dest": name, "default": default}
        if field.is_required() and name not in (defaults or {}):
            options["required"] = True
        if bare is bool and switches:
            options["action"] = "store_true"
        else:
            if bare is bool:
                options.update(type=parse_bool, metavar="true|false")
            elif choices(field):
                options["choices"] = choices(field)
            elif bare in (int, float):
                options["type"] = bare
            if default not in (None, "", False):
                text += f" (default: {default})".replace("%", "%%")
        parser.add_argument(flag(name), help=text or None, **options)


class Options(BaseModel):
    """A command's own options, one flag per field (``add_options``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def of(cls, args: argparse.Namespace) -> Any:
        """The parsed flags checked against the declarations: one line per bad flag, naming it."""
        return checked(cls, {k: v for k, v in vars(args).items() if k in cls.model_fields}, name=flag)


def to_argv(values: Mapping[str, Any]) -> list[str]:
    """``values`` as flags again (for a child ``tlsweep``): None and False left out, True a bare flag."""
    argv: list[str] = []
    for name, value in values.items():
        if value is not None and value is not False:
            argv += [flag(name)] if value is True else [flag(name), str(value)]
    return argv


# -- the environment --

ABOVE_0 = {"expected": "a number of seconds above 0"}


class Environment(BaseSettings):
    """The ``TLSWEEP_*`` environment variables; an empty one means unset."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    cache: Path = Field(Path.home() / ".cache" / "tlsweep", description="converted weights, frozen features, "
                        "cut activations and decoded images (a folder each)")
    store_wait: Seconds = Field(600.0, gt=0, description="seconds to wait for a tracking server that stopped "
                                "answering before the sweep stops", json_schema_extra=ABOVE_0)
    heartbeat_seconds: Seconds = Field(30.0, gt=0, description="a distributed worker stamps its trial's run this "
                                       "often", json_schema_extra=ABOVE_0)
    worker_timeout: Seconds = Field(600.0, gt=0, description="the chief requeues the trial of a worker silent this "
                                    "long", json_schema_extra=ABOVE_0)
    chief_timeout: Seconds = Field(600.0, gt=0, description="a worker waits this long for a chief that stopped "
                                   "answering", json_schema_extra=ABOVE_0)
    parent_timeout: Seconds = Field(300.0, gt=0, description="a worker waits this long for the chief's parent run",
                                    json_schema_extra=ABOVE_0)
    system_metrics_seconds: Seconds = Field(5.0, ge=0, description="seconds between system-metrics samples of a "
                                            "trial; 0 turns them off", json_schema_extra={
                                                "expected": "a number of seconds >= 0",
                                                "unset": " (default 5; 0 turns system metrics off)"})

    @field_validator("cache")
    @classmethod
    def _cache_is_a_folder(cls, value: Path) -> Path:
        value = value.expanduser()
        if value.exists() and not value.is_dir():
            raise UserError(f"{ENV_PREFIX}CACHE={str(value)!r} is a file, not a folder; point it at a folder (it "
                            "holds tlsweep's caches) or unset it for ~/.cache/tlsweep")
        return value


def environment() -> Environment:
    """The ``TLSWEEP_*`` settings as they are now (tests and launchers change them), or one line per bad variable:
    ``TLSWEEP_STORE_WAIT='soon' is not a number of seconds above 0; unset it for 600``."""
    try:
        return Environment()
    except ValidationError as error:
        lines = []
        for e in error.errors(include_url=False):
            cause = (e.get("ctx") or {}).get("error")
            if isinstance(cause, UserError):
                lines.append(str(cause))
                continue
            field = Environment.model_fields[str(e["loc"][0])]
            variable = ENV_PREFIX + str(e["loc"][0]).upper()
            unset = field.json_schema_extra.get("unset", f"; unset it for {field.default:g}")
            lines.append(f"{variable}={os.environ.get(variable)!r} is not {expected(field)}{unset}")
        raise UserError("\n".join(lines)) from None
