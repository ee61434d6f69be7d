"""``tlsweep``: the one command line, installed as a console script (``pip install .``).

``tlsweep {train,predict}`` are ``pipeline.cli``'s, ``tlsweep {sweep,best-export,report}`` are
``sweeps.cli``'s, and ``tlsweep ui`` / ``tlsweep server`` start MLflow on the tracking store. It lives in
``sweeps/`` because it meets everything; the Makefile's targets call it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.errors import UserError  # noqa: E402

PIPELINE = ("train", "predict")  # pipeline.cli
SWEEPS = ("sweep", "best-export", "report")  # sweeps.cli
HELP = {
    "train": "train one configuration and export it",
    "predict": "top-k classes per image from an export",
    "sweep": "Keras-Tuner search over a data set; every trial lands in MLflow (rerun to continue)",
    "best-export": "export the best trial by val_accuracy, register it as 'champion', check parity",
    "report": "leaderboard + self-contained HTML/markdown report of an experiment",
    "ui": "MLflow's UI on the tracking store (prints where each sweep's runs are)",
    "server": "MLflow tracking server for distributed sweeps (binds 127.0.0.1 unless --host)",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: each subcommand's own options are parsed by its module."""
    parser = argparse.ArgumentParser(prog="tlsweep", description=__doc__.split("\n\n")[0],
                                     epilog="`tlsweep <command> --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, text in HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def ui_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlsweep ui", description=HELP["ui"])
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--experiment", default=None, help="print only this experiment's link")
    return p


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow 3's UI (an experiment otherwise opens on its GenAI overview)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def experiment_links(tracking_uri: str, base: str, only: str | None = None) -> list[tuple[str, str]]:
    """``(experiment name, runs URL)`` of the store's experiments that hold runs (or of ``only``)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    if only is not None:
        exp = client.get_experiment_by_name(only)
        if exp is None:
            known = [e.name for e in client.search_experiments()]
            raise UserError(f"experiment {only!r} is not in {tracking_uri}; known: {', '.join(known) or 'none'}")
        return [(exp.name, runs_url(base, exp.experiment_id))]
    out = []
    for exp in client.search_experiments():
        if client.search_runs([exp.experiment_id], max_results=1):
            out.append((exp.name, runs_url(base, exp.experiment_id)))
    return out


def cmd_ui(argv: list[str]) -> int:
    from tracking import store

    args = ui_parser().parse_args(argv)
    uri = store.resolve_uri(args.tracking_uri)
    base = f"http://{args.host}:{args.port}"
    links = experiment_links(uri, base, args.experiment)
    print(f"MLflow UI on {uri} at {base} (Ctrl-C stops it)")
    for name, url in links:
        print(f"  {name}: {url}")
    if not links:
        print("  no runs yet: run `tlsweep sweep --dataset ...` first")
    sys.stdout.flush()
    # One person's UI: one worker, and none of MLflow 3's GenAI job consumers (7 processes otherwise)
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return _run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                 "--port", str(args.port), "--workers", "1"])


def cmd_server(argv: list[str]) -> int:
    """The tracking server, never open: ``tracking.server`` (127.0.0.1 unless --host; basic auth off loopback)."""
    from tracking import server

    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no GenAI job consumers (7 processes)
    return server.main(argv)


def _run(command: list[str]) -> int:
    """Become MLflow's process (signals such as Ctrl-C and SIGTERM then reach it directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(os, "execv"):
        os.execv(command[0], command)
    return subprocess.call(command)  # pragma: no cover - platforms without exec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in HELP:
        build_parser().parse_args(argv)  # prints help or the error listing the commands
        return 2
    command, rest = argv[0], argv[1:]
    if command in PIPELINE:
        from pipeline import cli

        return cli.main([command, *rest])
    if command in SWEEPS:
        from sweeps import cli

        return cli.main([command, *rest])
    try:
        return cmd_ui(rest) if command == "ui" else cmd_server(rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
