"""A self-contained HTML (and markdown) report of an experiment, from MLflow data through pandas.

Leaderboard, best trial per backbone, sweep-level charts (objective by backbone, parallel
coordinates of hyperparameters against the objective), the best trial's own plots, failed trials
with their errors, and each trial's run id linked to ``mlflow ui``. Images are embedded, so the
HTML file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import datetime
import html
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import safepath
from pipeline.errors import typed
from tracking import leaderboard as lb
from tracking import plots
from tracking.intervals import interval_text
from tracking.layout import (ERROR, LATENCY_MS, PARETO_LATENCY, PARETO_SIZE, PLOTS_DIR, SIZE_MB, SWEEP_PLOTS,
                             TRIAL_PLOTS)

BOARD_COLUMNS = ("trial", "status", "backbone", "fine_tune", "fine_tune_at", "dropout", "batch_size", "learning_rate",
                 "fine_tune_learning_rate", "epochs", "fine_tune_epochs", "val_accuracy", "val_95", *lb.CV_COLUMNS,
                 "tied", "test_accuracy", "test_95", "latency_ms", "size_mb", "pruned", "run_id")
# (total_params, wall_seconds, val_loss and ranked_by are in MLflow's leaderboard.csv and `make report`'s printed board;
# the page must fit 1,400 px: the facts above the table say what ranked the tied trials)
PER_BACKBONE = ("backbone", "val_accuracy", "val_95", "test_accuracy", "test_95", "run_id")
HOW_TO_READ = ("[low, high]: the 95 % Wilson interval of the accuracy on that split's n images (validation_size, "
               "test_size); tied: the trial's val_accuracy lies inside the interval of the highest val_accuracy, so "
               "the validation split cannot tell them apart. The tied trials are ranked by a steadier estimate "
               "(val_loss, or cv_accuracy when each has it: docs/selection.md), the others by val_accuracy.")


def sweep_charts(table: pd.DataFrame, folder: Path) -> list[Path]:
    """The sweep-level PNGs for a leaderboard (finished trials only); none when nothing finished."""
    done = table[table["status"] == "FINISHED"].dropna(subset=[lb.OBJECTIVE])
    if done.empty:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    groups = {str(k): list(v) for k, v in done.groupby("backbone")[lb.OBJECTIVE]}
    out = [plots.by_backbone(groups, folder / SWEEP_PLOTS[0])]
    if varied := lb.varied(done):
        columns = {c: done[c].fillna("-").tolist() for c in varied}
        out.append(plots.parallel_coordinates(columns, done[lb.OBJECTIVE].tolist(), folder / SWEEP_PLOTS[1]))
    for cost, name in ((LATENCY_MS, PARETO_LATENCY), (SIZE_MB, PARETO_SIZE)):
        measured = done.dropna(subset=[cost]) if cost in done else done.iloc[:0]
        if not measured.empty:  # trials logged before cost metrics existed have none
            costs, values = measured[cost].astype(float).tolist(), measured[lb.OBJECTIVE].astype(float).tolist()
            out.append(plots.pareto(costs, values, measured["trial_id"].astype(str).tolist(),
                                    lb.pareto_front(costs, values), folder / name, cost_name=cost))
    return out


def write_report(experiment: str, out_dir: str | Path = "reports", ui_url: str = "http://127.0.0.1:5000") -> Path:
    """Write ``<out_dir>/<experiment>/report.html`` and ``report.md`` (with its PNGs); returns the HTML path.

    The folder is written whole beside its place and then put there: an earlier report of tlsweep's is replaced
    (no stale chart stays), any other folder is refused (``pipeline.safepath``)."""
    safepath.check_name(experiment, "experiment name", typed("--experiment", "EXPERIMENT="))  # it names the folder
    target = Path(out_dir) / experiment
    safepath.check_replaceable(target, safepath.REPORT, typed("--out-dir", "REPORT_DIR="))
    runs = lb.trial_runs(experiment)
    table = lb.leaderboard(runs)
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tlsweep-report-", dir=target.parent) as tmp:
        folder = Path(tmp) / "report"
        folder.mkdir()
        _write(experiment, table, runs, exp_id, folder, ui_url)
        safepath.replace_dir(folder, target, safepath.REPORT)
    return target / "report.html"


def _write(experiment: str, table: pd.DataFrame, runs: pd.DataFrame, exp_id: str, folder: Path, ui_url: str) -> None:
    images = {p.name: p for p in sweep_charts(table, folder)}
    done = table[table["status"] == "FINISHED"]
    best = done.iloc[0] if not done.empty else None
    if best is not None:
        images.update(_best_trial_plots(best["run_id"], folder))
    link = lambda run_id: f"{ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"  # noqa: E731
    board = lb.shown(table.assign(trial=table["trial_id"]))
    board = board[[c for c in BOARD_COLUMNS if c in board]]
    shared = _shared_columns(board)  # one line above the table instead of a column each: it fits a screen
    errors = _errors(runs)
    facts = _facts(table, best)

    md = [f"# Sweep report: {experiment}", "", *(f"- {k}: {v}" for k, v in facts.items()), ""]
    md += ["## Leaderboard (best first: val_accuracy, the tied trials by a steadier estimate)", "", HOW_TO_READ, "",
           lb.to_markdown(board), ""]
    per_backbone = lb.best_per_backbone(table)
    if not per_backbone.empty:
        md += ["## Best per backbone", "", lb.to_markdown(lb.shown(per_backbone)[list(PER_BACKBONE)]), ""]
    md += [f"![{name}]({name})" for name in images] + [""]
    if errors:
        md += ["## Failed trials", "", *(f"- `{r}` ({s}): {e}" for r, s, e in errors), ""]
    (folder / "report.md").write_text("\n".join(md))

    page = [f"<h1>Sweep report: {html.escape(experiment)}</h1>",
            "<ul>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in facts.items()) + "</ul>",
            "<h2>Leaderboard</h2><p>Best first by val_accuracy. Run ids open the trial in <code>mlflow ui</code>"
            f" at {html.escape(ui_url)} (start it with <code>make ui</code>). {html.escape(HOW_TO_READ)}</p>",
            *([f"<p>Same in every trial: {html.escape(', '.join(f'{k} {v}' for k, v in shared.items()))}</p>"]
              if shared else []),
            _html_table(_with_intervals(board.drop(columns=list(shared))), link)]
    if not per_backbone.empty:
        page += ["<h2>Best per backbone</h2>",
                 _html_table(lb.shown(per_backbone)[list(PER_BACKBONE)], link)]
    sweep_imgs = [n for n in SWEEP_PLOTS if n in images]
    if sweep_imgs:
        page += ["<h2>Sweep</h2>", *(_img(images[n]) for n in sweep_imgs)]
    trial_imgs = [n for n in TRIAL_PLOTS if n in images]
    if best is not None:
        page += [f"<h2>Best trial: {html.escape(str(best['trial_id']))}</h2>",
                 f"<p>val_accuracy {best['val_accuracy']:.4f} {_interval(best, 'val')}, test_accuracy "
                 f"{best['test_accuracy']:.4f} {_interval(best, 'test')}, "
                 f"backbone {html.escape(str(best['backbone']))}, run <a href=\"{link(best['run_id'])}\">"
                 f"{best['run_id']}</a></p>", *(_img(images[n]) for n in trial_imgs)]
    if errors:
        page += ["<h2>Failed trials</h2><ul>" + "".join(
            f"<li><code>{r}</code> ({s}): {html.escape(e)}</li>" for r, s, e in errors) + "</ul>"]
    (folder / "report.html").write_text(_page(f"Sweep report: {experiment}", "\n".join(page)))


def _facts(table: pd.DataFrame, best) -> dict[str, object]:
    counts = table["status"].value_counts().to_dict()
    facts: dict[str, object] = {
        "trials": f"{len(table)} ({', '.join(f'{n} {s.lower()}' for s, n in counts.items())})",
        "tracking store": mlflow.get_tracking_uri(),
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if best is not None:
        facts["winner's val_accuracy"] = (f"{best['val_accuracy']:.4f} {_interval(best, 'val')} (trial "
                                          f"{best['trial_id']}, {best['backbone']})")
        facts["its test_accuracy"] = f"{best['test_accuracy']:.4f} {_interval(best, 'test')}"
        facts["trials tied with the highest val_accuracy"] = int(table["tied"].sum()) if "tied" in table else 0
        by = best.get(lb.RANKED_BY) or lb.OBJECTIVE
        if by != lb.OBJECTIVE:
            facts["tied trials ranked by"] = f"{by} (docs/selection.md)"
    if "wall_seconds" in table and table["wall_seconds"].notna().any():
        facts["trial time, summed"] = f"{table['wall_seconds'].sum():.0f} s"
    return facts


def _interval(row, split: str) -> str:
    """``95 % [low, high] on n images`` for one row's val or test accuracy."""
    low, high = row.get(f"{split}_accuracy_low"), row.get(f"{split}_accuracy_high")
    n = row.get("validation_size" if split == "val" else "test_size")
    text = interval_text(low, high) if low is not None else ""
    return f"(95 % {text} on {int(n)} images)" if text else ""


