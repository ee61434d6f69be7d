"""``best-export``: the best finished trial by the validation objective, exported and registered."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from pipeline import cost, recipe, safepath
from pipeline.errors import UserError, typed
from pipeline.export import ExportData, ExportedModel
from pipeline.hparams import RunConfig
from pipeline.stats import accuracy_interval
from sweeps import signals
from tracking import layout
from tracking import leaderboard as lb
from tracking import pyfunc, runs
from tracking.intervals import interval_text
from tracking.layout import CHECKPOINT_DIR, MODEL_URI

ALIAS = "champion"


BUDGETS = {layout.LATENCY_MS: ("--max-latency-ms", "MAX_LATENCY_MS"), layout.SIZE_MB: ("--max-size-mb", "MAX_SIZE_MB")}


def _budget(metric: str, value: float | None = None) -> str:
    """The budget's setting as the user typed it (``--max-latency-ms 5``, or ``MAX_LATENCY_MS=5`` under make)."""
    flag, make = BUDGETS[metric]
    return typed(flag, make) if value is None else typed(f"{flag} {value:g}", f"{make}={value:g}")


def within_budget(done: lb.pd.DataFrame, experiment: str, max_latency_ms: float | None = None,
                  max_size_mb: float | None = None) -> tuple[lb.pd.Series, str]:
    """The best finished trial (``done``: the leaderboard's finished rows, best first) whose cost fits the budget,
    and one line saying what it costs against the unconstrained best. A ``UserError`` when no trial fits."""
    limits = _limits(max_latency_ms, max_size_mb)
    best = done.iloc[0]
    if not limits:
        return best, ""
    for metric, value in limits.items():
        if value <= 0:
            raise UserError(f"{_budget(metric, value)} is not a budget; give a number above 0 (in "
                            f"{metric.split('_')[-1]})")
    measured = _measured(done, limits)
    unmeasured = len(done) - len(measured)
    note = (f"; {unmeasured} finished trial(s) have no {'/'.join(limits)} (logged before tlsweep measured costs) "
            "and were not considered" if unmeasured else "")
    fits = fitting(done, max_latency_ms, max_size_mb)
    wanted = " and ".join(f"{m} <= {v:g}" for m, v in limits.items())
    if fits.empty:
        cheapest = ", ".join(f"smallest {m} {measured[m].astype(float).min():g}" for m in limits) if len(measured) \
            else "no trial has cost metrics"
        raise UserError(f"no finished trial of {experiment!r} fits {wanted} ({len(measured)} measured; {cheapest}){note}; "
                        f"raise {' or '.join(_budget(m) for m in limits)}")
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


def _limits(max_latency_ms: float | None, max_size_mb: float | None) -> dict[str, float]:
    """The budget as ``{metric: bound}``, the bounds given only."""
    return {m: v for m, v in ((layout.LATENCY_MS, max_latency_ms), (layout.SIZE_MB, max_size_mb)) if v is not None}


def _measured(done: lb.pd.DataFrame, limits: dict[str, float]) -> lb.pd.DataFrame:
    """The rows of ``done`` that have every metric ``limits`` names."""
    if not all(m in done for m in limits):
        return done.iloc[:0]
    return done.dropna(subset=list(limits))


def fitting(done: lb.pd.DataFrame, max_latency_ms: float | None = None,
            max_size_mb: float | None = None) -> lb.pd.DataFrame:
    """The rows of ``done`` within the budget (all of them without one), in their order."""
    limits = _limits(max_latency_ms, max_size_mb)
    if not limits:
        return done
    fits = _measured(done, limits)
    for metric, value in limits.items():
        fits = fits[fits[metric].astype(float) <= value]
    return fits


