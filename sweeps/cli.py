"""``python -m sweeps.cli {sweep,best-export,report}``: the product's main jobs."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per logged model drowns the trial lines

from pipeline.errors import UserError  # noqa: E402
from sweeps import signals  # noqa: E402
from sweeps.config import LOG_MODELS, TFLITE_MODES, TRIAL_PROCESSES  # noqa: E402


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a Keras-Tuner search for a data set; every trial lands in MLflow. Rerun to continue it."""
    from sweeps.run import run_sweep

    if args.role:
        _distributed_env(args.role, args.oracle, args.worker_id)
    parent = run_sweep(
        args.dataset, sweep=args.sweep, experiment=args.experiment, max_trials=args.max_trials, tuner=args.tuner,
        seed=args.seed, split=args.split, state_dir=args.state_dir, tracking_uri=args.tracking_uri,
        verbose=0 if args.quiet else 2, feature_cache=not args.no_feature_cache, log_models=args.log_models,
        trial_process=args.trial_process,
    )
    return _print_board(args.experiment or _experiment(args.dataset), parent, top=10)


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
    from sweeps.best import best_export
    from tracking import store
    from tracking.intervals import interval_text

    store.configure(args.tracking_uri)
    info = best_export(args.experiment, export_dir=args.export_dir, overwrite=args.overwrite, tflite=args.tflite)
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
              f"difference {t['max_abs_diff']:.4f}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print an experiment's leaderboard; write its HTML + markdown report and print the HTML's path."""
    from tracking import store
    from tracking.report import write_report

    store.configure(args.tracking_uri)
    _print_board(args.experiment, None, top=args.top)
    path = write_report(args.experiment, out_dir=args.out_dir, ui_url=args.ui_url)
    print(f"\nreport (markdown beside it): {path.resolve()}")
    return 0


def _experiment(dataset: str) -> str:
    from sweeps.run import experiment_name

    return experiment_name(dataset, None)


def _print_board(experiment: str, parent: str | None, top: int) -> int:
    from tracking import leaderboard as lb

    table = lb.leaderboard(lb.trial_runs(experiment, parent))
    cols = ["trial_id", "status", "backbone", "fine_tune_at", "dropout", "batch_size", "learning_rate",
            "val_accuracy", "val_95", *lb.CV_COLUMNS, "tied", "test_accuracy", "test_95", "wall_seconds", "run_id"]
    print(f"\nleaderboard of {experiment!r} ({len(table)} trials, best first by val_accuracy; "
          "[95 % Wilson interval]; tied: inside the best's val interval):")
    shown = lb.shown(table)
    print(lb.to_markdown(shown[[c for c in cols if c in shown]].head(top)))
    best = lb.best_per_backbone(table)
    if not best.empty:
        print("\nbest per backbone:")
        print(lb.to_markdown(lb.shown(best)[["backbone", "val_accuracy", "val_95", "test_accuracy", "test_95", "run_id"]]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlsweep-sweeps", description=__doc__)
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
    p.add_argument("--log-models", default=None, choices=LOG_MODELS,
                   help="log the SavedModel + pyfunc model of every trial; only of trials that beat the best so "
                   "far; or none, trials keeping a Keras checkpoint that best-export turns into the SavedModel of "
                   "the winner (fastest); overrides the YAML (default: all)")
    p.add_argument("--trial-process", default=None, choices=TRIAL_PROCESSES,
                   help="where trials run: auto (default) runs a trial that trains the whole network (fine-tuning, "
                   "augmentation, features not cached yet) in a fresh process, whose memory is all returned when it "
                   "ends, and heads on cached features in the sweep's process; fresh: every trial in its own "
                   "process; same: all in the sweep's process; overrides the YAML")
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
