"""``make bench-search``: how good a winner each tuner finds in few trials, over many seeds.

A cheap sweep, repeated: heads on cached frozen features of flower_photos (``pipeline/features.py``; a trial
costs seconds), searched by ``random``, ``bayesian`` and ``tpe`` with the oracles a sweep makes
(``sweeps.tuner.make_oracle``: the default point first) over a head-only space declared as the shipped sweeps
declare theirs (``sweeps.space.define``). Each search drives its oracle through Keras Tuner's Oracle API
(``create_trial`` -> train the head with ``pipeline.recipe`` -> ``update_trial``/``end_trial``), with no
tracking, so that it measures the search and nothing else. The data split is the same for every search (seed
42); a search's seed seeds both its oracle and its trials' training, as ``SEED=`` does in a sweep.

For each tuner and each number of trials in ``--at`` (8, 12 and 24), over ``--seeds`` searches: the winner's
(best validation accuracy among the first n trials, the earliest on ties, as Keras Tuner picks) validation and
test accuracy, their mean, standard deviation, min, median and max. The first n trials of a longer search are
the n-trial search (no oracle here looks at max_trials before it stops), so each search runs max(--at) trials
once. Prints a table and writes ``--out`` (default ``benchmarks/results/<date>-search.md``: machine, commit,
command, figures) and the raw per-trial scores beside it (``.json``, after every search: ``--resume`` carries on
a run that was stopped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flower_photos"
DATA_SEED = 42  # the split every search trains and scores on
TUNERS = ("random", "bayesian", "tpe")
# Head only (fine_tune fixed false), at each backbone's native size. The default point is the baseline run's head;
# each range reaches configurations clearly worse than it (too low or too high a learning rate, too few epochs,
# too much dropout), so that a search has something to find and something to avoid.
SPACE = {
    "backbone": {"choice": ["efficientnet_lite0", "efficientnet_lite2"], "default": "efficientnet_lite0"},
    "fine_tune": {"fixed": False},
    "learning_rate": {"float": [1.0e-5, 1.0e-1], "sampling": "log", "default": 1.0e-3},
    "dropout": {"float": [0.0, 0.8], "step": 0.1, "default": 0.2},
    "epochs": {"int": [1, 30], "default": 10},
    "batch_size": {"choice": [16, 32, 64, 128, 256], "default": 32},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an image folder (default: flower_photos)")
    parser.add_argument("--per-class", type=int, default=0, help="only the first N photos of each class (0: all)")
    parser.add_argument("--seeds", type=int, default=20, help="searches per tuner (seeds 1..N)")
    parser.add_argument("--at", default="8,12,24", help="numbers of trials to report (the longest is run)")
    parser.add_argument("--tuners", default=",".join(TUNERS))
    parser.add_argument("--backbones", default=None, help="comma-separated: replaces the space's backbone choice")
    parser.add_argument("--out", default=None, help="results file (.md; default benchmarks/results/<date>-search.md)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the searches already in the results' .json (same data and space); run the others")
    args = parser.parse_args(argv)
    at = sorted({int(n) for n in args.at.split(",")})
    tuners = args.tuners.split(",")
    space = dict(SPACE)
    if args.backbones:
        names = args.backbones.split(",")
        space["backbone"] = {"choice": names, "default": names[0]} if len(names) > 1 else {"fixed": names[0]}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-search.md")
    raw = out.with_suffix(".json")
    settings = {"data": args.data, "per_class": args.per_class, "space": space}
    scores: dict[str, dict[str, list]] = {tuner: {} for tuner in tuners}
    if args.resume and raw.is_file() and (kept := json.loads(raw.read_text())).get("settings") == settings:
        for tuner in tuners:  # searches already run with these settings are kept, not run again
            scores[tuner].update(kept["scores"].get(tuner, {}))
    load = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = subset(Path(args.data), args.per_class, Path(tmp) / "data") if args.per_class else Path(args.data)
        start = time.perf_counter()
        for seed in range(1, args.seeds + 1):  # seed by seed: a run stopped early still compares like with like
            for tuner in tuners:
                if len(scores[tuner].get(str(seed), [])) >= at[-1]:
                    continue
                folder = Path(tmp) / f"{tuner}-{seed}"
                scores[tuner][str(seed)] = search(tuner, seed, space, str(data_dir), at[-1], folder)
                raw.write_text(json.dumps({"settings": settings, "scores": scores}) + "\n")  # after every search
        minutes = (time.perf_counter() - start) / 60
    rows = summary({t: {s: v for s, v in by.items() if int(s) <= args.seeds} for t, by in scores.items()}, at)
    table = markdown_table(rows)
    print(table)
    command = "python -m benchmarks.bench_search " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(report(table, space, args, command, load, minutes))
    print(f"written: {out} (raw scores: {raw.name})")
    return 0


def subset(source: Path, per_class: int, root: Path) -> Path:
    """The first ``per_class`` images of each class folder of ``source``, linked (never copied) into ``root``."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:per_class]:
            (root / folder.name / photo.name).symlink_to(photo)
    return root