def refit_over_budget(refit: dict[str, float], trial: dict[str, float], max_latency_ms: float | None = None,
                      max_size_mb: float | None = None) -> str:
    """One line when the refit's own measured cost (``refit``: its run's metrics) is above the budget its trial
    (``trial``) was chosen within, else "". Same architecture, so on paper the same cost: a difference is noise in
    the latency measurement, and the user decides."""
    over = {m: v for m, v in _limits(max_latency_ms, max_size_mb).items() if refit.get(m, v) > v}
    if not over:
        return ""
    measured = ", ".join(f"{m} {refit[m]:.4g} (the trial's {trial[m]:.4g})" if m in trial else f"{m} {refit[m]:.4g}"
                         for m in over)
    return (f"note: the refit measured {measured}, above {' and '.join(_budget(m, v) for m, v in over.items())}; it "
            "has the trial's architecture, so the difference is measurement noise. Export without "
            f"{typed('--refit', 'REFIT=1')} to ship the trial's own model, or raise "
            f"{' or '.join(_budget(m) for m in over)}")


def why_chosen(chosen: lb.pd.Series, done: lb.pd.DataFrame) -> str:
    """One line saying which estimate placed ``chosen`` first among ``done`` (the rows it was chosen from, best
    first: ``tracking.leaderboard.ranked``); empty when it was the validation accuracy alone, or the budget."""
    by = chosen.get(lb.RANKED_BY, layout.OBJECTIVE)
    if not by or by == layout.OBJECTIVE:
        return ""
    value = float(chosen[by])
    n = int((done[lb.RANKED_BY] == by).sum())
    if n < 2:  # its tied rivals are outside the budget: the budget chose it (within_budget's line says so)
        return ""
    return (f"trial {chosen['trial_id']} chosen by {by} ({value:.4f}) among the {n} trials whose val_accuracy the "
            f"validation split ({int(chosen['validation_size'])} images) cannot tell apart (docs/selection.md)")


def best_run(experiment: str, max_latency_ms: float | None = None, max_size_mb: float | None = None,
             said: list[str] | None = None, why: list[str] | None = None) -> mlflow.entities.Run:
    """The best finished trial, within a latency and size budget if given (``said`` gets the line saying so, ``why``
    the line saying which estimate chose it when it was not the validation accuracy alone)."""
    table = lb.leaderboard(lb.trial_runs(experiment))
    done = table[table["status"] == "FINISHED"]
    if done.empty and not table.empty:  # trials ran, none finished: their errors say why
        states = ", ".join(f"{n} {status}" for status, n in table["status"].value_counts().items())
        raise UserError(f"experiment {experiment!r} has no finished trial ({states}); "
                        f"{typed('tlsweep report', 'make report')} --experiment {experiment} lists their errors")
    if done.empty:
        raise UserError(f"experiment {experiment!r} has no finished trials yet; run a sweep first "
                        f"({typed('tlsweep sweep', 'make sweep')} --experiment {experiment})")
    chosen, line = within_budget(done, experiment, max_latency_ms, max_size_mb)
    if said is not None and line:
        said.append(line)
    if why is not None and (reason := why_chosen(chosen, fitting(done, max_latency_ms, max_size_mb))):
        why.append(reason)
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
    p = runs.values(run)  # its searched params and the values kept as tags (layout.place)
    if layout.RUN_CONFIG not in p:
        raise UserError(f"run {run.info.run_id} has no param {layout.RUN_CONFIG!r} (logged by an older tlsweep); "
                        "run its sweep again with this version to export it")
    config = RunConfig.from_json(p[layout.RUN_CONFIG])
    if layout.PRECISION in p:  # the dtype policy the trial trained with, not "auto" resolved on this machine
        config = dataclasses.replace(config, mixed_precision=p[layout.PRECISION])
    return recipe.plan(config)