def _errors(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(run id, status, error) of each trial that did not finish."""
    if runs.empty:
        return []
    bad = runs[runs["status"] != "FINISHED"]
    errors = bad[f"tags.{ERROR}"].fillna("") if f"tags.{ERROR}" in bad else [""] * len(bad)
    return list(zip(bad["run_id"], bad["status"], errors))


def _best_trial_plots(run_id: str, folder: Path) -> dict[str, Path]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PLOTS_DIR, dst_path=tmp))
        except Exception:  # a trial without plots (e.g. logged by an older version): report without them
            return out
        for name in TRIAL_PLOTS:
            if (local / name).exists():
                out[name] = Path(shutil.copy(local / name, folder / name))
    return out


def _shared_columns(board: pd.DataFrame) -> dict[str, object]:
    """Hyperparameter columns with one value in every trial (shown once, not as a column)."""
    if len(board) < 2:
        return {}
    varied = lb.varied(board)
    return {c: board[c].iloc[0] for c in lb.PARAMS if c in board and c not in varied}


def _with_intervals(board: pd.DataFrame) -> pd.DataFrame:
    """Each accuracy with its interval in one cell (``0.9133 [0.886, 0.935]``): two columns fewer on the page."""
    board = board.copy()
    for value, interval in (("val_accuracy", "val_95"), ("test_accuracy", "test_95")):
        if value in board and interval in board:
            board[value] = [v if pd.isna(v) else f"{v:.4f} {i}".strip() for v, i in zip(board[value], board[interval])]
            board = board.drop(columns=interval)
    return board


def _html_table(table: pd.DataFrame, link) -> str:
    """The leaderboard as HTML that fits a 1,400 px screen: short run ids (the full id in the link's title),
    column names that wrap at their underscores, numbers to 4 significant digits."""
    shown = table.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
        elif col != "run_id":  # params come back as text: 0.0012225031390095302 -> 0.001223
            shown[col] = shown[col].map(_short_number)
    if "run_id" in shown:
        shown["run_id"] = shown["run_id"].map(lambda r: f'<a href="{link(r)}" title="{r}"><code>{r[:8]}</code></a>')
    shown.columns = [html.escape(str(c)).replace("_", "_<wbr>") for c in shown.columns]
    return shown.to_html(index=False, escape=False, na_rep="", classes="board", border=0)


def _short_number(value: object) -> object:
    """A decimal number written as text, to 4 significant digits; anything else as it is."""
    if isinstance(value, str) and any(c in value for c in ".eE"):
        try:
            return f"{float(value):.4g}"
        except ValueError:
            return value
    return value


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}"><figcaption>{path.stem}</figcaption></figure>'


def _page(title: str, body: str) -> str:
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
             "table.board{border-collapse:collapse;font-size:13px}"
             "table.board th,table.board td{padding:3px 6px;border-bottom:1px solid #ddd;text-align:right}"
             "table.board th{vertical-align:bottom;max-width:7em}"
             "table.board tbody tr:first-child td{font-weight:bold}img{max-width:100%;border:1px solid #eee}"
             "figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def log_sweep_charts(parent_id: str, table: pd.DataFrame) -> None:
    """The sweep-level charts as PNG artifacts of the sweep's parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        if sweep_charts(table, Path(tmp)):
            MlflowClient().log_artifacts(parent_id, tmp, PLOTS_DIR)
