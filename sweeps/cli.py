"""``python -m sweeps.cli {sweep,best-export,report}``: the product's main jobs."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as pipeline.tfstart.quiet_environment
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # read when TensorFlow first touches a GPU
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per logged model drowns the trial lines

from pipeline.errors import UserError  # noqa: E402
from sweeps import signals  # noqa: E402
from sweeps.config import LOG_MODELS, TFLITE_MODES, TRIAL_PROCESSES, check_experiment_name  # noqa: E402
from sweeps.state import ON_CHANGE  # noqa: E402
from sweeps.gpus import LAUNCHER  # noqa: E402


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a Keras-Tuner search for a data set; every trial lands in MLflow. Rerun to continue it."""
    from pipeline.tfstart import start_tensorflow

    start_tensorflow()  # before anything imports it: its start-up lines held back
    from sweeps.run import run_sweep

    if args.gpus:
        return _sweep_on_gpus(args)
    if args.role:
        _distributed_env(args.role, args.oracle, args.worker_id)
    if args.verbose:
        os.environ["TLSWEEP_VERBOSE"] = "1"  # failed trials print their traceback (it is in MLflow's error.txt)
    parent = run_sweep(
        args.dataset, sweep=args.sweep, experiment=args.experiment, max_trials=args.max_trials, tuner=args.tuner,
        seed=args.seed, split=args.split, state_dir=args.state_dir, tracking_uri=args.tracking_uri,
        verbose=0 if args.quiet else 2, feature_cache=not args.no_feature_cache, log_models=args.log_models,
        trial_process=args.trial_process, on_change=args.on_change, mixed_precision=args.mixed_precision,
    )
    if args.role and os.environ.get(LAUNCHER):  # started by --gpus (sweeps/gpus.py), which prints the board once
        return 0
    return _print_board(_experiment(args.dataset, args.experiment), parent, top=10)


