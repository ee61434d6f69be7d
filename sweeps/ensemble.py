"""The sweep's ensemble: the class probabilities of its best trials averaged, chosen on validation only.

Ensemble selection (Caruana et al., 2004): start from the best trial, then add, with replacement, the trial whose
addition to the average most improves validation accuracy (ties: the lower validation log loss), until nothing
improves or ``size`` picks are made. Candidates are the sweep's finished trials that kept a model (with the
default ``log_models: all``, every trial; ``improving``: each trial that matched or beat the best before it), whose
validation and test probabilities the trial logged (``probabilities/probabilities.npz``). Trained models of
different backbones err on different images, so their average is often right where each alone is not.

The ensemble is kept only when it beats the best trial's validation accuracy, first from the logged probabilities,
then as exported: one classifier (``pipeline.model.average_of``: raw 0..255 pixels in; members trained at several
image sizes take one input per size, the photos resized to it as for training) evaluated again on the validation
and test images. It is then logged as a run of
the sweep (kind ``ensemble``) with the same metrics, intervals, cost and pyfunc model as a trial: the leaderboard
ranks it with the trials, and best-export, predict and TFLite take it as they take a trial. The test split is never
used to choose.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from tracking import layout
from tracking import leaderboard as lb

Score = tuple[float, float]  # (accuracy, -log loss): higher is better


def score(probs: np.ndarray, labels: np.ndarray) -> Score:
    """Accuracy and negative mean log loss of class probabilities."""
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(np.mean(probs.argmax(axis=1) == labels)), float(np.mean(np.log(picked)))


def select(val_probs: Sequence[np.ndarray], labels: np.ndarray, size: int) -> list[int]:
    """Indices of the picked candidates, in pick order, with repeats (a repeat weighs a candidate more)."""
    first = max(range(len(val_probs)), key=lambda i: score(val_probs[i], labels))
    picks, total, best = [first], np.array(val_probs[first], np.float64), score(val_probs[first], labels)
    while len(picks) < size:
        tried = [(score((total + p) / (len(picks) + 1), labels), i) for i, p in enumerate(val_probs)]
        found, i = max(tried, key=lambda t: t[0])
        if found <= best:
            break
        picks.append(i)
        total += val_probs[i]
        best = found
    return picks


def candidates(experiment: str, parent: str) -> tuple[lb.pd.DataFrame, list[dict[str, np.ndarray]]]:
    """The sweep's finished trials that logged their probabilities (best first), and those probabilities."""
    table = lb.leaderboard(lb.trial_runs(experiment, parent))
    done = table[table["status"] == "FINISHED"]  # an ensemble run logs no probabilities: never a candidate
    client, rows, probs = MlflowClient(), [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _, row in done.iterrows():
            if not client.list_artifacts(row["run_id"], layout.PROBABILITIES_DIR):
                continue
            path = mlflow.artifacts.download_artifacts(
                run_id=row["run_id"], artifact_path=f"{layout.PROBABILITIES_DIR}/{layout.PROBABILITIES}",
                dst_path=str(Path(tmp) / row["run_id"]))
            with np.load(path) as stored:
                probs.append({k: stored[k] for k in stored.files})
            rows.append(row)
    return lb.pd.DataFrame(rows), probs


def build(experiment: str, parent: str, size: int, say=print) -> str | None:
    """Choose the sweep's ensemble and, when it beats the best trial on validation, log it as a run of the sweep;
    returns that run's id (None: no ensemble, with one line saying why)."""
    if size < 2:
        return None
    rows, probs = candidates(experiment, parent)
    same = [i for i, p in enumerate(probs) if len(probs[0]["val_labels"]) and
            np.array_equal(p["val_labels"], probs[0]["val_labels"]) and
            np.array_equal(p["test_labels"], probs[0]["test_labels"])]  # a resumed sweep on other data: not mixed
    if len(same) < 2:
        say(f"[sweep] ensemble: {len(same)} trial(s) kept a model and their probabilities; an ensemble needs two")
        return None
    rows, probs = rows.iloc[same].reset_index(drop=True), [probs[i] for i in same]
    labels = probs[0]["val_labels"]
    picks = select([p["val_probs"] for p in probs], labels, size)
    alone = max(score(p["val_probs"], labels)[0] for p in probs)
    together = score(sum(probs[i]["val_probs"] for i in picks) / len(picks), labels)[0]
    names = "+".join(str(rows.iloc[i]["trial_id"]) for i in picks)
    if len(set(picks)) < 2 or together <= alone:
        say(f"[sweep] ensemble: no average of {len(rows)} trials with models beats the best trial on validation "
            f"({alone:.4f}); none kept")
        return None
    members = [str(rows.iloc[i]["run_id"]) for i in picks]
    found = existing(experiment, parent, members)
    if found:
        say(f"[sweep] ensemble of trials {names}: already logged as run {found}")
        return found
    say(f"[sweep] ensemble of trials {names}: val_accuracy {together:.4f} from their logged probabilities, against "
        f"{alone:.4f} for the best trial; exporting it and evaluating the export")
    return log_run(experiment, parent, members, names, say, must_beat=alone)


def existing(experiment: str, parent: str, members: list[str]) -> str | None:
    """A finished ensemble run of this sweep with these members (a sweep run again adds no second one)."""
    found = mlflow.search_runs(
        experiment_names=[experiment], output_format="list",
        filter_string=f"tags.`{layout.KIND}` = '{layout.ENSEMBLE}' and tags.`{layout.PARENT_RUN_ID}` = '{parent}' "
                      f"and tags.`{layout.ENSEMBLE_MEMBERS}` = '{','.join(members)}' and attributes.status = 'FINISHED'")
    return found[0].info.run_id if found else None


def log_run(experiment: str, parent: str, members: list[str], names: str, say=print,
            must_beat: float | None = None) -> str | None:
    """Assemble the members' trained classifiers into one, export it, score the export on the validation and test
    images, and log it all as an ensemble run under the sweep's parent; returns the run's id. ``must_beat``: the
    best trial's validation accuracy, which the export itself must beat, else nothing is logged (None returned)."""
    from pipeline.export import ExportedModel, export_model
    from pipeline.model import average_of
    from pipeline.training import loss_and_accuracy
    from sweeps.best import export_data, model_classes, trial_model
    from tracking import runs

    member_runs = {run_id: MlflowClient().get_run(run_id) for run_id in dict.fromkeys(members)}
    first = member_runs[members[0]]
    classes, params = model_classes(first), runs.values(first)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, run in member_runs.items():
            model = trial_model(run, Path(tmp) / run_id)
            model.name = f"trial_{run.data.tags.get(layout.TRIAL_ID, run_id)}"  # unique inside the ensemble
            models[run_id] = model
        model = average_of([models[m] for m in members])
        export = export_model(model, Path(tmp) / layout.SAVEDMODEL_DIR, classes,
                              metadata={"ensemble_members": members, "experiment": experiment})
        served = ExportedModel(export)
        data = export_data(served, params)
        scores = {}
        for split in ("validation", "test"):  # the export's own scores: what best-export checks it against
            batches = list(data.batches(split, 64))
            labels = np.concatenate([y for _, y in batches]) if batches else np.zeros((0,), np.int32)
            probs = (np.concatenate([served.predict(x) for x, _ in batches]) if batches
                     else np.zeros((0, len(classes)), np.float32))
            scores[split] = loss_and_accuracy(labels, probs)
        exported_val = scores["validation"][1]
        if must_beat is not None and not exported_val > must_beat:
            say(f"[sweep] ensemble of trials {names}: its export scores val_accuracy {exported_val:.4f}, not above the "
                f"best trial's {must_beat:.4f}; none kept")
            return None
        exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
        run_id = runs.create_child(exp_id, parent, f"ensemble {names}", {
            layout.KIND: layout.ENSEMBLE, layout.TRIAL_ID: f"{layout.ENSEMBLE} {names}",
            layout.ENSEMBLE_MEMBERS: ",".join(members)})
        try:
            _log(run_id, served, model.count_params(), member_runs, params, data.sizes, scores)
        except BaseException as e:  # the run never stays RUNNING
            runs.end_run(run_id, "FAILED", error=f"{type(e).__name__}: {e}")
            raise
    runs.end_run(run_id, "FINISHED")
    (_, val_acc), (_, test_acc) = scores["validation"], scores["test"]
    say(f"[sweep] ensemble of trials {names} (run {run_id}): val_accuracy {val_acc:.4f}, test_accuracy {test_acc:.4f}")
    return run_id


def _log(run_id: str, served, total_params: int, member_runs: dict, params: dict, sizes: dict, scores: dict) -> None:
    """The ensemble run's params, metrics (measured on its export ``served``), cost and pyfunc model."""
    from pipeline import cost
    from tracking import pyfunc, runs
    from tracking.intervals import interval_metrics

    (val_loss, val_acc), (test_loss, test_acc) = scores["validation"], scores["test"]
    backbones = " & ".join(dict.fromkeys(runs.values(r).get("backbone", "?") for r in member_runs.values()))
    kept, tags = layout.place({"backbone": backbones, layout.RESOLVED_IMAGE_SIZE: "+".join(map(str, served.inputs.values())),
                               layout.SEED: params[layout.SEED], layout.SPLIT: params.get(layout.SPLIT, "default"),
                               **{k: params[k] for k in layout.LINEAGE_PARAMS if k in params}}, ("backbone",))
    runs.log_params(run_id, kept)  # the backbones its comparison with the trials shows; the rest as tags
    MlflowClient().log_batch(run_id, tags=[mlflow.entities.RunTag(k, runs.tag_text(v)) for k, v in tags.items()])
    measured = cost.savedmodel_cost(served.path, total_params)
    metrics = {layout.VAL_ACCURACY: val_acc, layout.VAL_LOSS: val_loss, layout.TEST_ACCURACY: test_acc,
               layout.TEST_LOSS: test_loss, layout.SIZE_MB: measured.size_mb,
               layout.TOTAL_PARAMS: measured.total_params, layout.LATENCY_MS: measured.latency_ms,
               **interval_metrics(val_acc, sizes["validation"], test_acc, sizes["test"])}
    now, client = int(time.time() * 1000), MlflowClient()
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v])
    client.set_tag(run_id, layout.COST_OF, measured.of)
    sample = served.zeros()
    pyfunc.log_export(run_id, str(served.path), sample, served.predict(sample))
