"""``make bench``: the shipped default sweep against a plain Keras Tuner search of the same space.

On a fixed subset of flower_photos with efficientnet_lite0, one seeded random search over dropout, learning
rate, fine-tuning or not, ``fine_tune_at`` and the fine-tuning learning rate (so fine-tuning trials are in it):

(a) plain Keras Tuner: its ``Tuner`` with the sweep's random-search oracle, in one process, a ``HyperModel`` that builds the full model, trains the
    head epochs, then (fine-tuning trials) unfreezes from ``fine_tune_at`` (BatchNorm frozen), recompiles with the
    fine-tuning learning rate and trains on; no caches. Its wall time counts decoding the images too.
(b) our sweep with the settings a user gets without flags (``run_sweep``: feature cache, fine-tuning on the cut,
    fresh trial processes from a process pool, ``log_models`` default (every trial's model), MLflow tracking into a fresh SQLite store),
    every cache cold (a first sweep on this data);
(c) the same sweep without tracking (``benchmarks.untracked``: no store, runs or system metrics, and the trials make
    none of a run's files: no plots, cost, checkpoint or SavedModel; no parent or leaderboard), caches cold again:
    tracking overhead = (b) - (c), in seconds and as a fraction of (b);
(d) with ``--split-overhead``: (b) with ``log_models: best`` (no model is exported during the sweep; every trial keeps
    its checkpoint, as every trial of (b) does with its export), in a fresh store, caches cold: the overhead splits into
    the run without its model, (d) - (c) (MLflow, plots, cost and checkpoints), and the model exports, (b) - (d)
    (each trial's SavedModel export and its upload).

Both searches declare the space the same way (``sweeps.space.define``) with the same seed; the bench **fails
(exit 1)** if (a), (b), (c) (and (d)) did not draw the same hyperparameters, trial by trial. Accuracy the same way on
both sides: each trial's score is its last epoch's ``val_accuracy``; the best trial is the highest (the first on
ties); its test accuracy is computed by this script (``test_accuracy``) on the same test split, from the trained
model (a) or from the trial's checkpoint (b). Then the fixed cost per trial
(``benchmarks.bench_fixed_cost.measure``). Last line:
``speedup=<a/b> tracking_overhead=<fraction of b> tracking_overhead_s=<b-c> [tracking_overhead_mlflow_s=<d-c>
tracking_overhead_exports_s=<b-d>] fixed_cost_head_s=<s>
fixed_cost_finetune_s=<s> fixed_cost_finetune_kept_s=<s> trials=<n> fine_tuning_trials=<n> epochs=<n>
fine_tune_epochs=<n> ...``. ``--shipped-lengths``: trials of make train's lengths (10 head + 5 fine-tuning epochs)
rather than the short 2 + 1, the speedup users see on whole trials.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"


def subset(source: Path, root: Path, per_class: int) -> Path:
    """The first ``per_class`` photos of each class, linked (not copied) under ``root``."""
    for cls in sorted(d for d in source.iterdir() if d.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for photo in sorted(p for p in cls.iterdir() if p.is_file())[:per_class]:
            (root / cls.name / photo.name).symlink_to(photo)
    return root


def sweep_yaml(trials: int, epochs: int, fine_tune_epochs: int, batch_size: int, image_size: int, seed: int,
               log_models: str | None = None) -> str:
    """The search both sides run; ``log_models`` (unless given) and ``trial_process`` are left to their defaults."""
    return (
        f"tuner: random\nmax_trials: {trials}\nseed: {seed}\nprune: false\n"
        + (f"log_models: {log_models}\n" if log_models else "") + "space:\n"
        "  backbone: {fixed: efficientnet_lite0}\n"
        f"  image_size: {{fixed: {image_size}}}\n  batch_size: {{fixed: {batch_size}}}\n"
        f"  epochs: {{fixed: {epochs}}}\n  fine_tune_epochs: {{fixed: {fine_tune_epochs}}}\n"
        "  augment: {fixed: false}\n"
        "  fine_tune: {boolean: true, default: true}\n"
        "  fine_tune_at: {choice: [0.75, 0.9], default: 0.75}\n"
        "  dropout: {float: [0.0, 0.5], step: 0.1, default: 0.2}\n"
        "  learning_rate: {float: [1.0e-4, 1.0e-2], sampling: log, default: 1.0e-3}\n"
        "  fine_tune_learning_rate: {float: [1.0e-5, 1.0e-3], sampling: log, default: 1.0e-4}\n"
    )


def test_accuracy(model: Any, data: Any, batch_size: int = 32) -> float:
    """The fraction of the test split the model classifies right: the one measure both sides get."""
    import numpy as np

    right = total = 0
    for x, y in data.batches("test", batch_size):
        predicted = np.asarray(model(x, training=False)).argmax(axis=1)
        right += int((predicted == np.asarray(y)).sum())
        total += len(predicted)
    return right / total


def best_trial(tuner: Any) -> Any:
    """The highest score (last epoch's val_accuracy); the first such trial on ties."""
    done = sorted((t for t in tuner.oracle.trials.values() if t.score is not None), key=lambda t: int(t.trial_id))
    return max(done, key=lambda t: t.score)  # max keeps the first of equal scores


def plain_keras_tuner(data: Any, config: Any, image_size: int, seed: int, workdir: str) -> tuple[Any, dict[str, float]]:
    """(a): Keras Tuner the usual way; returns the tuner and each trial's test accuracy."""
    import keras
    import keras_tuner as kt

    from pipeline import recipe
    from pipeline.hparams import RunConfig
    from pipeline.model import build_model, compile_model, set_trainable
    from sweeps import space as space_module
    from sweeps.tuner import make_oracle

    tests: dict[str, float] = {}

    class TwoPhase(kt.HyperModel):
        def build(self, hp: kt.HyperParameters) -> keras.Model:
            values = space_module.define(hp, config.space)
            keras.utils.set_random_seed(seed)
            model = build_model("efficientnet_lite0", data.num_classes, image_size, dropout=float(values["dropout"]),
                                seed=seed)
            compile_model(model, float(values["learning_rate"]))
            return model

        def fit(self, hp: kt.HyperParameters, model: keras.Model, *args: Any, callbacks: Any = None, **kwargs: Any):
            values = space_module.define(hp.copy(), config.space)
            plan = recipe.plan(RunConfig.from_values(values, seed=seed))
            batch = int(values["batch_size"])
            train = data.batches("train", batch, shuffle=True, seed=seed)
            val = data.batches("validation", batch)
            history = model.fit(train, validation_data=val, epochs=int(values["epochs"]), verbose=0,
                                callbacks=callbacks).history["val_accuracy"]
            if plan.fine_tunes:  # unfreeze from fine_tune_at (BatchNorm stays frozen), recompile, train on
                set_trainable(model, plan.unfreeze_from)
                compile_model(model, plan.fine_tune_learning_rate)
                start = int(values["epochs"])
                history += model.fit(train, validation_data=val, initial_epoch=start,
                                     epochs=start + plan.fine_tune_epochs, verbose=0,
                                     callbacks=callbacks).history["val_accuracy"]
            tests[json.dumps(hp.values, sort_keys=True, default=str)] = test_accuracy(model, data)
            return {"val_accuracy": float(history[-1])}  # the last epoch's, as our trials report it

    # Keras Tuner's own Tuner with the sweep's oracle (its random search, first trial at the default point): the
    # oracle only chooses values, so both sides try the same trials; everything that costs time here is plain KT.
    oracle = make_oracle(dataclasses.replace(config, seed=seed))  # its own seed: a test makes it draw otherwise
    tuner = kt.Tuner(oracle=oracle, hypermodel=TwoPhase(), directory=workdir, project_name="plain", overwrite=True)
    tuner.search(verbose=0)
    failed = [t.message for t in tuner.oracle.trials.values() if t.status != "COMPLETED"]
    if failed:
        raise RuntimeError(f"plain Keras Tuner trials failed: {failed[0]}")
    by_trial = {t.trial_id: tests[json.dumps(t.hyperparameters.values, sort_keys=True, default=str)]
                for t in tuner.oracle.trials.values()}
    return tuner, by_trial


def ours_recorded(uri: str, experiment: str) -> dict[str, dict[str, str]]:
    """(b)'s trial runs as the sweep recorded them in MLflow, by Keras Tuner trial id: their params (the data
    lineage among them) and metrics (test_accuracy among them), as strings and floats."""
    import mlflow

    from tracking.layout import TRIAL_ID
    from tracking.leaderboard import trial_runs

    mlflow.set_tracking_uri(uri)
    runs = trial_runs(experiment)
    return {row[f"tags.{TRIAL_ID}"]: row for _, row in runs.iterrows()}


def compare_draws(sides: dict[str, list[dict[str, Any]]]) -> str | None:
    """None when every side drew the same hyperparameters trial by trial, else what differs (one line)."""
    (first, reference), *others = sides.items()
    for name, draws in others:
        if len(draws) != len(reference):
            return f"{first} ran {len(reference)} trials, {name} {len(draws)}"
        for i, (a, b) in enumerate(zip(reference, draws)):
            if a != b:
                diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
                return f"trial {i}: {first} vs {name} drew differently: {diff}"
    return None


def fine_tuning(draws: list[dict[str, Any]]) -> int:
    return sum(bool(d.get("fine_tune")) for d in draws)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="flower_photos folder")
    parser.add_argument("--per-class", type=int, default=40, help="photos per class in the fixed subset")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2, help="head epochs of every trial")
    parser.add_argument("--fine-tune-epochs", type=int, default=1, help="fine-tuning epochs of fine-tuning trials")
    parser.add_argument("--shipped-lengths", action="store_true",
                        help="trials of make train's lengths (10 head + 5 fine-tuning epochs: pipeline.hparams."
                        "DEFAULTS) instead of --epochs/--fine-tune-epochs: the speedup at the lengths users run")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1,
                        help="the searches' seed (1: 5 of the 6 default trials fine-tune, from both cuts)")
    parser.add_argument("--fixed-cost-data", default=None,
                        help="data for the fixed-cost measurement (default: the same subset; give the flower_photos "
                        "folder for the issue's figure, which takes far longer the first time: it builds the caches)")
    parser.add_argument("--fixed-cost-repeats", type=int, default=1)
    parser.add_argument("--no-fixed-cost", action="store_true", help="skip the fixed-cost measurement")
    parser.add_argument("--log-models", default=None, choices=("all", "improving", "best"),
                        help="our sweep's log_models (default: the shipped default); to see what exports cost")
    parser.add_argument("--split-overhead", action="store_true",
                        help="also run (d), the tracked sweep with log_models: best (no model exports during it), "
                             "to split the tracking overhead into MLflow itself (d)-(c) and the exports (b)-(d)")
    args = parser.parse_args(argv)
    if args.shipped_lengths:
        from pipeline.hparams import DEFAULTS

        args.epochs, args.fine_tune_epochs = int(DEFAULTS["epochs"]), int(DEFAULTS["fine_tune_epochs"])
    if not Path(args.data, "daisy").is_dir():
        print(f"error: no flower_photos at {args.data} (no daisy/ folder in it); pass --data /path/to/flower_photos",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tlsweep-bench-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> int:
    """The bench in ``work`` (a scratch folder); returns the exit code."""
    if args.split_overhead and getattr(args, "log_models", None) == "best":
        print("error: --split-overhead compares the sweep with its model exports against one without them; with "
              "--log-models best there are none to split off: drop one of the two", file=sys.stderr)
        return 2
    import yaml

    from pipeline.data import load_data
    from sweeps.config import parse_sweep
    from sweeps.run import run_sweep
    from benchmarks.untracked import drawn, run_untracked, saved_search

    dataset = str(subset(Path(args.data), work / "flowers", args.per_class))
    text = sweep_yaml(args.trials, args.epochs, args.fine_tune_epochs, args.batch_size, args.image_size, args.seed,
                      getattr(args, "log_models", None))
    sweep = work / "bench.yaml"
    sweep.write_text(text)
    config = parse_sweep(yaml.safe_load(text), "bench")
    no_exports = work / "bench_no_exports.yaml"  # (d): the same search, its models only checkpointed
    no_exports.write_text(sweep_yaml(args.trials, args.epochs, args.fine_tune_epochs, args.batch_size, args.image_size,
                                     args.seed, "best"))

    # (a) plain Keras Tuner
    start = time.perf_counter()
    data = load_data(dataset, args.image_size, seed=args.seed)
    decode = time.perf_counter() - start
    print(f"data: {sum(data.sizes.values())} photos {data.sizes}, decoded and resized in {decode:.1f}s", flush=True)
    plain, plain_tests = plain_keras_tuner(data, config, args.image_size, args.seed, str(work / "kt"))
    wall_a = time.perf_counter() - start
    print(f"(a) plain Keras Tuner: {wall_a:.1f}s (decoding {decode:.1f}s included)", flush=True)

    # (b) ours, as shipped, tracked; (c) the same without MLflow; (d) tracked, no exports. Each with cold caches.
    walls, tuners = {}, {}
    letters = {"tracked": "b", "untracked": "c", "no_exports": "d"}
    for side in ("tracked", "untracked", *(("no_exports",) if args.split_overhead else ())):
        os.environ["TLSWEEP_CACHE"] = str(work / f"cache_{side}")
        start = time.perf_counter()
        if side == "untracked":
            run_untracked(dataset, str(sweep), str(work / f"state_{side}"))
        else:
            tracked = side == "tracked"  # (d) gets a fresh store of its own, as (b) does
            run_sweep(dataset, sweep=str(sweep if tracked else no_exports), experiment="bench" if tracked else
                      "bench-no-exports", state_dir=str(work / f"state_{side}"), verbose=0,
                      tracking_uri=f"sqlite:///{work / ('mlflow.db' if tracked else 'mlflow_no_exports.db')}",
                      progress=False)
        walls[side], tuners[side] = time.perf_counter() - start, saved_search(work / f"state_{side}")
        print(f"({letters[side]}) ours, {side.replace('_', ' ')}: {walls[side]:.1f}s", flush=True)
    ours = tuners["tracked"]

    draws = {"plain": drawn(plain), "ours": drawn(ours), "ours untracked": drawn(tuners["untracked"])}
    if "no_exports" in tuners:
        draws["ours without exports"] = drawn(tuners["no_exports"])
    differ = compare_draws(draws)
    if differ:
        print(f"error: the searches drew different hyperparameters, so the bench compares unlike trials: {differ}",
              file=sys.stderr)
        return 1
    n_ft = fine_tuning(draws["plain"])
    print(f"same hyperparameters drawn on every side: yes ({len(draws['plain'])} trials, {n_ft} fine-tuning)")
    for i, d in enumerate(draws["plain"]):
        print(f"  trial {i}: " + ", ".join(f"{k}={d[k]}" for k in ("fine_tune", "fine_tune_at", "dropout",
                                                                   "learning_rate", "fine_tune_learning_rate") if k in d))

    from tracking.layout import PARAM_TAG  # lineage values are tags of a trial run (tracking.layout.place)

    recorded = ours_recorded(f"sqlite:///{work / 'mlflow.db'}", "bench")
    lineage = {k: str(v) for k, v in data.lineage().items() if k == "data_fingerprint" or k.endswith("_size")}
    for trial_id, row in recorded.items():
        seen = {k: row.get(f"params.{k}", row.get(f"tags.{PARAM_TAG}{k}")) for k in lineage}
        if seen != lineage:
            print(f"error: our sweep's trial {trial_id} split the data differently from the plain search: "
                  f"{seen} vs {lineage}", file=sys.stderr)
            return 1
    best_a, best_b = best_trial(plain), best_trial(ours)
    test_a, test_b = plain_tests[best_a.trial_id], float(recorded[best_b.trial_id]["metrics.test_accuracy"])
    print(f"best trial by val_accuracy (last epoch; first on ties): plain trial {best_a.trial_id} "
          f"val_accuracy {best_a.score:.4f} test_accuracy {test_a:.4f}; ours trial {best_b.trial_id} "
          f"val_accuracy {best_b.score:.4f} test_accuracy {test_b:.4f} ({data.sizes['validation']} validation, "
          f"{data.sizes['test']} test photos: one photo = {1 / data.sizes['test']:.4f} of test accuracy)")
    per_trial = [(t.trial_id, t.score) for t in sorted(plain.oracle.trials.values(), key=lambda t: int(t.trial_id))]
    ours_scores = {t.trial_id: t.score for t in ours.oracle.trials.values()}
    print("val_accuracy per trial, plain / ours: " + ", ".join(
        f"{i}: {s:.3f}/{ours_scores.get(i, float('nan')):.3f}" for i, s in per_trial))

    overhead_s = walls["tracked"] - walls["untracked"]
    speedup = wall_a / walls["tracked"]
    print(f"speedup (a)/(b) {speedup:.2f}x; tracking overhead (b)-(c) {overhead_s:.1f}s of {walls['tracked']:.1f}s",
          flush=True)

    fixed = {f"fixed_cost_{kind}_s": float("nan") for kind in ("head", "finetune", "finetune_kept")}
    if not args.no_fixed_cost:
        from benchmarks.bench_fixed_cost import measure

        os.environ["TLSWEEP_CACHE"] = str(work / "cache_fixed")
        fixed = measure(Path(args.fixed_cost_data or dataset), image_size=args.image_size,
                        repeats=args.fixed_cost_repeats)
    split = ""
    if "no_exports" in walls:
        mlflow_s, exports_s = walls["no_exports"] - walls["untracked"], walls["tracked"] - walls["no_exports"]
        print(f"tracking overhead split: MLflow without exports (d)-(c) {mlflow_s:.1f}s, model exports (b)-(d) "
              f"{exports_s:.1f}s", flush=True)
        split = f"tracking_overhead_mlflow_s={mlflow_s:.1f} tracking_overhead_exports_s={exports_s:.1f} "
    print(f"speedup={speedup:.2f} tracking_overhead={overhead_s / walls['tracked']:.4f} "
          f"tracking_overhead_s={overhead_s:.1f} {split}fixed_cost_head_s={fixed['fixed_cost_head_s']:.2f} "
          f"fixed_cost_finetune_s={fixed['fixed_cost_finetune_s']:.2f} "
          f"fixed_cost_finetune_kept_s={fixed['fixed_cost_finetune_kept_s']:.2f} trials={len(draws['plain'])} "
          f"fine_tuning_trials={n_ft} epochs={args.epochs} fine_tune_epochs={args.fine_tune_epochs} plain_s={wall_a:.1f} ours_s={walls['tracked']:.1f} "
          f"untracked_s={walls['untracked']:.1f} test_accuracy_plain={test_a:.4f} test_accuracy_ours={test_b:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