_DATA: dict[tuple[str, int], object] = {}  # (folder, image size) -> DataSplits, decoded once for every search


def search(tuner: str, seed: int, space: dict, dataset: str, trials: int, folder: Path) -> list[list[float | None]]:
    """One search of ``trials`` trials: each trial's [validation, test] accuracy in trial order ([None, None] when
    it failed)."""
    import keras
    import keras_tuner as kt

    from pipeline import recipe
    from pipeline.data import load_data
    from pipeline.errors import UserError
    from pipeline.hparams import RunConfig
    from sweeps import ktpatches
    from sweeps.config import parse_sweep
    from sweeps.tuner import SpaceHyperModel, make_oracle

    config = parse_sweep({"tuner": tuner, "max_trials": trials, "seed": seed, "space": space,
                          "max_consecutive_failed_trials": trials}, f"bench-{tuner}")
    oracle = make_oracle(config)
    ktpatches.standalone(oracle, str(folder), "search")
    oracle.verbose = 0
    hypermodel = SpaceHyperModel(config.space)
    hp = oracle.get_space()
    hypermodel.build(hp)
    oracle.update_space(hp)
    scores: list[list[float | None]] = []
    started = time.perf_counter()
    while (trial := oracle.create_trial("bench")).status == kt.engine.trial.TrialStatus.RUNNING:
        values = hypermodel.build(trial.hyperparameters)
        plan = recipe.plan(RunConfig.from_values(values, seed=seed))
        key = (dataset, plan.image_size)
        if key not in _DATA:
            _DATA[key] = load_data(dataset, plan.image_size, seed=DATA_SEED)
        try:
            result = recipe.train_run(plan, _DATA[key], verbose=0).result
            scores.append([result.val_accuracy, result.test_accuracy])
            oracle.update_trial(trial.trial_id, {"val_accuracy": result.val_accuracy})
            trial.status = kt.engine.trial.TrialStatus.COMPLETED
        except UserError as e:  # diverged: as a sweep's trial, it fails and the search goes on
            scores.append([None, None])
            trial.status, trial.message = kt.engine.trial.TrialStatus.FAILED, str(e)
        oracle.end_trial(trial)
        keras.backend.clear_session()
    best = max((s[0] for s in scores if s[0] is not None), default=float("nan"))
    print(f"{tuner} seed {seed}: {len(scores)} trials in {time.perf_counter() - started:.0f} s, best val {best:.4f}",
          flush=True)
    return scores


def winner(scores: list[list[float | None]], n: int) -> tuple[float, float] | None:
    """The (validation, test) accuracy of the best trial by validation among the first ``n``, the earliest on ties."""
    done = [s for s in scores[:n] if s[0] is not None]
    if not done:
        return None
    best = max(s[0] for s in done)
    val, test = next(s for s in done if s[0] == best)
    return val, test


def summary(scores: dict[str, dict[str, list]], at: list[int]) -> list[dict]:
    """One row per tuner and number of trials: the winners' validation and test accuracy over the seeds."""
    rows = []
    for n in at:
        for tuner, by_seed in scores.items():
            won = [w for s in by_seed.values() if (w := winner(s, n)) is not None]
            rows.append({"trials": n, "tuner": tuner, "searches": len(won),
                         **{f"{part}_{stat}": value for i, part in enumerate(("val", "test"))
                            for stat, value in spread([w[i] for w in won]).items()}})
    return rows


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("mean", "std", "min", "median", "max")}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "median": statistics.median(values), "max": max(values)}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| trials | tuner | searches | val mean ± std | val min / median / max | test mean ± std "
             "| test min / median / max |", "|---:|---|---:|---|---|---|---|"]
    for r in rows:
        cells = [str(r["trials"]), r["tuner"], str(r["searches"])]
        for part in ("val", "test"):
            cells += [f"{r[part + '_mean']:.4f} ± {r[part + '_std']:.4f}",
                      " / ".join(f"{r[f'{part}_{k}']:.4f}" for k in ("min", "median", "max"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(table: str, space: dict, args: argparse.Namespace, command: str, load: tuple, minutes: float) -> str:
    import keras_tuner
    import optuna
    import tensorflow as tf

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return "\n".join([
        f"# Search benchmark, {datetime.date.today().isoformat()}", "",
        f"- command: `{command}` (`make bench-search`)",
        f"- commit: {git('rev-parse', '--short', 'HEAD')}{dirty}",
        f"- machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {minutes:.0f} min of searches "
        "(this run)",
        f"- versions: Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras Tuner "
        f"{keras_tuner.__version__}, Optuna {optuna.__version__}",
        f"- data: {args.data}" + (f", first {args.per_class} photos per class" if args.per_class else "")
        + f", split seed {DATA_SEED}; {args.seeds} searches per tuner (seeds 1..{args.seeds})",
        f"- space (head only, native image sizes): `{json.dumps(space)}`", "",
        "The winner of a search is its trial with the best validation accuracy among the first n; validation chose",
        "it, so its test accuracy is the honest figure.", "", table, "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