def export_checkpoint(run: mlflow.entities.Run, into: str) -> str:
    """Turn a run's logged checkpoint (``trial_model``) into its SavedModel + pyfunc model with the SavedModel's
    cost, logged to the run ``into`` (best-export's own, never the FINISHED ``run``); returns the model URI."""
    from pipeline.export import export_model

    classes = model_classes(run)
    architecture = trial_plan(run).architecture(len(classes))
    with tempfile.TemporaryDirectory() as tmp:
        model = trial_model(run, tmp)
        export = export_model(model, Path(tmp) / layout.SAVEDMODEL_DIR, classes,
                              metadata={"run_id": run.info.run_id, **runs.values(run)})
        sample = np.zeros((1, *model.input_shape[1:]), np.float32)
        probs = np.asarray(model(sample, training=False))  # eager: predict() would trace a function for one image
        _log_cost(into, cost.savedmodel_cost(export, model.count_params(), architecture))
        return pyfunc.log_export(into, str(export), sample, probs)


def export_run(chosen: mlflow.entities.Run) -> str:
    """best-export's own run, for what it makes of ``chosen`` (a SavedModel from its checkpoint, a TFLite file): the
    FINISHED run that trained the model is never written again. Beside ``chosen`` under the sweep's parent, with its
    values, so MLflow shows what was exported; RUNNING until best-export closes it."""
    tags = {k: v for k, v in chosen.data.tags.items() if k.startswith(layout.PARAM_TAG) or k == layout.TRIAL_ID}
    with signals.held():  # a Ctrl-C lands once the run exists: best-export closes it KILLED
        run_id = runs.create_child(chosen.info.experiment_id, chosen.data.tags[layout.PARENT_RUN_ID],
                                   f"export of {chosen.info.run_name}",
                                   {**tags, layout.KIND: layout.EXPORT, layout.EXPORT_OF: chosen.info.run_id})
    runs.log_params(run_id, chosen.data.params)
    return run_id


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

    return list(ast.literal_eval(runs.values(run)["class_names"]))


def best_export(experiment: str, export_dir: str = "exports", overwrite: bool = False, tflite: str | None = None,
                max_latency_ms: float | None = None, max_size_mb: float | None = None, refit: bool = False) -> dict:
    """Export the champion to ``export_dir/<experiment>/``, register it, check it reproduces its test accuracy.

    ``max_latency_ms`` / ``max_size_mb``: the best trial within that budget (``info["budget"]`` says which and what
    it costs against the unconstrained best). ``tflite`` ("float16" or "dynamic") also writes ``model.tflite``,
    checked against the SavedModel. What best-export makes (a SavedModel built from a checkpoint, the TFLite file and
    its figures) goes into a run of its own (``export_run``): the run that trained the model is not written again.
    ``refit``: export the chosen trial's configuration trained again on train+validation (``sweeps.refit``, a run
    of its own) instead of the trial's model; ``info["refit_over_budget"]`` says when its own cost measured above
    the budget."""
    safepath.check_name(experiment, "experiment name", typed("--experiment", "EXPERIMENT="))  # it names the folder
    target = Path(export_dir) / experiment  # only an earlier export is ever replaced, and only with ``overwrite``
    safepath.check_replaceable(target, safepath.EXPORT, typed("--export-dir", "EXPORT_DIR="), overwrite)
    said: list[str] = []
    why: list[str] = []
    run = best_run(experiment, max_latency_ms, max_size_mb, said, why)
    test = run.data.metrics.get(layout.TEST_ACCURACY)
    if test is None or test != test:
        raise UserError(f"the best trial {run.info.run_id} of {experiment!r} has no test score (test_accuracy "
                        f"{test}): its data set had no test images, so its export could not be checked. Give the data "
                        f"a test split (e.g. {typed('--split 75/15/10', 'SPLIT=75/15/10')} or a test/ folder) and sweep "
                        "again")
    trial, over = run, ""
    if refit:
        from sweeps.refit import check_refittable, refit as refit_run

        check_refittable(trial)  # an ensemble has no configuration to read
        run = refit_run(trial, trial_plan(trial).config)
        over = refit_over_budget(run.data.metrics, trial.data.metrics, max_latency_ms, max_size_mb)
    own = None  # best-export's own run (export_run), made only when it has something to log
    try:
        model_run = run
        if MODEL_URI not in run.data.tags:  # the run kept its checkpoint only (log_models: improving or best)
            own = export_run(run)
            export_checkpoint(run, own)
            model_run = MlflowClient().get_run(own)
        info, exported, data = _export(experiment, run, model_run, target, trial if refit else None)
        if tflite:
            own = own or export_run(run)
            info["tflite"] = tflite_parity(exported, data, tflite, own)
    except BaseException as e:
        if own is not None:
            runs.end_run(own, "KILLED" if signals.interruption(e) is not None else "FAILED", f"{type(e).__name__}: {e}")
        raise
    if own is not None:
        runs.end_run(own, "FINISHED")
        info["export_run_id"] = own
    info.update(budget=said[0] if said else None, chosen_by=why[0] if why else None, refit_over_budget=over or None)
    return info


