"""A sweep's state folder belongs to one search: one space, one seed, one data set and split, one store, one process
at a time.

Keras Tuner reloads its saved state whatever the sweep file says now, so an edited space would be
ignored without a word, a different folder with the same name would join the old search, a changed
split would rank trials scored on different validation sets in one leaderboard, and state whose
MLflow store was wiped would "resume" into nothing. ``SweepState`` records what the search was
started with (``tlsweep-search.json`` beside Keras Tuner's own folder) and refuses, with what to do,
anything that does not match, naming what changed (the sweep file, the seed, the split, the data);
its lock keeps a second process off the same search. The experiment's state folder is marked as
tlsweep's (``pipeline.safepath``): a folder of the user's is never written into.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any, Iterator

from pipeline import safepath
from pipeline.errors import UserError, typed
from sweeps.config import SweepConfig

ON_CHANGE = ("error", "continue", "restart")  # what a changed space or data set does
SEARCH_FILE = "tlsweep-search.json"
STATE_FIX = "--state-dir (the state goes to <state dir>/<experiment>)"
STOPPED_FILE = "tlsweep-stopped.json"


def check_places(dataset: str, state_dir: str, experiment: str, tracking_uri: str | None = None) -> None:
    """Before any work: the sweep's state folder (``<state_dir>/<experiment>``) and the caches can be folders and
    are tlsweep's (or new), and neither they nor the tracking store lie inside the data set."""
    from tracking import store

    safepath.check_name(experiment, "experiment name", typed("--experiment", "EXPERIMENT="))
    folder = safepath.check_own(Path(state_dir) / experiment, safepath.STATE, STATE_FIX)
    safepath.check_caches()
    safepath.check_outside_data(dataset, {"the sweep state": folder, **store.local_places(tracking_uri)})


def search_identity(config: SweepConfig) -> dict[str, Any]:
    """What makes a search the same search: everything Keras Tuner saves of it (not max_trials: raising it extends)."""
    return {"tuner": config.tuner, "objective": config.objective, "seed": config.seed, "space": config.space,
            "hyperband": config.hyperband, "stage2": config.stage2}


def data_identity(dataset: str, split: str | None, seed: int) -> dict[str, Any]:
    """A cheap identity of the data a search runs on: every file's path (relative to the folder) and size, or the
    tfds name; the split and seed. Moving or copying the folder keeps it; adding, removing or changing a file not."""
    path = Path(dataset).expanduser()
    if not path.is_dir():
        return {"dataset": dataset, "split": split, "seed": seed, "files": None, "digest": dataset}
    digest, count = hashlib.sha256(), 0
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            file = Path(folder) / name
            size = file.stat().st_size if file.exists() else -1  # a dangling link: the loader skips and names it
            digest.update(f"{file.relative_to(path)}\0{size}\n".encode())
            count += 1
    return {"dataset": str(path.resolve()), "split": split, "seed": seed, "files": count,
            "digest": digest.hexdigest()[:16]}


