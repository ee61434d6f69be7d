"""Folders tlsweep writes and may later replace or remove carry a marker; no other folder is ever replaced.

``best-export --export-dir . --overwrite`` once replaced a user's data folder that sat where the export was going
(``./<experiment>``). Every folder tlsweep creates as something it may later replace or empty (an export, a report,
a cache root, a sweep's state folder) now holds a small file ``.tlsweep`` naming its kind, and ``check_replaceable``
refuses, in one line, a folder that is neither empty nor marked as that kind. Folders written before the marker
existed are recognised by their layout alone: exactly what tlsweep writes there and nothing else (an export:
``saved_model.pb`` and ``labels.txt``, plus only the other files an export holds).

``check_path`` refuses, before any work, a path that cannot be a folder: a file where a folder must be, a name longer
than the file system takes (NAME_MAX, 255 bytes on most), a place that cannot be written.

``python -m pipeline.safepath clean-cache`` (``make clean-cache``) empties the caches under ``$TLSWEEP_CACHE``, each
only if it is tlsweep's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError, typed

MARKER = ".tlsweep"
NAME_MAX = 255  # bytes per name, when the file system does not say


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of folder tlsweep writes: its name in the marker, what a message calls it, and how to recognise one
    written before markers existed (``legacy``: the folder's entries -> whether tlsweep wrote exactly these)."""

    name: str
    noun: str
    legacy: Callable[[Path, list[Path]], bool]
    # the entries tlsweep writes in it: a marked folder holding others (a user's notes) is not replaced whole
    own: Callable[[Path], bool] | None = None


EXPORT_NAMES = {"saved_model.pb", "labels.txt", "variables", "assets", "fingerprint.pb", "model.keras",
                "metadata.json", "MODEL_CARD.md", "model.tflite"}


def _export_layout(folder: Path, entries: list[Path]) -> bool:
    names = {p.name for p in entries}
    return ({"saved_model.pb", "labels.txt"} <= names and (folder / "saved_model.pb").is_file()
            and names <= EXPORT_NAMES)


def _report_entry(p: Path) -> bool:
    return p.is_file() and bool(re.fullmatch(r"report\.(html|md)|[\w.-]+\.png", p.name))


def _report_layout(folder: Path, entries: list[Path]) -> bool:
    return "report.html" in {p.name for p in entries} and all(_report_entry(p) for p in entries)


def _state_layout(folder: Path, entries: list[Path]) -> bool:
    """Keras Tuner's project folders, their locks, the GPU launcher's server log."""
    return (any(p.suffix == ".lock" or (p / "oracle.json").is_file() for p in entries)
            and all(p.is_dir() or p.suffix in (".lock", ".log") for p in entries))


def _cache_layout(folder: Path, entries: list[Path]) -> bool:
    """Entries named by their key (hex), and the temporary names they are written under."""
    return all(re.fullmatch(r"\.?[0-9a-f]{16,64}(\.\d+\.tmp)?(\.npz)?", p.name) for p in entries)


EXPORT = Kind("export", "export", _export_layout, lambda p: p.name in EXPORT_NAMES)
REPORT = Kind("report", "report folder", _report_layout, _report_entry)
STATE = Kind("state", "sweep state folder", _state_layout)
CACHE = Kind("cache", "cache", _cache_layout)
KINDS = {k.name: k for k in (EXPORT, REPORT, STATE, CACHE)}


# -- paths that can be folders -------------------------------------------------------------------


def check_path(path: str | os.PathLike, noun: str, fix: str) -> Path:
    """``path`` can be made a folder and written: none of it is a file, no name in it is longer than its file
    system takes, and the nearest existing folder is writable. ``noun`` names it, ``fix`` says how to give another
    (``--export-dir``). Returns it."""
    path = Path(path).expanduser()
    where = Path(os.path.abspath(path))
    existing = where
    while not os.path.exists(existing) and existing != existing.parent:  # os.path: a name too long is not an error
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file, not a folder" if existing == where else f"cannot be made: {existing} is a file"
        raise UserError(f"{noun} {path} {what}; give {fix} another path, or move the file away")
    limit = _name_max(existing)
    for name in where.relative_to(existing).parts:
        size = len(os.fsencode(name))
        if size > limit:
            shown = name if len(name) <= 60 else f"{name[:40]}…{name[-12:]}"
            raise UserError(f"{noun} path has a name of {size} bytes ({shown!r}), and the file system of {existing} "
                            f"takes at most {limit} bytes per name; give {fix} a shorter one")
    if where != existing:
        try:  # tried, not asked (os.access): root may "write" where the file system refuses new folders (/proc)
            tempfile.TemporaryDirectory(prefix=".tlsweep-check-", dir=existing).cleanup()
        except OSError as e:
            raise UserError(f"{noun} {path} cannot be made: no folder can be made in {existing} ({e.strerror}); give "
                            f"{fix} a folder you can write to") from None
    return path


