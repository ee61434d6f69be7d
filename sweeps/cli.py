"""``tlsweep {sweep,best-export,report}``: the product's main jobs (``python -m sweeps.cli`` is ``tlsweep``).

Each command's options are declared once as a typed model (``SweepOptions``, ...); ``add_commands`` builds their
flags from it and ``sweeps.main`` holds the one ``tlsweep`` parser. A sweep checks its flags, its sweep file and
the ``TLSWEEP_*`` environment before TensorFlow is imported: a bad value is one line in well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Literal, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as pipeline.tfstart.quiet_environment
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # read when TensorFlow first touches a GPU
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per logged model drowns the trial lines

from pydantic import Field, model_validator  # noqa: E402

from pipeline import device  # noqa: E402
from pipeline.device import Setting as DeviceSetting  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.settings import Number, Options, Whole, add_options, environment, to_argv  # noqa: E402
from sweeps.config import (OVERRIDES, TFLITE_MODES, SweepConfig, check_experiment_name, default_sweep_for,  # noqa: E402
                           load_sweep)
from sweeps.gpus import LAUNCHER  # noqa: E402
from sweeps.state import ON_CHANGE  # noqa: E402

TRACKING_URI = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)"
INTERRUPTED = ("interrupted: the trial's run and the sweep are marked KILLED in MLflow; run the same command again "
               "to continue")


class SweepOptions(Options):
    dataset: str = Field(description="tfds name or folder (as for `train`)")
    sweep: Optional[str] = Field(None, description="sweep name in sweeps/ (quick, default, ...) or a YAML path; "
                                 "default: sweeps/<dataset>.yaml if present, else default")
    experiment: Optional[str] = Field(None, description="MLflow experiment (default: the data set's name)")
    split: Optional[str] = Field(None, description="as for `train`")
    state_dir: str = Field("sweeps_state", description="Keras-Tuner state, one folder per experiment")
    quiet: bool = Field(False, description="no per-epoch lines")
    verbose: bool = Field(False, description="a failed trial prints its traceback (always in its run's error.txt "
                          "in MLflow); without it, one line with its reason")
    on_change: Literal[ON_CHANGE] = Field(
        "error", description="when the sweep file or the data set changed since this experiment's search started: "
        "error (say what changed), continue (run the saved search as it was; not for other data), or restart (a "
        "new search in the same experiment; the old runs stay in MLflow)")
    gpus: Optional[str] = Field(None, description="'all' or GPU ids like 0,1,3: one worker per GPU "
                                "(CUDA_VISIBLE_DEVICES pinned), trials run concurrently through a chief and an MLflow "
                                "server on 127.0.0.1 over the same store; the same command again resumes")
    no_feature_cache: bool = Field(False, description="run the frozen backbone every epoch instead of training "
                                   "heads on cached features")
    device: Optional[DeviceSetting] = Field(None, description=device.HELP)
    role: Optional[Literal["chief", "worker"]] = Field(
        None, description="Keras Tuner's distributed mode: the chief serves the oracle and writes the leaderboard, "
        "workers run trials; all log to one `mlflow server` (--tracking-uri http://...)")
    oracle: str = Field("127.0.0.1:8000", description="HOST:PORT of the chief's oracle")
    worker_id: Optional[str] = Field(None, description="a worker's id, unique among workers")
    tracking_uri: Optional[str] = Field(None, description=TRACKING_URI)

    @model_validator(mode="after")
    def _distributed(self) -> "SweepOptions":
        host, _, port = self.oracle.rpartition(":")
        if self.gpus and self.role:
            raise UserError("--gpus starts its own chief and workers; drop --role (make sweep-chief / sweep-worker)")
        if self.role and (not host or not port.isdigit()):
            raise UserError(f"--oracle {self.oracle!r} is not HOST:PORT (e.g. 127.0.0.1:8000)")
        if self.role == "worker" and not self.worker_id:
            raise UserError("a worker needs an id unique among the workers (--worker-id, e.g. w1); restart a worker "
                            "with the same id to rerun the trial it was running")
        if self.role == "worker" and "chief" in self.worker_id:
            raise UserError(f"worker id {self.worker_id!r} contains 'chief', which Keras Tuner reserves for the chief")
        return self


class BestExportOptions(Options):
    experiment: str = Field(description="the sweep's MLflow experiment")
    export_dir: str = Field("exports", description="the export goes to <export-dir>/<experiment>")
    overwrite: bool = Field(False, description="replace an existing export")
    tflite: Optional[Literal[TFLITE_MODES]] = Field(
        None, description="also write model.tflite (float16 or dynamic-range quantized), logged with its size and "
        "a parity check against the SavedModel on the trial's test split")
    max_latency_ms: Optional[Number] = Field(None, gt=0, description="export the best trial whose latency_ms "
                                             "(CPU, batch 1) is at most this")
    max_size_mb: Optional[Number] = Field(None, gt=0, description="export the best trial whose size_mb is at most "
                                          "this")
    refit: bool = Field(False, description="export the chosen trial's configuration trained again on "
                        "train+validation (a run of its own, scored on the same test split) instead of the trial's "
                        "model: docs/selection.md")
    tracking_uri: Optional[str] = Field(None, description=TRACKING_URI)


class ReportOptions(Options):
    experiment: str = Field(description="the sweep's MLflow experiment")
    top: Whole = Field(20, ge=1, description="leaderboard rows to print (the report has all)")
    out_dir: str = Field("reports", description="the report goes to <out-dir>/<experiment>/report.html")
    ui_url: str = Field("http://127.0.0.1:5000", description="where `make ui` serves MLflow, for run links")
    tracking_uri: Optional[str] = Field(None, description=TRACKING_URI)


def sweep_config(options: SweepOptions, args: argparse.Namespace) -> SweepConfig:
    """The sweep file with the command line's overrides, checked: before any import of TensorFlow."""
    if options.experiment is not None:
        check_experiment_name(options.experiment)
    config = load_sweep(options.sweep or default_sweep_for(options.dataset))
    return config.with_overrides(**{name: getattr(args, name) for name in OVERRIDES})


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a Keras-Tuner search for a data set; every trial lands in MLflow. Rerun to continue it."""
    options = SweepOptions.of(args)
    config = sweep_config(options, args)
    environment()  # a bad TLSWEEP_* variable is one line now, not in the first trial
    from pipeline.tfstart import start_tensorflow

    start_tensorflow()  # before anything imports it: its start-up lines held back
    if options.gpus:
        return _sweep_on_gpus(options, args, config)
    if options.role != "chief":  # never silently on the CPU (the chief runs no trials)
        device.refuse_cpu(options.device)
    from sweeps.run import run_sweep

    if options.role:
        _distributed_env(options)
    parent = run_sweep(
        options.dataset, sweep=options.sweep, experiment=options.experiment, max_trials=args.max_trials,
        tuner=args.tuner, seed=args.seed, split=options.split, state_dir=options.state_dir,
        tracking_uri=options.tracking_uri, verbose=0 if options.quiet else 2, feature_cache=not options.no_feature_cache,
        log_models=args.log_models, trial_process=args.trial_process, on_change=options.on_change,
        mixed_precision=args.mixed_precision, tracebacks=options.verbose,
    )
    if options.role and os.environ.get(LAUNCHER):  # started by --gpus (sweeps/gpus.py), which prints the board once
        return 0
    return _print_board(_experiment(options.dataset, options.experiment), parent, top=10)


def _sweep_on_gpus(options: SweepOptions, args: argparse.Namespace, config: SweepConfig) -> int:
    """``--gpus``: the same sweep, one worker per GPU behind a chief and an MLflow server (sweeps/gpus.py)."""
    from pathlib import Path

    from sweeps import gpus
    from tracking import runs, store

    if config.stage2:
        raise UserError(f"a staged search (stage2: in {config.source or config.name}) runs in one process; run it "
                        "without --gpus (CUDA_VISIBLE_DEVICES=<id> picks its GPU), or remove stage2 to spread it over "
                        "GPUs")
    found = gpus.available_gpus()
    ids = gpus.parse_gpus(options.gpus, found)  # before any work
    device.refuse_cpu(options.device, options.gpus)  # never silently on the CPU; workers inherit $TLSWEEP_DEVICE
    experiment = options.experiment or _experiment(options.dataset, None)
    uri = store.configure(options.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        store.experiment_id(experiment)  # created by the local rules (artifacts beside a SQLite file) before the server
    given = options.model_dump(include={"dataset", "state_dir", "sweep", "split", "quiet", "verbose",
                                        "no_feature_cache"})
    forwarded = to_argv({**given, "experiment": experiment, **{k: getattr(args, k) for k in OVERRIDES}})
    code = gpus.run_on_gpus(ids, bool(found), forwarded, uri, Path(options.state_dir) / experiment)
    if code != 0:
        return code
    store.configure(uri)
    return _print_board(experiment, runs.find_parent(store.experiment_id(experiment), f"{experiment}:{config.name}"),
                        top=10)


def _distributed_env(options: SweepOptions) -> None:
    """Keras Tuner's distributed mode is set through its environment variables (checked in ``SweepOptions``)."""
    host, _, port = options.oracle.rpartition(":")
    os.environ.update(KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port,
                      KERASTUNER_TUNER_ID="chief" if options.role == "chief" else options.worker_id)


