"""``best-export``: the best finished trial by the validation objective, exported and registered."""

from __future__ import annotations

import dataclasses

import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from pipeline import cost, recipe
from pipeline.errors import UserError
from pipeline.export import ExportData, ExportedModel
from pipeline.hparams import RunConfig
from pipeline.stats import accuracy_interval
from tracking import layout
from tracking import leaderboard as lb
from tracking import pyfunc
from tracking.intervals import interval_text
from tracking.layout import CHECKPOINT_DIR, MODEL_URI

ALIAS = "champion"


BUDGETS = {layout.LATENCY_MS: "MAX_LATENCY_MS", layout.SIZE_MB: "MAX_SIZE_MB"}  # metric -> make variable


def within_budget(done: lb.pd.DataFrame, experiment: str, max_latency_ms: float | None = None,
                  max_size_mb: float | None = None) -> tuple[lb.pd.Series, str]:
    """The best finished trial (``done``: the leaderboard's finished rows, best first) whose cost fits the budget,
    and one line saying what it costs against the unconstrained best. A ``UserError`` when no trial fits."""
    limits = {m: v for m, v in ((layout.LATENCY_MS, max_latency_ms), (layout.SIZE_MB, max_size_mb)) if v is not None}
    best = done.iloc[0]
    if not limits:
        return best, ""
    for metric, value in limits.items():
        if value <= 0:
            raise UserError(f"{BUDGETS[metric]}={value:g} is not a budget; give a number above 0 (in "
                            f"{metric.split('_')[-1]})")
    cols = [m for m in limits if m in done]
    measured = done.dropna(subset=list(limits)) if len(cols) == len(limits) else done.iloc[:0]
    unmeasured = len(done) - len(measured)
    note = (f"; {unmeasured} finished trial(s) have no {'/'.join(limits)} (logged before tlsweep measured costs) "
            "and were not considered" if unmeasured else "")
    fits = measured
    for metric, value in limits.items():
        fits = fits[fits[metric].astype(float) <= value]
    wanted = " and ".join(f"{m} <= {v:g}" for m, v in limits.items())
    if fits.empty:
        cheapest = ", ".join(f"smallest {m} {measured[m].astype(float).min():g}" for m in limits) if len(measured) \
            else "no trial has cost metrics"
        raise UserError(f"no finished trial of {experiment!r} fits {wanted} ({len(measured)} measured; {cheapest}){note}; "
                        f"raise {' or '.join(BUDGETS[m] for m in limits)}")
    chosen = fits.iloc[0]

    def describe(row: lb.pd.Series) -> str:
        costs = ", ".join(f"{m} {float(row[m]):.4g}" for m in (layout.LATENCY_MS, layout.SIZE_MB) if m in row
                          and not lb.pd.isna(row[m]))
        return f"trial {row['trial_id']} (val_accuracy {float(row[layout.OBJECTIVE]):.4f}{', ' + costs if costs else ''})"

    if chosen["run_id"] == best["run_id"]:
        line = f"within {wanted}: {describe(chosen)}, also the unconstrained best{note}"
    else:
        line = f"within {wanted}: {describe(chosen)}; the unconstrained best is {describe(best)}{note}"
    return chosen, line


def best_run(experiment: str, max_latency_ms: float | None = None, max_size_mb: float | None = None,
             said: list[str] | None = None) -> mlflow.entities.Run:
    """The best finished trial, within a latency and size budget if given (``said`` gets the line saying so)."""
    table = lb.leaderboard(lb.trial_runs(experiment))
    done = table[table["status"] == "FINISHED"]
    if done.empty:
        raise UserError(f"experiment {experiment!r} has no finished trials yet; run `make sweep` first")
    chosen, line = within_budget(done, experiment, max_latency_ms, max_size_mb)
    if said is not None and line:
        said.append(line)
    run = MlflowClient().get_run(chosen["run_id"])
    if MODEL_URI not in run.data.tags and not _has_checkpoint(run.info.run_id):
        raise UserError(f"the best trial {run.info.run_id} of {experiment!r} logged no model or checkpoint; "
                        "sweep with log_models: all, improving or best")
    return run


def _has_checkpoint(run_id: str) -> bool:
    return any(f.path.startswith(CHECKPOINT_DIR) for f in MlflowClient().list_artifacts(run_id, CHECKPOINT_DIR))


def trial_model(run: mlflow.entities.Run, folder: str | Path):
    """The trial's full classifier from its logged checkpoint (downloaded into ``folder``: its weights, a head or a
    ``.keras``), assembled by the trial's own recipe (its ``RunConfig``, logged beside the checkpoint), as the trial
    would have exported it."""
    plan = trial_plan(run)
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=CHECKPOINT_DIR,
                                                dst_path=str(folder))
    return recipe.load_checkpoint(plan, len(model_classes(run)), recipe.checkpoint_in(local))


