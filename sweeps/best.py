"""``best-export``: the best finished trial by the validation objective, exported and registered."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from pipeline import recipe
from pipeline.data import load_data
from pipeline.errors import UserError
from pipeline.export import ExportedModel
from pipeline.hparams import RunConfig
from pipeline.stats import accuracy_interval
from tracking import layout
from tracking import leaderboard as lb
from tracking import pyfunc
from tracking.intervals import interval_text
from tracking.layout import CHECKPOINT_DIR, MODEL_URI

ALIAS = "champion"


def best_run(experiment: str) -> mlflow.entities.Run:
    table = lb.leaderboard(lb.trial_runs(experiment))
    done = table[table["status"] == "FINISHED"]
    if done.empty:
        raise UserError(f"experiment {experiment!r} has no finished trials yet; run `make sweep` first")
    run = MlflowClient().get_run(done.iloc[0]["run_id"])
    if MODEL_URI not in run.data.tags and not _has_checkpoint(run.info.run_id):
        raise UserError(f"the best trial {run.info.run_id} of {experiment!r} logged no model or checkpoint; "
                        "sweep with log_models: all, improving or best")
    return run


def _has_checkpoint(run_id: str) -> bool:
    return any(f.path.startswith(CHECKPOINT_DIR) for f in MlflowClient().list_artifacts(run_id, CHECKPOINT_DIR))


def export_checkpoint(run: mlflow.entities.Run) -> str:
    """Turn a trial's logged Keras checkpoint (``log_models: best``) into its SavedModel + pyfunc model,
    logged to the trial's run; returns the model URI. The model is assembled by the trial's own recipe
    (its ``RunConfig``, logged beside the checkpoint), as the trial would have exported it."""
    from pipeline.export import export_model, load_keras_model

    p = run.data.params
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=CHECKPOINT_DIR,
                                                          dst_path=tmp))
        if layout.RUN_CONFIG not in p:
            raise UserError(f"run {run.info.run_id} has no param {layout.RUN_CONFIG!r} (logged by an older tlsweep); "
                            "run its sweep again with this version to export it")
        plan = recipe.plan(RunConfig.from_json(p[layout.RUN_CONFIG]))
        model = load_keras_model(recipe.checkpoint_in(folder))
        classes = model_classes(run)
        model = recipe.full_model(plan, len(classes), model)
        export = export_model(model, Path(tmp) / layout.SAVEDMODEL_DIR, classes,
                              metadata={"run_id": run.info.run_id, **p})
        sample = np.zeros((1, *model.input_shape[1:]), np.float32)
        return pyfunc.log_export(run.info.run_id, str(export), sample, model.predict(sample, verbose=0))


def model_classes(run: mlflow.entities.Run) -> list[str]:
    """The trial's class names in index order, as its data lineage logged them."""
    import ast

    return list(ast.literal_eval(run.data.params["class_names"]))


def best_export(experiment: str, export_dir: str = "exports", overwrite: bool = False, tflite: str | None = None) -> dict:
    """Export the champion to ``export_dir/<experiment>/``, register it, check it reproduces its test accuracy.

    ``tflite`` ("float16" or "dynamic") also writes ``model.tflite``, checked against the SavedModel
    and logged to the trial's run with its size."""
    run = best_run(experiment)
    if MODEL_URI not in run.data.tags:
        export_checkpoint(run)
        run = MlflowClient().get_run(run.info.run_id)
    params, metrics = run.data.params, run.data.metrics
    target = Path(export_dir) / experiment
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UserError(f"export directory {target} already exists and is not empty; pass OVERWRITE=1 to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=layout.SAVEDMODEL_DIR, dst_path=tmp)
        Path(local, "MODEL_CARD.md").write_text(model_card(experiment, run))
        if target.exists():
            shutil.rmtree(target)
        os.replace(local, target)

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    version = mlflow.register_model(run.data.tags[MODEL_URI], name)
    MlflowClient().set_registered_model_alias(name, ALIAS, version.version)

    exported = ExportedModel(target)
    data = load_data(params["data_name"], exported.image_size, seed=int(params[layout.SEED]),
                     split=None if params.get(layout.SPLIT, "default") == "default" else params[layout.SPLIT])
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
    if tflite:
        info["tflite"] = tflite_parity(exported, data, tflite, run.info.run_id)
    return info


def tflite_parity(exported: ExportedModel, data, mode: str, run_id: str, split: str = "test") -> dict:
    """Convert to TFLite, compare with the SavedModel on ``split``, log size and parity to the run."""
    from pipeline.export import TFLiteModel, to_tflite

    path = to_tflite(exported.path, mode)
    lite = TFLiteModel(path)
    agree = correct = total = 0
    max_diff = 0.0
    for x, y in data.batches(split, 64):
        ref, got = exported.predict(x.numpy()), lite.predict(x.numpy())
        agree += int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
        correct += int((got.argmax(axis=1) == y.numpy()).sum())
        total += len(y)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
    variables = sum(f.stat().st_size for f in (exported.path / "variables").glob("*"))
    result = {"mode": mode, "path": str(path), "size_bytes": path.stat().st_size, "savedmodel_bytes": variables,
              "agreement": agree / total if total else float("nan"),
              "test_accuracy": correct / total if total else float("nan"), "max_abs_diff": max_diff}
    client = MlflowClient()
    client.log_artifact(run_id, str(path), layout.TFLITE_DIR.format(mode=mode))
    for name in layout.TFLITE_METRICS:
        client.log_metric(run_id, name, float(result[name.removeprefix("tflite_")]))
    return result


def exported_accuracy(exported: ExportedModel, data, split: str = "test") -> float:
    correct = total = 0
    for x, y in data.batches(split, 64):
        correct += int((exported.predict(x.numpy()).argmax(axis=1) == y.numpy()).sum())
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
        f"- Backbone: `{p.get('backbone')}` at {p.get(layout.RESOLVED_IMAGE_SIZE)} px, weights `{p.get('weights')}`",
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