def cmd_best_export(args: argparse.Namespace) -> int:
    """Export the best finished trial (by validation accuracy, ties by a steadier estimate: docs/selection.md),
    register it as 'champion', check parity."""
    args = BestExportOptions.of(args)
    check_experiment_name(args.experiment)  # it names the export's folder
    from pipeline.tfstart import start_tensorflow

    start_tensorflow()
    from sweeps.best import best_export
    from tracking import store
    from tracking.intervals import interval_text

    store.configure(args.tracking_uri)
    info = best_export(args.experiment, export_dir=args.export_dir, overwrite=args.overwrite, tflite=args.tflite,
                       max_latency_ms=args.max_latency_ms, max_size_mb=args.max_size_mb, refit=args.refit)
    for line in (info.get("budget"), info.get("chosen_by")):
        if line:
            print(line)
    if "refit_of" in info:
        print(f"best run {info['refit_of']}: val_accuracy={info['val_accuracy']:.4f} "
              f"{interval_text(*info['val_interval'])} test_accuracy={info['trial_test_accuracy']:.4f}")
        print(f"refit run {info['run_id']}, trained on {info['trained_on']}: test_accuracy={info['test_accuracy']:.4f} "
              f"{interval_text(*info['test_interval'])} (95 % Wilson intervals)")
        if info.get("refit_over_budget"):
            print(info["refit_over_budget"])
    else:
        print(f"best run {info['run_id']}: val_accuracy={info['val_accuracy']:.4f} "
              f"{interval_text(*info['val_interval'])} test_accuracy={info['test_accuracy']:.4f} "
              f"{interval_text(*info['test_interval'])} (95 % Wilson intervals)")
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
    args = ReportOptions.of(args)
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
    # the hyperparameters that tell the trials apart (whatever the sweep searched), the backbone always
    cols = ["trial_id", "status", *dict.fromkeys(["backbone", *lb.varied(table)]),
            "val_accuracy", "val_95", "val_loss", *lb.CV_COLUMNS, "tied", lb.RANKED_BY, "test_accuracy", "test_95",
            "latency_ms", "size_mb", "pruned", "wall_seconds", "run_id"]
    ensembles = int(table["trial_id"].astype(str).str.startswith(f"{layout.ENSEMBLE} ").sum())
    counted = f"{len(table) - ensembles} trials" + (f" and {ensembles} ensemble" if ensembles else "")
    print(f"\nleaderboard of {experiment!r} ({counted}, best first by val_accuracy, and the trials tied with the best "
          "by the steadier estimate in ranked_by; [95 % Wilson interval]; tied: inside the best's val interval; "
          "docs/selection.md):")
    shown = lb.shown(table)
    print(lb.to_markdown(shown[[c for c in cols if c in shown]].head(top)))
    best = lb.best_per_backbone(table)
    if not best.empty:
        print("\nbest per backbone:")
        print(lb.to_markdown(lb.shown(best)[["backbone", "val_accuracy", "val_95", "test_accuracy", "test_95", "run_id"]]))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``sweep``, ``best-export`` and ``report``, their flags built from their declarations."""
    p = sub.add_parser("sweep", help=cmd_sweep.__doc__, description=cmd_sweep.__doc__)
    add_options(p, SweepOptions, only=("dataset", "sweep", "experiment"))
    add_options(p, SweepConfig, only=OVERRIDES, defaults=dict.fromkeys(OVERRIDES))  # None: the sweep file's
    add_options(p, SweepOptions, skip=("dataset", "sweep", "experiment"))
    p.set_defaults(func=cmd_sweep, interrupted=INTERRUPTED)
    for name, options, run in (("best-export", BestExportOptions, cmd_best_export),
                               ("report", ReportOptions, cmd_report)):
        p = sub.add_parser(name, help=run.__doc__, description=run.__doc__)
        add_options(p, options)
        p.set_defaults(func=run, interrupted="interrupted" + (
            " before best-export finished (a run it opened is marked KILLED in MLflow); run the same command again"
            if name == "best-export" else ""))


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeps.cli``: the ``tlsweep`` command (``sweeps.main``)."""
    from sweeps import main as tlsweep

    return tlsweep.main(argv)


if __name__ == "__main__":
    sys.exit(main())