def check_name(name: str, noun: str, fix: str) -> str:
    """``name`` fits as one folder name (at most NAME_MAX bytes): an experiment's name names its state, export and
    report folders."""
    size = len(os.fsencode(name))
    if size > NAME_MAX:
        shown = f"{name[:40]}…{name[-12:]}"
        raise UserError(f"{noun} {shown!r} is {size} bytes long; it names folders, and a folder name may be at most "
                        f"{NAME_MAX} bytes; give {fix} a shorter name")
    return name


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


# -- whose folder is it -----------------------------------------------------------------------------


def marked_kind(folder: Path) -> str | None:
    """The kind in ``folder``'s marker, or None when it has none."""
    try:
        return (folder / MARKER).read_text().split("\n", 1)[0].strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def mark(folder: str | os.PathLike, kind: Kind) -> None:
    """Say in ``folder`` that tlsweep wrote it as ``kind`` (and so may replace it)."""
    (Path(folder) / MARKER).write_text(
        f"{kind.name}\nWritten by tlsweep as its {kind.noun}: tlsweep may replace or empty this folder. Delete this "
        "file and tlsweep will never replace it.\n")


def owner(folder: Path, kind: Kind) -> str:
    """``absent``, ``empty``, ``ours`` (marked as ``kind``, or laid out as tlsweep wrote one before markers),
    ``added`` (marked, with entries tlsweep does not write there), or ``other``."""
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        return "other"
    entries = [p for p in folder.iterdir() if p.name != MARKER]
    marked = marked_kind(folder)
    if not entries and marked in (None, kind.name):
        return "empty"
    if marked == kind.name and kind.own is not None and not all(kind.own(p) for p in entries):
        return "added"  # tlsweep's, with files of the user's added
    if marked == kind.name or (marked is None and entries and kind.legacy(folder, entries)):
        return "ours"
    return "other"


def describe(folder: Path) -> str:
    """What is in ``folder``, in a few words: ``36 entries (a.jpg, b.jpg, c/, …)`` or tlsweep's kind."""
    marked = marked_kind(folder)
    if marked in KINDS:
        return f"tlsweep's {KINDS[marked].noun}"
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:3])
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown}{', …' if len(entries) > 3 else ''})"


def check_replaceable(path: str | os.PathLike, kind: Kind, fix: str, overwrite: bool | None = None) -> bool:
    """Before writing ``kind`` to ``path``: it is absent or empty, or it is tlsweep's own ``kind`` and
    ``overwrite`` allows replacing it (``None``: a kind replaced without asking, such as a report). Anything else
    is a ``UserError`` naming the folder, what is in it and what to do. Returns whether something is there to
    replace. Checks ``check_path`` first."""
    path = check_path(path, kind.noun, fix)
    state = owner(path, kind)
    if state in ("absent", "empty"):
        return False
    flag = typed("--overwrite", "OVERWRITE=1")
    if state == "added":
        added = sorted(p.name for p in path.iterdir() if p.name != MARKER and not kind.own(p))
        raise UserError(f"{kind.noun} {path} is tlsweep's, but holds files tlsweep did not write ({', '.join(added[:3])}"
                        f"{', …' if len(added) > 3 else ''}), which replacing it would delete, even with {flag}. Move "
                        f"them out of it, or give {fix} another folder")
    if state == "ours":
        if overwrite is False:
            raise UserError(f"{kind.noun} {path} already exists (tlsweep's {kind.noun}); pass {flag} to replace it, "
                            f"or give {fix} another folder")
        return True
    never = f", even with {flag}" if overwrite is not None else ""
    raise UserError(f"{path} already exists and is not tlsweep's {kind.noun}: it holds {describe(path)} and no "
                    f"{MARKER} marker; tlsweep replaces only what it wrote itself{never}. Give {fix} a new or empty "
                    "folder")


def check_own(path: str | os.PathLike, kind: Kind, fix: str) -> Path:
    """Before writing into ``path`` as ``kind`` (a sweep's state, a cache): ``check_path``, and it is tlsweep's own
    ``kind`` or not there yet (or empty); a folder of the user's is refused in one line."""
    path = check_path(path, kind.noun, fix)
    if owner(path, kind) == "other":
        raise UserError(f"{kind.noun} {path} is not tlsweep's: it holds {describe(path)} and no {MARKER} marker; "
                        f"give {fix} another folder")
    return path