def _sweep_on_gpus(args: argparse.Namespace) -> int:
    """``--gpus``: the same sweep, one worker per GPU behind a chief and an MLflow server (sweeps/gpus.py)."""
    from pathlib import Path

    from sweeps import gpus
    from sweeps.config import default_sweep_for, load_sweep
    from tracking import runs, store

    if args.role:
        raise UserError("--gpus (GPUS=) starts its own chief and workers; drop --role (sweep-chief / sweep-worker)")
    config = load_sweep(args.sweep or default_sweep_for(args.dataset))
    if config.stage2:
        raise UserError(f"a staged search (stage2: in {config.source or config.name}) runs in one process; run it "
                        "without GPUS= (CUDA_VISIBLE_DEVICES=<id> picks its GPU), or remove stage2 to spread it over GPUs")
    found = gpus.available_gpus()
    ids = gpus.parse_gpus(args.gpus, found)  # before any work
    experiment = args.experiment or _experiment(args.dataset)
    uri = store.configure(args.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        store.experiment_id(experiment)  # created by the local rules (artifacts beside a SQLite file) before the server
    forwarded = ["--dataset", args.dataset, "--experiment", experiment, "--state-dir", args.state_dir]
    for flag, value in (("--sweep", args.sweep), ("--max-trials", args.max_trials), ("--tuner", args.tuner),
                        ("--seed", args.seed), ("--split", args.split), ("--log-models", args.log_models),
                        ("--trial-process", args.trial_process), ("--mixed-precision", args.mixed_precision)):
        if value is not None:
            forwarded += [flag, str(value)]
    forwarded += ["--quiet"] * args.quiet + ["--no-feature-cache"] * args.no_feature_cache
    code = gpus.run_on_gpus(ids, bool(found), forwarded, uri, Path(args.state_dir) / experiment)
    if code != 0:
        return code
    store.configure(uri)
    return _print_board(experiment, runs.find_parent(store.experiment_id(experiment), f"{experiment}:{config.name}"),
                        top=10)


def _distributed_env(role: str, oracle: str, worker_id: str | None) -> None:
    """Keras Tuner's distributed mode is set through its environment variables."""
    host, _, port = oracle.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--oracle {oracle!r} is not HOST:PORT (e.g. 127.0.0.1:8000)")
    if role == "worker" and not worker_id:
        raise UserError("a worker needs an id unique among the workers (--worker-id / WORKER=, e.g. w1); restart a "
                        "worker with the same id to rerun the trial it was running")
    if role == "worker" and "chief" in worker_id:
        raise UserError(f"worker id {worker_id!r} contains 'chief', which Keras Tuner reserves for the chief")
    os.environ.update(KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port,
                      KERASTUNER_TUNER_ID="chief" if role == "chief" else worker_id)


def cmd_best_export(args: argparse.Namespace) -> int:
    """Export the best finished trial (by validation accuracy), register it as 'champion', check parity."""
    from pipeline.tfstart import start_tensorflow

    start_tensorflow()
    from sweeps.best import best_export
    from tracking import store
    from tracking.intervals import interval_text

    check_experiment_name(args.experiment)  # it names the export's folder
    store.configure(args.tracking_uri)
    info = best_export(args.experiment, export_dir=args.export_dir, overwrite=args.overwrite, tflite=args.tflite,
                       max_latency_ms=args.max_latency_ms, max_size_mb=args.max_size_mb)
    if info.get("budget"):
        print(info["budget"])
    print(f"best run {info['run_id']}: val_accuracy={info['val_accuracy']:.4f} {interval_text(*info['val_interval'])} "
          f"test_accuracy={info['test_accuracy']:.4f} {interval_text(*info['test_interval'])} (95 % Wilson intervals)")
    print(f"exported to {info['path']} (SavedModel + labels.txt + MODEL_CARD.md)")
    print(f"registered as model {info['model_name']!r} version {info['version']} with alias 'champion'")
    print(f"parity: the export reproduces test_accuracy={info['reproduced_test_accuracy']:.4f}")
    if "tflite" in info:
        t = info["tflite"]
        print(f"TFLite ({t['mode']}): {t['path']}, {t['size_bytes'] / 1e6:.2f} MB (SavedModel variables "
              f"{t['savedmodel_bytes'] / 1e6:.2f} MB); test_accuracy={t['test_accuracy']:.4f}, same top-1 class as "
              f"the SavedModel on {t['agreement']:.1%} of {info['test_size']} test images, largest probability "
              f"difference {t['max_abs_diff']:.4f}; latency {t['latency_ms']:.2f} ms (CPU, batch 1, median)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print an experiment's leaderboard; write its HTML + markdown report and print the HTML's path."""
    from tracking import store
    from tracking.report import write_report

    check_experiment_name(args.experiment)  # it names the report's folder
    store.configure(args.tracking_uri)
    _print_board(args.experiment, None, top=args.top)
    path = write_report(args.experiment, out_dir=args.out_dir, ui_url=args.ui_url)
    print(f"\nreport (markdown beside it): {path.resolve()}")
    return 0


def _experiment(dataset: str, experiment: str | None) -> str:
    from sweeps.run import experiment_name

    return experiment_name(dataset, experiment)


def _print_board(experiment: str, parent: str | None, top: int) -> int:
    from tracking import layout
    from tracking import leaderboard as lb

    table = lb.leaderboard(lb.trial_runs(experiment, parent))
    cols = ["trial_id", "status", "backbone", "fine_tune_at", "dropout", "batch_size", "learning_rate",
            "val_accuracy", "val_95", *lb.CV_COLUMNS, "tied", "test_accuracy", "test_95", "latency_ms", "size_mb",
            "pruned", "wall_seconds", "run_id"]
    ensembles = int(table["trial_id"].astype(str).str.startswith(f"{layout.ENSEMBLE} ").sum())
    counted = f"{len(table) - ensembles} trials" + (f" and {ensembles} ensemble" if ensembles else "")
    print(f"\nleaderboard of {experiment!r} ({counted}, best first by val_accuracy; "
          "[95 % Wilson interval]; tied: inside the best's val interval):")
    shown = lb.shown(table)
    print(lb.to_markdown(shown[[c for c in cols if c in shown]].head(top)))
    best = lb.best_per_backbone(table)
    if not best.empty:
        print("\nbest per backbone:")
        print(lb.to_markdown(lb.shown(best)[["backbone", "val_accuracy", "val_95", "test_accuracy", "test_95", "run_id"]]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlsweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    uri = dict(default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")

    p = sub.add_parser("sweep", help=cmd_sweep.__doc__, description=cmd_sweep.__doc__)
    p.add_argument("--dataset", required=True, help="tfds name or folder (as for `train`)")
    p.add_argument("--sweep", default=None, help="sweep name in sweeps/ (quick, default, ...) or a YAML path; "
                   "default: sweeps/<dataset>.yaml if present, else default")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the data set's name)")
    p.add_argument("--max-trials", type=int, default=None)
    p.add_argument("--tuner", default=None, help="random, bayesian, hyperband or grid (overrides the YAML)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--split", default=None, help="as for `train`")
    p.add_argument("--state-dir", default="sweeps_state", help="Keras-Tuner state, one folder per experiment")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.add_argument("--verbose", action="store_true", help="a failed trial prints its traceback (always in its run's "
                   "error.txt in MLflow); without it, one line with its reason")
    p.add_argument("--log-models", default=None, choices=LOG_MODELS,
                   help="log the SavedModel + pyfunc model of every trial; only of trials that beat the best so "
                   "far; or none, trials keeping a checkpoint that best-export turns into the SavedModel of "
                   "the winner (fastest); overrides the YAML (default: improving). Exports run in a helper process, off "
                   "the training path")
    p.add_argument("--trial-process", default=None, choices=TRIAL_PROCESSES,
                   help="where trials run: auto (default) runs a trial that trains the whole network (fine-tuning, "
                   "augmentation, features not cached yet) in a fresh process, whose memory is all returned when it "
                   "ends, and heads on cached features in the sweep's process; fresh: every trial in its own "
                   "process; same: all in the sweep's process; overrides the YAML")
    p.add_argument("--on-change", default="error", choices=ON_CHANGE,
                   help="when the sweep file or the data set changed since this experiment's search started: error "
                   "(default: say what changed), continue (run the saved search as it was; not for other data), or "
                   "restart (a new search in the same experiment; the old runs stay in MLflow)")
    p.add_argument("--mixed-precision", default=None,
                   help="auto, float32, mixed_float16 or mixed_bfloat16 (true = mixed_float16); overrides the YAML "
                   "(default auto: bfloat16 on GPUs of compute capability >= 8.0, float16 below, float32 on CPU)")
    p.add_argument("--gpus", default=None,
                   help="'all' or GPU ids like 0,1,3: one worker per GPU (CUDA_VISIBLE_DEVICES pinned), trials run "
                   "concurrently through a chief and an MLflow server on 127.0.0.1 over the same store; the same "
                   "command again resumes")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="run the frozen backbone every epoch instead of training heads on cached features")
    p.add_argument("--role", choices=("chief", "worker"), default=None,
                   help="Keras Tuner's distributed mode: the chief serves the oracle and writes the leaderboard, "
                   "workers run trials; all log to one `mlflow server` (--tracking-uri http://...)")
    p.add_argument("--oracle", default="127.0.0.1:8000", help="HOST:PORT of the chief's oracle (default 127.0.0.1:8000)")
    p.add_argument("--worker-id", default=None, help="a worker's id, unique among workers")
    p.add_argument("--tracking-uri", **uri)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("best-export", help=cmd_best_export.__doc__, description=cmd_best_export.__doc__)
    p.add_argument("--experiment", required=True)
    p.add_argument("--export-dir", default="exports")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--tflite", choices=TFLITE_MODES, default=None,
                   help="also write model.tflite (float16 or dynamic-range quantized), logged with its size and a "
                   "parity check against the SavedModel on the trial's test split")
    p.add_argument("--max-latency-ms", type=float, default=None,
                   help="export the best trial whose latency_ms (CPU, batch 1) is at most this")
    p.add_argument("--max-size-mb", type=float, default=None, help="export the best trial whose size_mb is at most this")
    p.add_argument("--tracking-uri", **uri)
    p.set_defaults(func=cmd_best_export)

    p = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    p.add_argument("--experiment", required=True)
    p.add_argument("--top", type=int, default=20, help="leaderboard rows to print (the report has all)")
    p.add_argument("--out-dir", default="reports", help="the report goes to <out-dir>/<experiment>/report.html")
    p.add_argument("--ui-url", default="http://127.0.0.1:5000", help="where `make ui` serves MLflow, for run links")
    p.add_argument("--tracking-uri", **uri)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with signals.stop_on_signals():  # SIGTERM ends a sweep like Ctrl-C: runs are closed as KILLED
            return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the trial's run and the sweep are marked KILLED in MLflow; "
              "run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