def _export(experiment: str, run: mlflow.entities.Run, model_run: mlflow.entities.Run, target: Path,
            trial: mlflow.entities.Run | None) -> tuple[dict, ExportedModel, ExportData]:
    """Write ``model_run``'s SavedModel to ``target`` with the model card of ``run`` (its scores), register it, and
    check that it reproduces ``run``'s test accuracy. ``trial``: the trial a refit ``run`` trained again."""
    params, metrics = runs.values(run), run.data.metrics
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        local = pyfunc.download_export(model_run, tmp)  # the SavedModel inside the run's pyfunc model
        Path(local, "MODEL_CARD.md").write_text(model_card(experiment, run, model_run))
        safepath.replace_dir(local, target, safepath.EXPORT)

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    version = mlflow.register_model(model_run.data.tags[MODEL_URI], name)
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
            **accuracy_intervals(params, metrics)}
    if trial:  # the trial's own scores beside the refit's: validation chose the trial, test scores both
        info.update(refit_of=trial.info.run_id, trained_on=params.get(layout.TRAINED_ON),
                    trial_test_accuracy=trial.data.metrics.get(layout.TEST_ACCURACY),
                    val_accuracy=trial.data.metrics.get(layout.OBJECTIVE),
                    val_interval=accuracy_intervals(runs.values(trial), trial.data.metrics)["val_interval"])
    return info, exported, data


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


def model_card(experiment: str, run: mlflow.entities.Run, model_run: mlflow.entities.Run | None = None) -> str:
    """The export's MODEL_CARD.md: ``run``'s data, scores and hyperparameters; ``model_run``: where its model was
    logged, if best-export built it (``export_run``)."""
    p, m = runs.values(run), run.data.metrics
    hyper = [k for k in lb.PARAMS if k in p] + ["fine_tune_at", "weights", layout.SEED]
    lines = [
        f"# Model card: {experiment}", "",
        f"- MLflow run: `{run.info.run_id}` (experiment `{experiment}`"
        + (f", trial {run.data.tags[layout.TRIAL_ID]})" if layout.TRIAL_ID in run.data.tags else ")"),
        (f"- Ensemble of the trial runs {run.data.tags[layout.ENSEMBLE_MEMBERS]} (each as often as it counts), "
         f"backbones `{p.get('backbone')}`, input {p.get(layout.RESOLVED_IMAGE_SIZE)} px"
         + (" (one input per member size)" if "+" in str(p.get(layout.RESOLVED_IMAGE_SIZE)) else "")
         if layout.ENSEMBLE_MEMBERS in run.data.tags else
         f"- Backbone: `{p.get('backbone')}` at {p.get(layout.RESOLVED_IMAGE_SIZE)} px, weights `{p.get('weights')}`"),
        *([f"- Refit: the configuration of trial run `{run.data.tags[layout.REFIT_OF]}`, chosen on validation, trained "
           f"again on {p.get(layout.TRAINED_ON)}; its test accuracy below is this model's"]
          if layout.REFIT_OF in run.data.tags else []),
        *([f"- Model: built by best-export from that run's checkpoint, logged in export run `{model_run.info.run_id}`"]
          if model_run is not None and model_run.info.run_id != run.info.run_id else []),
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



