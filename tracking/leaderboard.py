"""Trials of an experiment as a pandas leaderboard, best first by the selection rule (``ranked``, docs/selection.md)."""

from __future__ import annotations

from typing import Sequence

import mlflow
import pandas as pd

from pipeline.errors import UserError
from pipeline.stats import accuracy_interval, tied
from tracking import layout
from tracking.layout import KIND, OBJECTIVE, PARENT_RUN_ID, TRIAL, TRIAL_ID
from tracking.runs import replaced_parents

PARAMS = ("backbone", "fine_tune", "fine_tune_at", "dropout", "batch_size", "learning_rate",
          "fine_tune_learning_rate", "epochs", "fine_tune_epochs", "augment", "image_size", "label_smoothing",
          "weight_decay", "fine_tune_schedule", "warmup_epochs")  # the hyperparameters people compare trials by
METRICS = (OBJECTIVE, layout.VAL_LOSS, layout.TEST_ACCURACY, layout.TEST_LOSS, layout.TRAIN_SECONDS, layout.WALL_SECONDS,
           layout.TRAINABLE_PARAMS, *layout.COST_METRICS, layout.CV_ACCURACY, layout.CV_ACCURACY_STD)
PRUNED = "pruned"  # column: the epoch a pruned trial stopped at (empty for the others)
RANKED_BY = "ranked_by"  # column: the estimate that placed the trial (``ranked``)
SIZES = ("validation_size", "test_size")  # data lineage params: the n behind each accuracy
INTERVALS = (*layout.INTERVAL_METRICS, "tied")  # computed here from the accuracies and SIZES
CV_COLUMNS = (layout.CV_ACCURACY, layout.CV_ACCURACY_STD)  # k-fold cross-validation of heads, where logged


def trial_runs(experiment: str, parent_id: str | None = None) -> pd.DataFrame:
    """All trial runs of ``experiment`` (optionally of one sweep), and its ensembles, one row each; the runs of a
    search started over (``ON_CHANGE=restart``: other data, split or space) are left out."""
    found_experiment = mlflow.get_experiment_by_name(experiment)
    if found_experiment is None:
        raise UserError(f"no MLflow experiment named {experiment!r} in {mlflow.get_tracking_uri()}; run a sweep first")
    found = []
    for kind in (TRIAL, layout.ENSEMBLE):  # a sweep's ensemble ranks with its trials (sweeps.ensemble)
        query = f"tags.`{KIND}` = '{kind}'" + (f" and tags.`{PARENT_RUN_ID}` = '{parent_id}'" if parent_id else "")
        found.append(mlflow.search_runs(experiment_names=[experiment], filter_string=query, output_format="pandas"))
    found = [f for f in found if not f.empty] or found[:1]
    table = pd.concat(found, ignore_index=True) if len(found) > 1 else found[0]
    replaced = set() if parent_id else replaced_parents(found_experiment.experiment_id)
    if replaced and f"tags.{PARENT_RUN_ID}" in table:
        table = table[~table[f"tags.{PARENT_RUN_ID}"].isin(replaced)].reset_index(drop=True)
    return table


def leaderboard(runs: pd.DataFrame, objective: str = OBJECTIVE) -> pd.DataFrame:
    """Finished trials first, best first by the selection rule (``ranked``), with the columns people compare."""
    if runs.empty:
        return pd.DataFrame(columns=["run_id", "trial_id", "status", *PARAMS, *METRICS, PRUNED, RANKED_BY, *SIZES,
                                     *INTERVALS])
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "trial_id": runs.get(f"tags.{TRIAL_ID}"),
        "status": runs["status"],
    })
    for p in PARAMS:
        table[p] = _value(runs, p)
    for m in dict.fromkeys((objective, *METRICS)):
        table[m] = runs.get(f"metrics.{m}")
    table[PRUNED] = runs.get(f"tags.{layout.PRUNED}")
    table[RANKED_BY] = ""
    for p in SIZES:
        column = _value(runs, p)
        table[p] = float("nan") if column is None else pd.to_numeric(column, errors="coerce")
    table["finished"] = table["status"] == "FINISHED"
    table = table.sort_values(["finished", objective], ascending=[False, False], na_position="last")
    return ranked(with_intervals(table.drop(columns="finished").reset_index(drop=True), objective), objective)