def trial_plan(run: mlflow.entities.Run) -> recipe.Plan:
    """The trial's recipe, planned from the ``RunConfig`` its run logged: what builds its model and keys its cost."""
    p = run.data.params
    if layout.RUN_CONFIG not in p:
        raise UserError(f"run {run.info.run_id} has no param {layout.RUN_CONFIG!r} (logged by an older tlsweep); "
                        "run its sweep again with this version to export it")
    config = RunConfig.from_json(p[layout.RUN_CONFIG])
    if layout.PRECISION in p:  # the dtype policy the trial trained with, not "auto" resolved on this machine
        config = dataclasses.replace(config, mixed_precision=p[layout.PRECISION])
    return recipe.plan(config)


def export_checkpoint(run: mlflow.entities.Run) -> str:
    """Turn a trial's logged checkpoint (``trial_model``) into its SavedModel + pyfunc model,
    logged to the trial's run; returns the model URI."""
    from pipeline.export import export_model

    classes = model_classes(run)
    architecture = trial_plan(run).architecture(len(classes))
    with tempfile.TemporaryDirectory() as tmp:
        model = trial_model(run, tmp)
        export = export_model(model, Path(tmp) / layout.SAVEDMODEL_DIR, classes,
                              metadata={"run_id": run.info.run_id, **run.data.params})
        sample = np.zeros((1, *model.input_shape[1:]), np.float32)
        probs = np.asarray(model(sample, training=False))  # eager: predict() would trace a function for one image
        _log_cost(run.info.run_id, cost.savedmodel_cost(export, model.count_params(), architecture))
        return pyfunc.log_export(run.info.run_id, str(export), sample, probs)


def export_data(exported: ExportedModel, params: dict):
    """The splits of the data set a run trained on (its logged name, seed and split), as ``exported`` takes them."""
    return exported.load_data(params["data_name"], int(params[layout.SEED]),
                              None if params.get(layout.SPLIT, "default") == "default" else params[layout.SPLIT])


def _log_cost(run_id: str, measured: cost.Cost) -> None:
    """The SavedModel's cost replaces the in-memory one the trial logged (``tlsweep.cost_of`` says which)."""
    client = MlflowClient()
    for name in layout.COST_METRICS:
        client.log_metric(run_id, name, float(getattr(measured, name)))
    client.set_tag(run_id, layout.COST_OF, measured.of)


def model_classes(run: mlflow.entities.Run) -> list[str]:
    """The trial's class names in index order, as its data lineage logged them."""
    import ast

    return list(ast.literal_eval(run.data.params["class_names"]))