class SweepState:
    """The state folder of one sweep (``<state dir>/<experiment>/<sweep>``): lock, identity, what to do on change."""

    def __init__(self, directory: str | Path, config: SweepConfig, dataset: str, split: str | None):
        self.directory = Path(directory)
        self.config = config
        self.folder = self.directory / config.name  # Keras Tuner's project folder
        self.search = search_identity(config)
        self.data = data_identity(dataset, split, config.seed)
        self._lock: IO[str] | None = None

    # -- one process at a time ----------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the sweep's lock (released when the process ends, even by ``kill -9``)."""
        path = self.directory / f"{self.config.name}.lock"
        safepath.make_dir(self.directory, safepath.STATE)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"sweep {self.config.name!r} in {self.directory} is already running ({holder}); wait for it to end, "
                "or share the search with it as workers "
                f"({typed('--role chief / --role worker', 'make sweep-chief / make sweep-worker')})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    # -- the same search ----------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """Keras Tuner has saved state for this search."""
        return (self.folder / "oracle.json").is_file()

    def trials_saved(self) -> int:
        return len([p for p in self.folder.glob("trial_*") if p.is_dir()]) if self.exists else 0

    def check(self, on_change: str = "error") -> tuple[str | None, SweepConfig]:
        """Compare the saved search with this one. Returns a line to print (or None) and the configuration to
        run: the saved search's with ``on_change="continue"``, this one otherwise (``on_change="restart"``
        moves a changed search's state aside first). Anything else changed is a ``UserError``."""
        if on_change not in ON_CHANGE:
            raise UserError(f"--on-change {on_change!r} is not one of {', '.join(ON_CHANGE)}")
        saved_path = self.folder / SEARCH_FILE
        if not self.exists or not saved_path.is_file():  # a new search, or state from before this check: adopt it
            self._write()
            return None, self.config
        saved = json.loads(saved_path.read_text())
        old_search, old_data = saved.get("search", {}), saved.get("data", {})
        changes = _differences({k: v for k, v in old_search.items() if k != "seed"},
                               {k: v for k, v in self.search.items() if k != "seed"}, "")
        seed_changed = "seed" in old_search and old_search["seed"] != self.search["seed"]
        split_changed = "split" in old_data and _split(old_data["split"]) != _split(self.data["split"])
        data_changed = old_data.get("digest") != self.data["digest"]
        if not (changes or seed_changed or split_changed or data_changed):
            self._check_not_stopped()
            return None, self.config
        what = []
        if changes:
            what.append(f"the sweep file {self.config.source or self.config.name} changed since this search started "
                        f"({'; '.join(changes[:4])}{'; …' if len(changes) > 4 else ''})")
        if seed_changed:
            what.append(f"the seed changed since this search started (then {old_search['seed']}, now "
                        f"{self.search['seed']}: {typed('--seed', 'SEED=')} or the sweep file's seed)")
        if split_changed:  # other validation images: its trials' scores would not compare with the saved ones
            what.append(f"the split changed since this search started (then {_split(old_data['split'])}, now "
                        f"{_split(self.data['split'])}: {typed('--split', 'SPLIT=')})")
        if data_changed:
            what.append(f"the data set is not the one this search ran on (then {old_data.get('dataset')}: "
                        f"{old_data.get('files')} files, identity {old_data.get('digest')}; now "
                        f"{self.data['dataset']}: {self.data['files']} files, identity {self.data['digest']})")
        same_data = not (data_changed or split_changed)
        if on_change == "continue" and same_data:
            saved_config = dataclasses.replace(self.config, **saved["search"])
            return (f"{' and '.join(what)}; continuing the search as it was saved "
                    f"({typed('--on-change continue', 'ON_CHANGE=continue')})", saved_config)
        if on_change == "restart":
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.folder.with_name(f"{self.folder.name}.replaced-{stamp}")
            for folder in [self.folder, *self.directory.glob(f"{self.config.name}-stage2-*")]:
                if ".replaced-" not in folder.name:
                    shutil.move(str(folder), folder.with_name(f"{folder.name}.replaced-{stamp}"))
            self._write()
            return (f"{' and '.join(what)}; the old search's state moved to {aside}, a new search starts "
                    f"({typed('--on-change restart', 'ON_CHANGE=restart')})", self.config)
        hint = (f"{typed('--on-change continue', 'ON_CHANGE=continue')} runs the saved search as it was, "
                if same_data else "")
        raise UserError(
            f"{' and '.join(what)}. Keras Tuner would silently run the saved search. Choose: {hint}"
            f"{typed('--on-change restart', 'ON_CHANGE=restart')} starts a new search in this experiment (the old "
            f"runs stay in MLflow), or give {typed('--experiment <another name>', 'EXPERIMENT=<another name>')} for a "
            "search of its own")

    def stopped(self, failures: int, last_error: str) -> None:
        """Record that Keras Tuner stopped this search after ``failures`` failed trials in a row. Its state then
        holds the last of them as running, so resumed as it is, it would rerun it and stop again at once."""
        (self.folder / STOPPED_FILE).write_text(json.dumps({"failures": failures, "last_error": last_error}))

    def _check_not_stopped(self) -> None:
        path = self.folder / STOPPED_FILE
        if not path.is_file():
            return
        stopped = json.loads(path.read_text())
        if self.config.max_consecutive_failed_trials > stopped["failures"]:
            path.unlink()  # the user raised the limit: the search goes on
            return
        raise UserError(
            f"this search stopped after {stopped['failures']} trials failed in a row (last error: "
            f"{stopped['last_error']}); run as it is, it would stop again at once. Fix the space in "
            f"{self.config.source or self.config.name} and run again with "
            f"{typed('--on-change restart', 'ON_CHANGE=restart')}, or raise max_consecutive_failed_trials")

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{SEARCH_FILE}.tmp"
        tmp.write_text(json.dumps({"search": self.search, "data": self.data}, indent=1, sort_keys=True, default=str))
        os.replace(tmp, self.folder / SEARCH_FILE)


def _split(spec: str | None) -> str:
    """A split as the user gave it, spaces aside; ``default`` when none was given."""
    return "".join(str(spec).split()) if spec not in (None, "") else "default"


def _differences(old: Any, new: Any, where: str) -> list[str]:
    """Readable differences between two JSON-like values (``space.dropout.float: [0, 0.5] -> [0, 0.3]``)."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in old:
                out.append(f"{path} added")
            elif key not in new:
                out.append(f"{path} removed")
            else:
                out += _differences(old[key], new[key], path)
        return out
    return [] if old == new else [f"{where}: {json.dumps(old)} -> {json.dumps(new)}"]