def replace_dir(new: str | os.PathLike, target: str | os.PathLike, kind: Kind) -> Path:
    """Put the folder ``new`` (marked here) in place of ``target``, which ``check_replaceable`` allowed: an old
    ``target`` is moved aside first and removed last, so there is never a moment without one of them."""
    new, target = Path(new), Path(target)
    mark(new, kind)
    if owner(target, kind) not in ("absent", "empty", "ours"):  # it changed since the check: refuse, never remove
        raise UserError(f"{target} changed while tlsweep was writing it and is not tlsweep's {kind.noun} any more "
                        f"({describe(target)}); nothing was replaced")
    aside = None
    if target.exists():
        aside = target.with_name(f".tlsweep-replaced-{os.getpid()}-{id(new):x}")  # short: any name fits
        os.replace(target, aside)
    os.replace(new, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def make_dir(path: str | os.PathLike, kind: Kind) -> Path:
    """``path`` as a folder of ``kind``, made (with its parents) and marked if new; an existing folder is marked only
    if it is empty or tlsweep's already (never a user's folder)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if marked_kind(path) is None and owner(path, kind) in ("empty", "ours"):
        mark(path, kind)
    return path


# -- tlsweep's outputs are not data ----------------------------------------------------------------

OWN_OUTPUTS = ("mlflow.db", "mlartifacts", "mlruns", "sweeps_state")  # what a sweep writes in its working directory


def check_outside_data(dataset: str, places: dict[str, str | os.PathLike]) -> None:
    """tlsweep never writes into the data set it reads: its files there would be read as a class next time (and
    "removing" them would remove the runs). ``places``: what -> where it would write; both the places and what is
    already in the data folder from an earlier run are checked. A tfds name (no folder) passes."""
    data = Path(dataset).expanduser()
    if not data.is_dir():
        return
    root = data.resolve()
    inside = {Path(os.path.realpath(Path(where).expanduser())): what for what, where in places.items()}
    inside = {where: what for where, what in inside.items() if where == root or root in where.parents}
    earlier = [p for p in sorted(root.iterdir()) if p.resolve() not in inside
               and (p.name in OWN_OUTPUTS or (p.is_dir() and marked_kind(p) in KINDS))]
    found = [f"would hold {', '.join(f'{what} {where}' for where, what in inside.items())}"] if inside else []
    found += [f"holds {', '.join(p.name for p in earlier)} from an earlier run"] if earlier else []
    if found:
        here = " (the working directory)" if root == Path.cwd().resolve() else ""
        raise UserError(
            f"data folder {dataset}{here} {' and '.join(found)}: tlsweep's own outputs, which it must not "
            f"write into the data it reads (a later run would take them for a class). Run tlsweep from another folder "
            f"(e.g. cd {root.parent}; {typed('--dataset ' + root.name, 'DATASET=' + root.name)}), moving any "
            "mlflow.db, mlartifacts/ and sweeps_state/ there with it: they hold your runs, do not delete them")


# -- caches ------------------------------------------------------------------------------------------

CACHES = ("features", "cuts", "images")  # pipeline.features, pipeline.cut, pipeline.image_cache: FEATURES_DIR, ...


def cache_dir() -> Path:
    """Where tlsweep keeps converted weights and its caches: ``$TLSWEEP_CACHE``, default ``~/.cache/tlsweep``."""
    from pipeline.settings import environment

    return environment().cache


def check_caches() -> None:
    """Before any work: every cache root can be a folder and is tlsweep's (or not there yet)."""
    fix = "TLSWEEP_CACHE (where tlsweep keeps its caches)"
    check_path(cache_dir(), "cache folder", fix)
    for name in CACHES:
        check_own(cache_dir() / name, CACHE, fix)


def clean_caches() -> list[str]:
    """Remove each cache root that is tlsweep's; a line per root saying what was done (or why not)."""
    lines = []
    for root in (cache_dir() / name for name in CACHES):
        state = owner(root, CACHE)
        if state == "absent":
            continue
        if state == "other":
            what = describe(root) if root.is_dir() else "a file"
            lines.append(f"kept {root}: it is not tlsweep's cache ({what}, no {MARKER} marker); delete it yourself "
                         "if it is")
            continue
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(root)
        lines.append(f"removed {root} ({size / 1e6:.1f} MB)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.safepath clean-cache``: exit 1 when a root was kept (not tlsweep's)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["clean-cache"]:
        print("usage: python -m pipeline.safepath clean-cache", file=sys.stderr)
        return 2
    lines = clean_caches()
    print("\n".join(lines) or f"no cache under {cache_dir()}")
    return 1 if any(line.startswith("kept") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
