"""``make bench-tracking``: what one trial's MLflow calls cost through tlsweep's recorder, part by part, on the
SQLite store and on a local ``mlflow server``.

One trial's record as a sweep hands it to the recorder (``tracking.recorder``): the values of a trial of a sweep that
searches five hyperparameters (``layout.place``: those as params, the rest as tags), ``--epochs`` epochs of the four
epoch metrics and the one-value metrics, ``--trial-seconds`` of system metrics (one sample per 5 s), its three plots
(drawn by ``tracking.plots``), its checkpoint (the classifier's weights) and probabilities, and its SavedModel export
(``pipeline.export``) of efficientnet_lite0 at ``--image-size`` (random weights: the bytes are what cost). It is
written ``--repeats`` times to fresh runs of each store, each part on its own, with the recorder's own functions:

- ``run``: the trial's run created under the sweep's parent and closed (``runs.create_child``, ``set_terminated``);
- ``params``: its params and tags (``recorder.write_values`` with those only);
- ``metrics``: its epoch and one-value metrics (the same, with those only);
- ``system``: its system metrics (the same);
- ``datasets``: its splits as MLflow datasets (``recorder.write_inputs``);
- ``artifacts``: plots, checkpoint and probabilities (``recorder.write_files``);
- ``model``: the SavedModel as the run's pyfunc LoggedModel (``recorder.write_model``);

then ``record``: the whole record as a sweep writes it (``Recorder.open``, ``finish``, ``flush``; values, metrics and
system metrics in one batch there). One line per part and store (median and fastest of the repeats), then per store
``total``: the record, and the parts' sum. Timings depend on the machine's load: say it with them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PARTS = ("run", "params", "metrics", "system", "datasets", "artifacts", "model")
SEARCHED = ("dropout", "learning_rate", "fine_tune_at", "fine_tune_learning_rate", "batch_size")
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
SYSTEM_SECONDS = 5  # the default TLSWEEP_SYSTEM_METRICS_SECONDS


def make_record(folder: Path, epochs: int, trial_seconds: float, image_size: int):
    """A trial's ``Record`` with its files in ``folder`` (as ``sweeps.trial`` leaves them for the recorder)."""
    import numpy as np

    from pipeline.export import export_model
    from pipeline.hparams import DEFAULTS, RunConfig
    from pipeline.model import build_model
    from tracking import layout, plots, system_metrics

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    run = RunConfig(image_size=image_size)
    params = {**{k: getattr(run, k) for k in DEFAULTS}, layout.SEED: 42, layout.SPLIT: "default",
              layout.RESOLVED_IMAGE_SIZE: image_size, layout.FEATURE_CACHE: True, layout.RUN_CONFIG: run.to_json(),
              "data_name": "/data/flower_photos", "data_source": "folder", "split_spec": "75/15/10 (seed 42)",
              "class_names": str(CLASSES), "num_classes": 5, "train_size": 2753, "validation_size": 550,
              "test_size": 367, "skipped_files": 0, "data_fingerprint": "0123456789abcdef",
              layout.DEVICE: "CPU", layout.PRECISION: "float32"}
    history = {k: list(rng.uniform(0.1, 1.0, epochs)) for k in layout.EPOCH_METRICS}
    metrics = [(k, float(v), i) for k, vs in history.items() for i, v in enumerate(vs)]
    metrics += [(k, float(rng.uniform(0, 1)), 0) for k in layout.TRIAL_METRICS if k not in layout.EPOCH_METRICS]
    names: list = []
    with system_metrics.sampled(names):  # the names this machine's monitors give (GPU ones where there is one)
        time.sleep(0.1)
    now = int(time.time() * 1000)
    steps = max(1, int(trial_seconds // SYSTEM_SECONDS))
    metrics += [(name, value, step, now + step * SYSTEM_SECONDS * 1000) for step in range(steps)
                for name, value, _, _ in names]
    labels = rng.integers(0, 5, 367)
    (folder / "plots").mkdir()
    drawn = plots.trial_plots({"history": history, "fine_tune_start": epochs * 2 // 3, "first_epoch": 0,
                               "confusion": rng.integers(0, 60, (5, 5)), "class_names": CLASSES,
                               "grid_images": rng.integers(0, 255, (16, image_size, image_size, 3)).astype("uint8"),
                               "grid_labels": labels[:16], "grid_predicted": labels[:16]}, folder / "plots")
    files = {f"{layout.PLOTS_DIR}/{p.name}": f"plots/{p.name}" for p in drawn}
    model = build_model("efficientnet_lite0", 5, image_size, weights=None, seed=0)
    np.savez(folder / "weights.npz", *model.get_weights())
    np.savez(folder / layout.PROBABILITIES, val_labels=labels, val_probs=rng.uniform(size=(367, 5)),
             test_labels=labels, test_probs=rng.uniform(size=(367, 5)))
    files[f"{layout.CHECKPOINT_DIR}/weights.npz"] = "weights.npz"
    files[f"{layout.PROBABILITIES_DIR}/{layout.PROBABILITIES}"] = layout.PROBABILITIES
    export_model(model, folder / "model" / "export", CLASSES, keras_file=False)
    sample = np.zeros((1, image_size, image_size, 3), np.float32)
    np.savez(folder / "model" / "sample.npz", image=sample)
    np.save(folder / "model" / "probs.npy", np.asarray(model(sample, training=False)))
    return layout.Record(params, metrics, {layout.COST_OF: layout.COST_SAVEDMODEL}, files, "model")


def saved_form(record, searched: tuple[str, ...]) -> dict:
    """The record as the journal holds it (``record.json``): values placed, a timestamp."""
    from tracking import layout

    params, tags = layout.place(record.params, searched)
    return {"params": params, "tags": {**tags, **record.tags}, "metrics": record.metrics, "files": record.files,
            "model": record.model, "timestamp": int(time.time() * 1000)}


def part_writes(saved: dict) -> dict[str, Callable]:
    """Each part's write: ``fn(client, run_id, entry)``, the recorder's own functions on a part of the record."""
    from tracking import recorder

    system = [m for m in saved["metrics"] if len(m) == 4]
    own = [m for m in saved["metrics"] if len(m) == 3]
    def only(**some: object) -> dict:
        return {**saved, "params": {}, "tags": {}, "metrics": [], **some}

    return {  # in the recorder's order: the model first (the values link to it)
        "model": lambda c, r, e: recorder.write_model(c, r, saved, e),
        "params": lambda c, r, e: recorder.write_values(c, r, only(params=saved["params"], tags=saved["tags"]), e),
        "metrics": lambda c, r, e: recorder.write_values(c, r, only(metrics=own), e),
        "system": lambda c, r, e: recorder.write_values(c, r, only(metrics=system), e),
        "datasets": lambda c, r, e: recorder.write_inputs(c, r, saved, e),
        "artifacts": lambda c, r, e: recorder.write_files(c, r, saved, e),
    }


def measure(uri: str, record, folder: Path, repeats: int, work: Path) -> dict[str, list[float]]:
    """Seconds per part (and ``record``) per repeat on the store at ``uri``."""
    from mlflow.tracking import MlflowClient

    from tracking import runs, store
    from tracking.recorder import Recorder

    store.configure(uri)
    exp = store.experiment_id("bench-tracking")
    client = MlflowClient()
    parent = client.create_run(exp, run_name="sweep-bench").info.run_id
    saved = saved_form(record, SEARCHED)
    writes = part_writes(saved)
    times: dict[str, list[float]] = {k: [] for k in (*PARTS, "record")}
    recorder = Recorder(work / "journal", searched=SEARCHED)
    try:
        for i in range(repeats):
            begin = time.perf_counter()
            run_id = runs.create_child(exp, parent, f"trial-{i}", {})
            created = time.perf_counter() - begin
            for name, write in writes.items():
                begin = time.perf_counter()
                write(client, run_id, folder)
                times[name].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            client.set_terminated(run_id)
            times["run"].append(created + time.perf_counter() - begin)
            begin = time.perf_counter()
            run = recorder.open(exp, parent, f"trial-record-{i}", {})
            opened = time.perf_counter() - begin
            entry = recorder.folder_for(run)
            shutil.copytree(folder, entry, dirs_exist_ok=True)  # the trial's files, as the trial leaves them
            begin = time.perf_counter()
            recorder.finish(run, record, entry)
            recorder.flush()
            times["record"].append(opened + time.perf_counter() - begin)
    finally:
        recorder.close()
        client.set_terminated(parent)
    return times


@contextlib.contextmanager
def local_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` on a free port of 127.0.0.1, its SQLite store and artifacts in ``folder``, one worker (as
    ``make server`` starts it); yields its URI and ends it."""
    from tracking.server import start_local, stop_group

    folder.mkdir(parents=True)
    proc, uri = start_local(f"sqlite:///{folder / 'server.db'}", str(folder / "artifacts"), folder / "server.log")
    try:
        yield uri
    finally:
        stop_group(proc)


def report(store_name: str, times: dict[str, list[float]]) -> list[str]:
    """One line per part, then the total: the record as the sweep writes it, and the parts one by one."""
    lines = [f"{store_name} {name}: median_s={statistics.median(t):.4f} min_s={min(t):.4f}"
             for name, t in times.items() if name != "record"]
    parts = sum(statistics.median(times[n]) for n in PARTS)
    lines.append(f"{store_name} total: record_median_s={statistics.median(times['record']):.4f} "
                 f"record_min_s={min(times['record']):.4f} parts_sum_s={parts:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the trial's curves (shipped: 10 + 5)")
    parser.add_argument("--trial-seconds", type=float, default=60.0, help="its length, for its system metrics")
    parser.add_argument("--image-size", type=int, default=224, help="its export's input size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stores", default="sqlite,server", help="comma-separated: sqlite, server")
    args = parser.parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"sqlite", "server"}:
        print(f"error: --stores {args.stores!r}: give sqlite, server or both (comma-separated)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tlsweep-bench-tracking-") as tmp:
        work = Path(tmp)
        os.environ["TLSWEEP_CACHE"] = str(work / "cache")
        record = make_record(work / "trial", args.epochs, args.trial_seconds, args.image_size)
        print(f"one trial: {len(record.params)} values ({len(SEARCHED)} searched), {len(record.metrics)} metric "
              f"values, {len(record.files)} files, a SavedModel of "
              f"{sum(f.stat().st_size for f in (work / 'trial' / 'model').rglob('*') if f.is_file()) / 1e6:.1f} MB; "
              f"{args.repeats} repeats; load average {os.getloadavg()[0]:.2f}", flush=True)
        for name in stores:
            if name == "sqlite":
                times = measure(f"sqlite:///{work / 'mlflow.db'}", record, work / "trial", args.repeats,
                                work / "sqlite")
            else:
                with local_server(work / "server") as uri:
                    times = measure(uri, record, work / "trial", args.repeats, work / "server-client")
            print("\n".join(report(name, times)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