def ranked(table: pd.DataFrame, objective: str = OBJECTIVE) -> pd.DataFrame:
    """The selection rule, the one place that decides which trial wins (summarize, best-export, the ensemble's
    candidates and the printed board all read this order; docs/selection.md says it in words).

    ``table`` is sorted by ``objective`` (best first) with ``tied`` marked (``with_intervals``). The trials tied with
    the best are those the validation split cannot tell apart: with a small split (a hundred images) that is most of
    them, and the order of their accuracies is noise. They are ordered by a steadier estimate instead: the k-fold
    cross-validated accuracy over train+validation (``cv_accuracy``, higher first) when every tied trial has one, else
    the validation log loss (``val_loss``, lower first; it weighs how sure each answer was, not only whether it was
    right). Trials outside the tie keep their ``objective`` order. The test split is never read. ``ranked_by`` says
    which estimate placed each finished trial."""
    table = table.copy()
    done = (table["status"] == "FINISHED") & table[objective].notna()
    table[RANKED_BY] = [objective if d else "" for d in done]
    group = table[table["tied"] & done]
    if len(group) < 2:
        return table
    def column(name: str) -> pd.Series:
        return pd.to_numeric(group[name], errors="coerce") if name in group else pd.Series(float("nan"), group.index)

    cv, loss = column(layout.CV_ACCURACY), column(layout.VAL_LOSS)
    if cv.notna().all():
        keys, by = [-cv, loss], layout.CV_ACCURACY
    elif loss.notna().any():
        keys, by = [loss], layout.VAL_LOSS
    else:
        return table
    keys = pd.DataFrame(dict(enumerate([*keys, -column(objective)])))  # last: the higher accuracy first
    order = keys.sort_values(list(keys.columns), na_position="last", kind="stable").index
    table.loc[group.index, RANKED_BY] = by
    rest = table.index.difference(group.index, sort=False)
    return table.loc[[*order, *rest]].reset_index(drop=True)


def _value(runs: pd.DataFrame, name: str) -> pd.Series | None:
    """A trial value's column: its param where it was searched, else its tag (``layout.place``)."""
    param, tag = runs.get(f"params.{name}"), runs.get(f"tags.{layout.PARAM_TAG}{name}")
    return tag if param is None else param if tag is None else param.fillna(tag)


def with_intervals(table: pd.DataFrame, objective: str = OBJECTIVE) -> pd.DataFrame:
    """95 % Wilson intervals of val/test accuracy from the split sizes, and ``tied``: the finished trials whose
    ``objective`` lies inside the best finished trial's interval (the best included), i.e. not told apart
    from it by the validation split. ``table`` is sorted best first."""
    table = table.copy()
    for (low, high), acc, n in (((layout.VAL_ACCURACY_LOW, layout.VAL_ACCURACY_HIGH), OBJECTIVE, "validation_size"),
                                ((layout.TEST_ACCURACY_LOW, layout.TEST_ACCURACY_HIGH), layout.TEST_ACCURACY,
                                 "test_size")):
        pairs = [accuracy_interval(a, s) for a, s in zip(table[acc], table[n])]
        table[low] = [p[0] for p in pairs]
        table[high] = [p[1] for p in pairs]
    done = table[(table["status"] == "FINISHED") & table[objective].notna()]
    if done.empty:
        table["tied"] = False
        return table
    best = done.iloc[0]
    table["tied"] = [bool(status == "FINISHED" and tied(best[objective], best["validation_size"], acc))
                     for status, acc in zip(table["status"], table[objective])]
    return table


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as people read it: each accuracy's interval as ``[low, high]`` text beside it,
    ``tied`` as a mark."""
    from tracking.intervals import interval_text

    out = table.copy()
    for name, low, high in (("val_95", layout.VAL_ACCURACY_LOW, layout.VAL_ACCURACY_HIGH),
                            ("test_95", layout.TEST_ACCURACY_LOW, layout.TEST_ACCURACY_HIGH)):
        if low in out:
            out[name] = [interval_text(lo, hi) for lo, hi in zip(out[low], out[high])]
    if "tied" in out:
        out["tied"] = out["tied"].map(lambda t: "tied" if t else "")
    return out


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower cost, higher value), by increasing cost.
    Points with a missing (NaN) cost or value are left out."""
    points = sorted((c, -v, i) for i, (c, v) in enumerate(zip(costs, values)) if not (pd.isna(c) or pd.isna(v)))
    front, best = [], float("-inf")
    for c, neg, i in points:
        if -neg > best:
            front.append(i)
            best = -neg
    return front


def varied(table: pd.DataFrame) -> list[str]:
    """The hyperparameters (``PARAMS``) whose value differs between the table's rows: what tells its trials apart.
    The others are one value for the whole sweep, said once rather than as a column."""
    return [p for p in PARAMS if p in table and table[p].astype(str).nunique() > 1]


def best_per_backbone(table: pd.DataFrame, objective: str = OBJECTIVE) -> pd.DataFrame:
    done = table[table["status"] == "FINISHED"]
    return done.sort_values(objective, ascending=False).groupby("backbone", sort=False).head(1).reset_index(drop=True)


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-style markdown table (no extra dependency)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.{digits}g}" if abs(v) < 1e-3 and v else f"{v:.{digits}f}".rstrip("0").rstrip(".")
        return "" if v is None else str(v)

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