def best_export(experiment: str, export_dir: str = "exports", overwrite: bool = False, tflite: str | None = None,
                max_latency_ms: float | None = None, max_size_mb: float | None = None) -> dict:
    """Export the champion to ``export_dir/<experiment>/``, register it, check it reproduces its test accuracy.

    ``max_latency_ms`` / ``max_size_mb``: the best trial within that budget (``info["budget"]`` says which and what
    it costs against the unconstrained best). ``tflite`` ("float16" or "dynamic") also writes ``model.tflite``,
    checked against the SavedModel and logged to the trial's run with its size and latency."""
    said: list[str] = []
    run = best_run(experiment, max_latency_ms, max_size_mb, said)
    test = run.data.metrics.get(layout.TEST_ACCURACY)
    if test is None or test != test:
        raise UserError(f"the best trial {run.info.run_id} of {experiment!r} has no test score (test_accuracy "
                        f"{test}): its data set had no test images, so its export could not be checked. Give the data "
                        "a test split (e.g. SPLIT=75/15/10 or a test/ folder) and sweep again")
    if MODEL_URI not in run.data.tags:
        export_checkpoint(run)
        run = MlflowClient().get_run(run.info.run_id)
    params, metrics = run.data.params, run.data.metrics
    target = Path(export_dir) / experiment
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UserError(f"export directory {target} already exists and is not empty; pass OVERWRITE=1 to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        local = pyfunc.download_export(run, tmp)  # the SavedModel inside the trial's pyfunc model
        Path(local, "MODEL_CARD.md").write_text(model_card(experiment, run))
        if target.exists():
            shutil.rmtree(target)
        os.replace(local, target)

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    version = mlflow.register_model(run.data.tags[MODEL_URI], name)
    MlflowClient().set_registered_model_alias(name, ALIAS, version.version)

    exported = ExportedModel(target)
    data = export_data(exported, params)
    reproduced = exported_accuracy(exported, data)
    logged = float(metrics[layout.TEST_ACCURACY])
    tolerance = 1.0 / max(data.sizes["test"], 1) + 1e-6  # one borderline image at most
    if abs(reproduced - logged) > tolerance:
        raise RuntimeError(
            f"export at {target} gives test accuracy {reproduced:.4f} but run {run.info.run_id} logged {logged:.4f}")
    info = {"run_id": run.info.run_id, "path": str(target), "model_name": name, "version": version.version,
            "test_size": data.sizes["test"],
            "val_accuracy": metrics.get(layout.OBJECTIVE), "test_accuracy": logged, "reproduced_test_accuracy": reproduced,
            "budget": said[0] if said else None, **accuracy_intervals(params, metrics)}
    if tflite:
        info["tflite"] = tflite_parity(exported, data, tflite, run.info.run_id)
    return info


def tflite_parity(exported: ExportedModel, data: ExportData, mode: str, run_id: str, split: str = "test") -> dict:
    """Convert to TFLite, compare with the SavedModel on ``split``, log size and parity to the run."""
    from pipeline.export import TFLiteModel, to_tflite

    path = to_tflite(exported.path, mode)
    lite = TFLiteModel(path)
    agree = correct = total = 0
    max_diff = 0.0
    for x, y in data.batches(split, 64):
        ref, got = exported.predict(x), lite.predict(x)
        agree += int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
        correct += int((got.argmax(axis=1) == y).sum())
        total += len(y)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
    variables = sum(f.stat().st_size for f in (exported.path / "variables").glob("*"))
    latency = cost.latency_ms(lambda x: lite.predict(x), exported.input_shape)  # CPU, batch 1, as for the SavedModel
    result = {"mode": mode, "path": str(path), "size_bytes": path.stat().st_size, "savedmodel_bytes": variables,
              "agreement": agree / total if total else float("nan"),
              "test_accuracy": correct / total if total else float("nan"), "max_abs_diff": max_diff,
              "latency_ms": latency}
    client = MlflowClient()
    client.log_artifact(run_id, str(path), layout.TFLITE_DIR.format(mode=mode))
    for name in layout.TFLITE_METRICS:
        client.log_metric(run_id, name, float(result[name.removeprefix("tflite_")]))
    return result


def exported_accuracy(exported: ExportedModel, data: ExportData, split: str = "test") -> float:
    correct = total = 0
    for x, y in data.batches(split, 64):
        correct += int((exported.predict(x).argmax(axis=1) == y).sum())
        total += len(y)
    return correct / total if total else float("nan")


def accuracy_intervals(params: dict, metrics: dict) -> dict[str, tuple[float, float]]:
    """``val_interval`` and ``test_interval``: 95 % Wilson intervals of the run's accuracies on its split sizes."""
    return {f"{split}_interval": accuracy_interval(metrics.get(metric), int(params.get(size) or 0))
            for split, metric, size in (("val", layout.OBJECTIVE, "validation_size"),
                                        ("test", layout.TEST_ACCURACY, "test_size"))}


def model_card(experiment: str, run: mlflow.entities.Run) -> str:
    p, m = run.data.params, run.data.metrics
    hyper = [k for k in lb.PARAMS if k in p] + ["fine_tune_at", "weights", layout.SEED]
    lines = [
        f"# Model card: {experiment}", "",
        f"- MLflow run: `{run.info.run_id}` (experiment `{experiment}`, trial {run.data.tags.get(layout.TRIAL_ID)})",
        (f"- Ensemble of the trial runs {run.data.tags[layout.ENSEMBLE_MEMBERS]} (each as often as it counts), "
         f"backbones `{p.get('backbone')}`, input {p.get(layout.RESOLVED_IMAGE_SIZE)} px"
         + (" (one input per member size)" if "+" in str(p.get(layout.RESOLVED_IMAGE_SIZE)) else "")
         if layout.ENSEMBLE_MEMBERS in run.data.tags else
         f"- Backbone: `{p.get('backbone')}` at {p.get(layout.RESOLVED_IMAGE_SIZE)} px, weights `{p.get('weights')}`"),
        f"- Classes: {p.get('class_names')}",
        f"- Data: `{p.get('data_name')}` ({p.get('data_source')}), split `{p.get('split_spec')}`, sizes "
        f"train {p.get('train_size')} / validation {p.get('validation_size')} / test {p.get('test_size')}, "
        f"skipped files {p.get('skipped_files')}, fingerprint `{p.get('data_fingerprint')}`", "",
        "## Metrics", "",
        *(f"- {k}: {m[k]:.4f}" for k in (layout.VAL_ACCURACY, layout.TEST_ACCURACY, layout.TEST_LOSS) if k in m),
        *(f"- {k.replace('_interval', '_accuracy')}: 95 % Wilson interval {interval_text(*v)} on {p.get(n)} images"
          for (k, v), n in zip(accuracy_intervals(p, m).items(), ("validation_size", "test_size"))
          if interval_text(*v)), "",
        "## Hyperparameters", "",
        *(f"- {k}: {p[k]}" for k in dict.fromkeys(hyper) if k in p), "",
        "## Use", "",
        "`tf.saved_model.load(dir).signatures['serving_default']` takes float32 `[N, H, W, 3]` raw 0..255 pixels and",
        "returns class probabilities in the order of `labels.txt`.", "",
    ]
    return "\n".join(lines)



