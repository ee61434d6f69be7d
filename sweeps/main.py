"""``tlsweep``: the one command line, installed as a console script (``pip install .``).

One parser: ``train`` and ``predict`` take their flags from ``pipeline.cli`` (``RunConfig``'s fields for train),
``sweep``, ``best-export`` and ``report`` from ``sweeps.cli``, and ``ui`` / ``server`` start MLflow on the tracking
store. It lives in ``sweeps/`` because it meets everything; the Makefile's targets call it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import importlib
import urllib.parse
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pydantic import Field  # noqa: E402

from pipeline.errors import UserError  # noqa: E402
from pipeline.settings import Options, add_options  # noqa: E402
from sweeps import signals  # noqa: E402
from tracking import server  # noqa: E402

# The modules that add commands to the parser, each with ``add_commands(subparsers)``: a new command (e.g. a
# `doctor` that checks this machine) is a module added here.
COMMAND_MODULES = ("pipeline.cli", "sweeps.cli", "sweeps.doctor")
HELP = {
    "train": "train one configuration and export it",
    "predict": "top-k classes per image from an export",
    "sweep": "Keras-Tuner search over a data set; every trial lands in MLflow (rerun to continue)",
    "best-export": "export the best trial (docs/selection.md), register it as 'champion', check parity",
    "report": "leaderboard + self-contained HTML/markdown report of an experiment",
    "ui": "MLflow's UI on the tracking store (prints where each experiment's runs are, and a link comparing each "
          "sweep's trials)",
    "server": "MLflow tracking server for distributed sweeps (binds 127.0.0.1 unless --host)",
}


class UIOptions(Options):
    tracking_uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(5000, ge=1, le=65535, description="port to listen on")
    experiment: Optional[str] = Field(None, description="print only this experiment's link")


def build_parser() -> argparse.ArgumentParser:
    """The ``tlsweep`` parser: every command's flags, each built from its declared settings."""
    parser = argparse.ArgumentParser(prog="tlsweep", description=__doc__.split("\n\n")[0],
                                     epilog="`tlsweep <command> --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    p = sub.add_parser("ui", help=HELP["ui"], description=HELP["ui"])
    add_options(p, UIOptions)
    p.set_defaults(func=cmd_ui)
    p = sub.add_parser("server", help=HELP["server"], description=server.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, server.ServerOptions)
    p.set_defaults(func=cmd_server)
    return parser


def ui_parser() -> argparse.ArgumentParser:
    """``tlsweep ui``'s own parser (its flags as in ``build_parser``)."""
    p = argparse.ArgumentParser(prog="tlsweep ui", description=HELP["ui"])
    add_options(p, UIOptions)
    return p


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow 3's model-training view (an experiment otherwise may open on its GenAI
    overview: traces, no runs)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page over ``run_ids``: a parallel-coordinates chart of their params and metrics, then the
    tables of both (the route and query MLflow's own "Compare" button builds)."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids, separators=(",", ":")),
                                    "experiments": json.dumps([experiment_id], separators=(",", ":"))})
    return f"{base.rstrip('/')}/#/compare-runs?{query}"


def sweep_links(experiment: str, experiment_id: str, base: str) -> list[tuple[str, int, str]]:
    """``(sweep run name, finished trials, compare URL)`` of each sweep of the experiment that has finished trials
    (its ensemble included), best first by the objective; a search replaced by a restart is left out."""
    from mlflow.tracking import MlflowClient

    from tracking import layout, runs
    from tracking import leaderboard as lb

    client, out = MlflowClient(), []
    for parent in client.search_runs([experiment_id], f"tags.`{layout.KIND}` = '{layout.SWEEP}'",
                                     order_by=["attributes.start_time ASC"]):
        if runs.REPLACED in parent.data.tags.get(layout.SWEEP_KEY, ""):
            continue
        table = lb.leaderboard(lb.trial_runs(experiment, parent.info.run_id))
        done = list(table[table["status"] == "FINISHED"]["run_id"])
        if done:
            out.append((parent.info.run_name, len(done), compare_url(base, experiment_id, done)))
    return out


def experiment_links(tracking_uri: str, base: str, only: str | None = None) -> list[tuple[str, str, list]]:
    """``(experiment name, runs URL, sweep_links)`` of the store's experiments that hold runs (or of ``only``)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)  # the leaderboard reads it
    client = mlflow.tracking.MlflowClient()
    if only is not None:
        exp = client.get_experiment_by_name(only)
        if exp is None:
            known = [e.name for e in client.search_experiments()]
            raise UserError(f"experiment {only!r} is not in {tracking_uri}; known: {', '.join(known) or 'none'}")
        found = [exp]
    else:
        found = [e for e in client.search_experiments() if client.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, runs_url(base, e.experiment_id), sweep_links(e.name, e.experiment_id, base)) for e in found]


def link_lines(links: list[tuple[str, str, list]]) -> list[str]:
    """``experiment_links`` as ``ui`` prints them, names quoted (a name may hold spaces or a colon)."""
    lines = []
    for name, url, sweeps in links:
        lines.append(f"  experiment {name!r}: {url}")
        lines += [f"    sweep {sweep!r}, its {trials} finished trial(s) compared: {compare}"
                  for sweep, trials, compare in sweeps]
    return lines


def cmd_ui(args: argparse.Namespace) -> int:
    from tracking import store

    args = UIOptions.of(args)
    uri = store.resolve_uri(args.tracking_uri)
    if urllib.parse.urlparse(uri).scheme.lower() in ("http", "https"):
        raise UserError(f"{uri} is a tracking server, which serves MLflow's UI itself: open {uri} in a browser "
                        "(tlsweep ui serves a store: sqlite:///<path>/mlflow.db or postgresql://...)")
    uri = store.configure(uri)  # the store's checks, as report and best-export make them
    base = f"http://{args.host}:{args.port}"
    links = experiment_links(uri, base, args.experiment)
    print(f"MLflow UI on {uri} at {base} (Ctrl-C stops it)")
    print("\n".join(link_lines(links)) or "  no runs yet: run `tlsweep sweep --dataset ...` first", flush=True)
    # One person's UI: one worker, and none of MLflow 3's GenAI job consumers (7 processes otherwise)
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return _run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                 "--port", str(args.port), "--workers", "1"])


def cmd_server(args: argparse.Namespace) -> int:
    """The tracking server, never open: ``tracking.server`` (127.0.0.1 unless --host; basic auth off loopback)."""
    return server.serve(server.ServerOptions.of(args))


def _run(command: list[str]) -> int:
    """Become MLflow's process (signals such as Ctrl-C and SIGTERM then reach it directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(os, "execv"):
        os.execv(command[0], command)
    return subprocess.call(command)  # pragma: no cover - platforms without exec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with signals.stop_on_signals():  # SIGTERM ends a command like Ctrl-C: a sweep's runs are closed as KILLED
            return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{getattr(args, 'interrupted', 'interrupted')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
