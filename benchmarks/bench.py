"""``make bench``: a plain Keras-Tuner search against ours with the feature cache, in one process.

On a fixed subset of flower_photos with efficientnet_lite0, N head-only trials of E epochs each:
(a) Keras Tuner's RandomSearch on the full model, which runs the frozen backbone every epoch;
(b) our sweep (``run_sweep``) with a cold feature cache and MLflow tracking into a fresh SQLite
store, with ``log_models: best`` (the headline: trials keep checkpoints, best-export exports the
winner, timed apart) and with ``log_models: all`` (a SavedModel per trial);
(c) one trial with augmentation, which cannot use the cache and trains end to end.
It prints the accuracies, the cache build time, the input-pipeline ratio, and a last line
``speedup=<a/b> tracking_overhead=<fraction> trials=<N> epochs=<E>``, where the overhead is the
time the sweep's thread spent on MLflow (queueing, journaling, waiting for the background writer)
over (b)'s wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tracking import layout

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"


def subset(source: Path, root: Path, per_class: int) -> Path:
    """The first ``per_class`` photos of each class, linked (not copied) under ``root``."""
    for cls in sorted(d for d in source.iterdir() if d.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for photo in sorted(cls.glob("*.jpg"))[:per_class]:
            (root / cls.name / photo.name).symlink_to(photo)
    return root


def input_pipeline_ratio(data, model, batch_size: int, repeats: int = 3) -> tuple[float, float, float]:
    """Images/s through the real pipeline into the frozen model, vs the model on in-memory tensors.

    Every batch shape is traced before timing (the last batch is smaller), and each side is timed
    ``repeats`` times, alternating, keeping the best.
    """
    import tensorflow as tf

    from pipeline.features import extractor

    fx = extractor(model)
    step = tf.function(lambda x: fx(x, training=False))
    batches = [x for x, _ in data.batches("train", batch_size)]
    for x in batches:  # trace every shape
        step(x)

    def rate(source) -> float:
        start = time.perf_counter()
        n = sum(int(step(x).shape[0]) for x in source())
        return n / (time.perf_counter() - start)

    pipeline_rate = model_rate = 0.0
    for _ in range(repeats):
        pipeline_rate = max(pipeline_rate, rate(lambda: (x for x, _ in data.batches("train", batch_size))))
        model_rate = max(model_rate, rate(lambda: batches))
    return pipeline_rate, model_rate, pipeline_rate / model_rate


def sweep_yaml(trials: int, epochs: int, batch_size: int, image_size: int, seed: int, log_models: str,
               augment: bool = False) -> str:
    """The search both sides run: head-only trials over dropout and learning rate."""
    return (
        f"tuner: random\nmax_trials: {trials}\nseed: {seed}\nlog_models: {log_models}\nspace:\n"
        "  backbone: {fixed: efficientnet_lite0}\n"
        f"  image_size: {{fixed: {image_size}}}\n  batch_size: {{fixed: {batch_size}}}\n"
        f"  epochs: {{fixed: {epochs}}}\n  fine_tune: {{fixed: false}}\n  augment: {{fixed: {str(augment).lower()}}}\n"
        "  dropout: {float: [0.0, 0.5], step: 0.1, default: 0.2}\n"
        "  learning_rate: {float: [1.0e-4, 1.0e-2], sampling: log, default: 1.0e-3}\n"
    )


def plain_keras_tuner(data, trials: int, epochs: int, batch_size: int, image_size: int, seed: int, workdir: str):
    """(a): the usual way, the whole model in every epoch of every trial.

    It declares the same space as (b) in the same order, so the seeded random search draws the same
    hyperparameters and the two sides train the same models."""
    import keras
    import keras_tuner as kt
    import yaml

    from pipeline.model import build_model, compile_model
    from sweeps import space as space_module
    from sweeps.config import parse_sweep

    space = parse_sweep(yaml.safe_load(sweep_yaml(trials, epochs, batch_size, image_size, seed, "best")), "plain").space

    def build(hp):
        values = space_module.define(hp, space)
        keras.utils.set_random_seed(seed)
        model = build_model("efficientnet_lite0", data.num_classes, image_size, dropout=float(values["dropout"]),
                            seed=seed)
        compile_model(model, float(values["learning_rate"]))
        return model

    tuner = kt.RandomSearch(build, objective="val_accuracy", max_trials=trials, seed=seed, directory=workdir,
                            project_name="plain", overwrite=True)
    start = time.perf_counter()
    tuner.search(data.batches("train", batch_size, shuffle=True, seed=seed),
                 validation_data=data.batches("validation", batch_size), epochs=epochs, verbose=0)
    wall = time.perf_counter() - start
    failed = [t.message for t in tuner.oracle.trials.values() if t.status != "COMPLETED"]
    if failed:
        raise RuntimeError(f"plain Keras Tuner trials failed: {failed[0]}")
    finals = [t.metrics.get_history("val_accuracy")[-1].value[0] for t in tuner.oracle.trials.values()]
    drawn = sorted((round(float(t.hyperparameters.get("dropout")), 6), round(float(t.hyperparameters.get("learning_rate")), 9))
                   for t in tuner.oracle.trials.values())
    return wall, max(finals), drawn


def ours(dataset: str, trials: int, epochs: int, batch_size: int, image_size: int, seed: int, workdir: Path,
         log_models: str, augment: bool = False):
    """(b): our sweep, cold feature cache, tracked in a fresh SQLite store."""
    import mlflow

    from sweeps.run import run_sweep

    name = f"{log_models}{'_augment' if augment else ''}"
    config = workdir / f"bench_{name}.yaml"
    config.write_text(sweep_yaml(trials, epochs, batch_size, image_size, seed, log_models, augment))
    os.environ["TLSWEEP_CACHE"] = str(workdir / f"cache_{name}")  # cold: the cache build is counted
    uri = f"sqlite:///{workdir / f'mlflow_{name}.db'}"
    tuners: list = []
    start = time.perf_counter()
    parent = run_sweep(dataset, sweep=str(config), experiment="bench", state_dir=str(workdir / f"state_{name}"),
                       tracking_uri=uri, verbose=0, tuner_out=tuners, progress=False)
    wall = time.perf_counter() - start
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    kids = client.search_runs([exp.experiment_id], f"tags.`{layout.PARENT_RUN_ID}` = '{parent}'")
    best = max(k.data.metrics[layout.VAL_ACCURACY] for k in kids)
    drawn = sorted((round(float(k.data.params["dropout"]), 6), round(float(k.data.params["learning_rate"]), 9))
                   for k in kids)
    feature_seconds = sum(k.data.metrics.get(layout.FEATURE_SECONDS, 0.0) for k in kids)
    timings = {**tuners[0].timings, "tracking": tuners[0].journal.blocked, "writer": tuners[0].journal.busy,
               "drawn": drawn}
    if log_models == "best" and not augment:
        from sweeps.best import best_export

        exporting = time.perf_counter()
        best_export("bench", export_dir=str(workdir / f"exports_{name}"))
        timings["best_export"] = time.perf_counter() - exporting
    return wall, best, feature_seconds, timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="flower_photos folder")
    parser.add_argument("--per-class", type=int, default=60, help="photos per class in the fixed subset")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if not Path(args.data, "daisy").is_dir():
        print(f"error: no flower_photos at {args.data}; pass --data /path/to/flower_photos", file=sys.stderr)
        return 2

    import keras

    from pipeline.data import load_data
    from pipeline.model import build_model

    with tempfile.TemporaryDirectory(prefix="tlsweep-bench-") as tmp:
        work = Path(tmp)
        dataset = str(subset(Path(args.data), work / "flowers", args.per_class))
        start = time.perf_counter()
        data = load_data(dataset, args.image_size, seed=args.seed)
        decode = time.perf_counter() - start
        print(f"data: {sum(data.sizes.values())} photos {data.sizes}, decoded and resized in {decode:.1f}s "
              f"({sum(data.sizes.values()) / decode:.0f} images/s)", flush=True)
        keras.utils.set_random_seed(args.seed)
        model = build_model("efficientnet_lite0", data.num_classes, args.image_size, seed=args.seed)
        pipe, bare, ratio = input_pipeline_ratio(data, model, args.batch_size)
        print(f"input pipeline: {pipe:.1f} images/s end to end vs {bare:.1f} images/s model only on in-memory "
              f"tensors (ratio {ratio:.3f})", flush=True)

        wall_a, acc_a, drawn_a = plain_keras_tuner(data, args.trials, args.epochs, args.batch_size, args.image_size,
                                          args.seed, str(work / "kt"))
        print(f"(a) plain Keras Tuner: {args.trials} trials x {args.epochs} epochs in {wall_a:.1f}s, "
              f"best val_accuracy {acc_a:.4f}", flush=True)
        results = {}
        for policy in ("best", "all"):
            wall_b, acc_b, cache_s, t = ours(dataset, args.trials, args.epochs, args.batch_size, args.image_size,
                                             args.seed, work, policy)
            overhead = t["tracking"] / wall_b
            results[policy] = (wall_b, overhead, acc_b, t["drawn"])
            extra = f"; best-export of the winner afterwards {t['best_export']:.1f}s" if "best_export" in t else ""
            print(f"(b) ours, log_models={policy}: {wall_b:.1f}s (feature cache built in {cache_s:.1f}s; "
                  f"trials {t['trials']:.1f}s, model export {t['export']:.1f}s, MLflow on the sweep's thread "
                  f"{t['tracking']:.2f}s, background writer {t['writer']:.1f}s{extra}), "
                  f"best val_accuracy {acc_b:.4f}, speedup {wall_a / wall_b:.1f}x", flush=True)
        wall_b, overhead, acc_b, drawn_b = results["best"]
        print(f"accuracy: plain {acc_a:.4f} vs ours {acc_b:.4f} (difference {abs(acc_a - acc_b):.4f}; "
              f"{data.sizes['validation']} validation photos, one photo = {1 / data.sizes['validation']:.4f}); "
              f"same hyperparameters drawn in both searches: {'yes' if drawn_a == drawn_b else 'NO'}")
        wall_c, _, _, t = ours(dataset, 1, args.epochs, args.batch_size, args.image_size, args.seed, work, "best",
                               augment=True)
        print(f"(c) one trial with augmentation (no feature cache: the backbone runs every epoch): {wall_c:.1f}s for "
              f"{args.epochs} epochs, vs (b) {wall_b / args.trials:.1f}s per trial with the cache", flush=True)
        print(f"speedup={wall_a / wall_b:.2f} tracking_overhead={overhead:.4f} trials={args.trials} "
              f"epochs={args.epochs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
