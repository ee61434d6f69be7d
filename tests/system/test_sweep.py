"""End-to-end sweeps on generated images into a per-test SQLite store."""

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import children_sigint, trial_workers
from sweeps.best import best_export
from sweeps.cli import main as sweeps_main
from sweeps.run import run_sweep
from tracking.layout import OBJECTIVE, PARAM_TAG, TRIAL_ID
from tracking.pyfunc import download_export
from tracking.runs import values

WITHOUT_PROJECT = """
import json, os, sys
sys.path = [p for p in sys.path if p and os.path.realpath(p) != sys.argv[1]]  # the checkout itself
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # `pip install -e .`
try:
    import tracking
    raise SystemExit("the project is still importable from " + str(tracking.__path__))
except ImportError:
    pass
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[2])
print(json.dumps(model.predict(np.full(json.loads(sys.argv[3]), 128.0, np.float32)).tolist()))
"""


def load_without_project(model_dir: str, shape: tuple) -> list:
    """Predictions of a pyfunc model loaded in a Python process that cannot import this project."""
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", WITHOUT_PROJECT, root, model_dir, json.dumps(shape)],
                          cwd=model_dir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

TINY = {
    "tuner": "grid",
    "max_trials": 4,
    "log_models": "all",  # every finished trial logs its model (exported in the trial's process)
    "trial_process": "same",  # fast; fresh trial processes have their own tests (test_trial, the Ctrl-C test)
    "space": {
        # a learning rate of 1e38 turns the loss NaN: those trials must fail cleanly while the sweep goes on.
        "backbone": {"fixed": "efficientnet_lite0"},
        "dropout": {"choice": [0.1, 0.3]},
        "image_size": {"fixed": 32},
        "epochs": {"fixed": 2},
        "fine_tune_epochs": {"fixed": 1},
        "fine_tune_at": {"fixed": 120},
        "learning_rate": {"choice": [0.01, 1.0e38]},
        "batch_size": {"fixed": 8},
    },
}


def write_sweep(tmp_path: Path, config: dict, name: str = "tiny") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def children(experiment: str, parent: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.fixture(scope="module")
def _sweep_once(tmp_path_factory, class_folder):
    """One real sweep per module (it takes a minute); tests get their own copy of its store."""
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    parent = run_sweep(str(class_folder), sweep=write_sweep(root, TINY), experiment="tiny", split="60/20/20",
                       state_dir=str(root / "state"), tracking_uri=uri, verbose=0)
    return root, parent


@pytest.fixture
def swept(_sweep_once, tmp_path, monkeypatch):
    """A private copy of the swept store (artifacts stay where the sweep wrote them), same checks."""
    root, parent = _sweep_once
    shutil.copy(root / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(root / "state", tmp_path / "state")
    (tmp_path / "tiny.yaml").write_text((root / "tiny.yaml").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield tmp_path, parent
    assert mlflow.active_run() is None
    exp = mlflow.get_experiment_by_name("tiny")
    assert not MlflowClient().search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


def test_sweep_tracks_every_trial(swept, class_folder):
    tmp_path, parent = swept
    client = MlflowClient()
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params["tuner"] == "grid" and parent_run.data.params["max_trials"] == "4"
    kids = children("tiny", parent)
    assert len(kids) == 4 and len({k.data.tags[TRIAL_ID] for k in kids}) == 4
    done = [k for k in kids if k.info.status == "FINISHED"]
    failed = [k for k in kids if k.info.status == "FAILED"]
    assert {k.data.params["learning_rate"] for k in done} == {"0.01"}
    assert {k.data.params["learning_rate"] for k in failed} == {"1e+38"}
    assert all("loss became NaN/inf; lower the learning rate" in k.data.tags["error"] for k in failed)

    run = done[0]
    # the searched hyperparameters are the run's params (what MLflow's compare page lines up); every other value,
    # fixed ones and the data lineage with its class names, is a tag, and reads back with the rest
    assert set(run.data.params) == {"dropout", "learning_rate"} and run.data.params["learning_rate"] == "0.01"
    assert run.data.tags[f"{PARAM_TAG}backbone"] == "efficientnet_lite0"
    p = values(run)
    for name in ("backbone", "fine_tune_at", "dropout", "batch_size", "learning_rate", "fine_tune_learning_rate"):
        assert name in p
    assert p["data_name"] == str(class_folder) and p["class_names"] == "['blue', 'green', 'red']"
    assert p["data_fingerprint"] and p["skipped_files"] == "0" and p["split"] == "60/20/20"
    assert (p["train_size"], p["validation_size"], p["test_size"]) == ("21", "9", "6")
    assert p["feature_cache"] == "True", "heads of a frozen backbone train on cached features"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2], key  # both phases on one axis
    m = run.data.metrics
    assert 0 <= m["test_accuracy"] <= 1 and m["test_loss"] > 0 and m["trainable_params"] > 0
    assert m["wall_seconds"] > m["train_seconds"] > 0, "the whole trial includes its plots and export"
    # its cost, measured on the SavedModel it exported (log_models: all)
    assert run.data.tags["tlsweep.cost_of"] == "savedmodel" and m["total_params"] > m["trainable_params"]
    assert m["size_mb"] > m["total_params"] * 4 / 1e6 and 0 < m["latency_ms"] < 5000
    from pipeline.stats import accuracy_interval
    assert (m["val_accuracy_low"], m["val_accuracy_high"]) == pytest.approx(accuracy_interval(m["val_accuracy"], 9))
    assert (m["test_accuracy_low"], m["test_accuracy_high"]) == pytest.approx(accuracy_interval(m["test_accuracy"], 6))

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "plots" in artifacts and "savedmodel" not in artifacts, "the SavedModel is stored once, in the model"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/confusion_matrix.png", "plots/learning_curves.png", "plots/predictions.png"}
    # each trial's SavedModel variables are on disk exactly once: inside its pyfunc model, not in its run too
    store = Path(urllib.parse.urlparse(mlflow.get_experiment_by_name("tiny").artifact_location).path)
    with_model = [k for k in done if "tlsweep.model_uri" in k.data.tags]
    variables = sorted(store.rglob("variables.data-*"))
    assert len(variables) == len(with_model) == len(done), variables
    assert not [v for v in variables for k in done if k.info.run_id in v.parts], "none in a run's own artifacts"
    # MLflow 3: the splits as datasets (contexts training / validation / test) and system metrics while it trained
    inputs = run.inputs.dataset_inputs
    assert sorted(t.value for d in inputs for t in d.tags if t.key == "mlflow.data.context") == [
        "test", "training", "validation"]
    assert all(d.dataset.digest and str(class_folder) in d.dataset.source for d in inputs)
    assert {k for k in run.data.metrics if k.startswith("system/")} >= {
        "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    with tempfile.TemporaryDirectory() as tmp:
        export = download_export(run, tmp)
        assert (export / "saved_model.pb").is_file() and (export / "labels.txt").read_text().split() == [
            "blue", "green", "red"]

    model = mlflow.pyfunc.load_model(run.data.tags["tlsweep.model_uri"])
    probs = model.predict(np.full((2, 32, 32, 3), 128.0, np.float32))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The logged model carries its own code: it loads and predicts where this project is not installed
    # (as in the environment `mlflow models serve` builds from its requirements).
    local = mlflow.artifacts.download_artifacts(run.data.tags["tlsweep.model_uri"], dst_path=str(tmp_path / "m"))
    np.testing.assert_allclose(load_without_project(local, (2, 32, 32, 3)), probs, atol=1e-5)

    parent_artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"leaderboard.csv", "leaderboard.md", "search_space.json", "sweep"} <= parent_artifacts
    best = parent_run.data.tags["tlsweep.best_run_id"]
    assert best in {k.info.run_id for k in done}
    assert client.get_run(best).data.metrics["val_accuracy"] == max(k.data.metrics["val_accuracy"] for k in done)


@pytest.mark.slow
def test_running_again_continues_without_redoing_trials(swept, class_folder, capsys):
    tmp_path, parent = swept
    sweep = write_sweep(tmp_path, TINY)
    again = run_sweep(str(class_folder), sweep=sweep, experiment="tiny", split="60/20/20",
                      state_dir=str(tmp_path / "state"), verbose=0)
    assert again == parent and len(children("tiny", parent)) == 4

    more = {**TINY, "tuner": "random", "max_trials": 1, "log_models": "improving"}
    sweep2 = write_sweep(tmp_path, more, name="more")
    first = run_sweep(str(class_folder), sweep=sweep2, experiment="tiny", state_dir=str(tmp_path / "state"), verbose=0)
    assert first != parent and len(children("tiny", first)) == 1
    run_sweep(str(class_folder), sweep=sweep2, experiment="tiny", max_trials=2, state_dir=str(tmp_path / "state"),
              verbose=0)
    kids = sorted(children("tiny", first), key=lambda r: r.data.tags[TRIAL_ID])
    assert len(kids) == 2
    # log_models: improving -- the first finished trial of each process always logs its model
    # (failed trials, e.g. those whose loss turned NaN, log none)
    for kid in kids:
        assert ("tlsweep.model_uri" in kid.data.tags) == (kid.info.status == "FINISHED"), kid.data.tags[TRIAL_ID]


@pytest.mark.parametrize("same_values", [True, False])
def test_a_trial_that_finished_before_the_oracle_heard_of_it_is_kept_not_trained_again(swept, class_folder, capsys,
                                                                                         same_values):
    """A sweep stopped between a trial's run being written and Keras Tuner saving its end: the same command again
    gets that trial back from the oracle (an ongoing trial is retried on reload), and keeps its finished run; but
    only when that run logged the same hyperparameters (else, e.g. a deleted search state and a kept store, the
    trial of that id is another configuration, and it trains)."""
    tmp_path, parent = swept
    (oracle_file,) = (tmp_path / "state").rglob("oracle.json")
    state = json.loads(oracle_file.read_text())
    finished = {r.data.tags[TRIAL_ID]: r for r in children("tiny", parent) if r.info.status == "FINISHED"}
    last = [t for t in state["end_order"] if t in finished][-1]  # the oracle now thinks it is still running
    state["ongoing_trials"], state["end_order"] = {"tuner0": last}, [t for t in state["end_order"] if t != last]
    oracle_file.write_text(json.dumps(state))
    (trial_file,) = oracle_file.parent.glob(f"trial_{last}/trial.json")
    trial = json.loads(trial_file.read_text())
    trial["status"] = "RUNNING"
    if not same_values:
        values = trial["hyperparameters"]["values"]
        values["dropout"] = 0.3 if values["dropout"] == 0.1 else 0.1
    trial_file.write_text(json.dumps(trial))
    capsys.readouterr()
    again = run_sweep(str(class_folder), sweep=write_sweep(tmp_path, TINY), experiment="tiny", split="60/20/20",
                      state_dir=str(tmp_path / "state"), verbose=0)
    out = capsys.readouterr().out
    score = finished[last].data.metrics[OBJECTIVE]
    kept = (f"[sweep] trial {last} had finished before the sweep was stopped (run {finished[last].info.run_id}, "
            f"{OBJECTIVE} {score:.4f}): its result is kept, it is not trained again")
    assert again == parent
    kids = children("tiny", parent)
    if same_values:
        assert kept in out, out
        assert sorted(r.data.tags[TRIAL_ID] for r in kids) == sorted({r.data.tags[TRIAL_ID] for r in kids}), \
            "no trial twice"
        assert len(kids) == 4
    else:
        assert kept not in out, out
        dropouts = sorted(r.data.params["dropout"] for r in kids if r.data.tags[TRIAL_ID] == last)
        assert dropouts == ["0.1", "0.3"] and len(kids) == 5, "the other configuration trained beside the first"


def test_best_export_registers_and_reproduces(swept, capsys):
    tmp_path, parent = swept
    info = best_export("tiny", export_dir=str(tmp_path / "exports"), tflite="float16")
    assert info["run_id"] == MlflowClient().get_run(parent).data.tags["tlsweep.best_run_id"]
    lite = info["tflite"]
    assert lite["agreement"] >= 5 / 6 and lite["max_abs_diff"] < 0.05, "float16 weights barely move probabilities"
    assert 0 < lite["size_bytes"] < lite["savedmodel_bytes"]
    own = MlflowClient().get_run(info["export_run_id"])  # best-export's own run, never the FINISHED trial's
    assert own.data.tags["tlsweep.export_of"] == info["run_id"] and own.info.status == "FINISHED"
    assert own.data.metrics["tflite_size_bytes"] == lite["size_bytes"]
    assert own.data.metrics["tflite_latency_ms"] == lite["latency_ms"] > 0
    assert "tflite_size_bytes" not in MlflowClient().get_run(info["run_id"]).data.metrics
    assert (Path(info["path"]) / "model.tflite").is_file()
    target = Path(info["path"])
    assert {"saved_model.pb", "labels.txt", "MODEL_CARD.md"} <= {p.name for p in target.iterdir()}
    assert (target / "labels.txt").read_text().split() == ["blue", "green", "red"]
    card = (target / "MODEL_CARD.md").read_text()
    assert info["run_id"] in card and "fingerprint" in card
    version = MlflowClient().get_model_version_by_alias("tiny", "champion")
    assert version.version == info["version"]
    assert abs(info["reproduced_test_accuracy"] - info["test_accuracy"]) <= 1 / 6 + 1e-6
    assert info["test_size"] == 6, "parity is checked on the trial's own split (60/20/20), not the default"
    from pipeline.stats import accuracy_interval
    assert info["test_interval"] == pytest.approx(accuracy_interval(info["test_accuracy"], 6))
    assert "test_accuracy: 95 % Wilson interval [" in card

    assert sweeps_main(["best-export", "--experiment", "tiny", "--export-dir", str(tmp_path / "exports")]) == 2
    assert "already exists (tlsweep's export); pass --overwrite to replace it" in capsys.readouterr().err
    assert sweeps_main(["report", "--experiment", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "leaderboard of 'tiny' (4 trials" in out and "best per backbone" in out
    assert "| val_95 |" in out and "tied" in out


@pytest.mark.slow
def test_log_models_best_keeps_checkpoints_and_best_export_builds_the_winner(tmp_path, tracking_store, class_folder,
                                                                            capsys):
    config = {**TINY, "max_trials": 2, "log_models": "best", "space": {
        **TINY["space"], "learning_rate": {"fixed": 0.01}, "dropout": {"fixed": 0.1},
        "fine_tune": {"boolean": True}}}
    parent = run_sweep(str(class_folder), sweep=write_sweep(tmp_path, config), experiment="lean", split="60/20/20",
                       state_dir=str(tmp_path / "state"), verbose=0)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep] ")]
    assert len(progress) == 2 and progress[0].startswith("[sweep] trial 0 (1/2) | val_accuracy ")
    assert "| best " in progress[0] and "| ETA 0:00:" in progress[0] and progress[1].endswith("| last trial")
    client = MlflowClient()
    kids = children("lean", parent)
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    for kid in kids:
        head_only = values(kid)["fine_tune"] == "False"
        assert {a.path for a in client.list_artifacts(kid.info.run_id)} == {"plots", "checkpoint", "probabilities"}
        assert [a.path for a in client.list_artifacts(kid.info.run_id, "checkpoint")] == [
            "checkpoint/head.keras" if head_only else "checkpoint/weights.npz"]  # a full model's weights
        assert "tlsweep.model_uri" not in kid.data.tags
    info = best_export("lean", export_dir=str(tmp_path / "exports"))
    assert abs(info["reproduced_test_accuracy"] - info["test_accuracy"]) <= 1 / 6 + 1e-6
    best = client.get_run(info["run_id"])
    assert "tlsweep.model_uri" not in best.data.tags, "the FINISHED trial is not written again"
    own = client.get_run(info["export_run_id"])  # the SavedModel built from the checkpoint lives in its own run
    assert own.data.tags["tlsweep.export_of"] == best.info.run_id and own.info.status == "FINISHED"
    assert "tlsweep.model_uri" in own.data.tags
    assert not client.list_artifacts(own.info.run_id, "savedmodel"), "the SavedModel is only in the pyfunc model"
    champion = mlflow.pyfunc.load_model("models:/lean@champion")  # the registered model, by its alias
    assert champion.predict(np.full((1, 32, 32, 3), 128.0, np.float32)).shape == (1, 3)


def test_report_is_self_contained_html_and_markdown(swept, capsys):
    tmp_path, parent = swept
    assert sweeps_main(["report", "--experiment", "tiny", "--out-dir", str(tmp_path / "reports")]) == 0
    page_path = tmp_path / "reports" / "tiny" / "report.html"
    assert f"report (markdown beside it): {page_path.resolve()}" in capsys.readouterr().out
    page = page_path.read_text()
    for kid in children("tiny", parent):
        assert f"/#/experiments/{kid.info.experiment_id}/runs/{kid.info.run_id}" in page, "every trial links to mlflow ui"
    # 4 sweep charts (by backbone, parallel coordinates, Pareto fronts against latency and size) + the best
    # trial's curves, confusion matrix, predictions
    assert page.count('src="data:image/png;base64,') == 7 and 'src="http' not in page
    assert "latency_<wbr>ms" in page and "size_<wbr>mb" in page  # headers wrap at their underscores
    assert "loss became NaN/inf; lower the learning rate" in page, "failed trials are listed with their error"
    md = (page_path.parent / "report.md").read_text()
    assert "## Leaderboard" in md and "![predictions.png](predictions.png)" in md
    assert "95 % Wilson interval" in md and "| val_95 |" in md and "| tied |" in md and "(95 % [" in page
    assert (page_path.parent / "predictions.png").is_file()
    parent_plots = {a.path for a in MlflowClient().list_artifacts(parent, "plots")}
    assert parent_plots == {"plots/val_accuracy_by_backbone.png", "plots/parallel_coordinates.png",
                            "plots/pareto_latency.png", "plots/pareto_size.png"}


def test_report_renders_in_headless_chromium(swept, chromium):
    from PIL import Image

    from support import headless

    tmp_path, _ = swept
    sweeps_main(["report", "--experiment", "tiny", "--out-dir", str(tmp_path / "reports")])
    shot = tmp_path / "report.png"
    headless(chromium, tmp_path / "chrome", "--window-size=1200,2400", f"--screenshot={shot}",
             (tmp_path / "reports" / "tiny" / "report.html").as_uri())
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (2400, 1200)
    assert (pixels < 128).mean() > 0.01, "text, tables and plots, not a blank page"


def test_report_and_best_export_on_missing_experiment(tracking_store, capsys):
    assert sweeps_main(["report", "--experiment", "nope"]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_hyperband_promotions_continue_two_phase_trials(tmp_path, tracking_store, class_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "tuner": "hyperband",
        "log_models": "improving",
        "hyperband": {"max_epochs": 2, "factor": 2},
        "space": {**TINY["space"], "learning_rate": {"fixed": 0.01}, "dropout": {"choice": [0.1, 0.3]},
                  "epochs": {"fixed": 1}, "fine_tune_epochs": {"fixed": 1}},
    }
    parent = run_sweep(str(class_folder), sweep=write_sweep(tmp_path, config, "hb"), experiment="hb",
                       state_dir=str(tmp_path / "state"), verbose=0)
    client = MlflowClient()
    kids = children("hb", parent)
    assert kids and all(k.info.status == "FINISHED" for k in kids)
    promoted = [k for k in kids if "tuner/trial_id" in values(k)]
    assert promoted, "hyperband should promote at least one trial"
    by_trial = {k.data.tags[TRIAL_ID]: k for k in kids}
    for run in promoted:
        start = int(values(run)["tuner/initial_epoch"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert start == 1 and steps == [1], "a promoted trial runs only the epochs it was promoted for"
        assert values(run)["tuner/trial_id"] in by_trial
        # epoch 1 is the first fine-tuning epoch: backbone layers were unfrozen and recompiled
        assert run.data.metrics["trainable_params"] > by_trial[values(run)["tuner/trial_id"]].data.metrics["trainable_params"]
    # log_models: improving -- a trial logs its model exactly when it reaches or beats every trial before it
    best = None
    for run in sorted(kids, key=lambda r: r.info.start_time):
        value = run.data.metrics["val_accuracy"]
        assert ("tlsweep.model_uri" in run.data.tags) == (best is None or value >= best), run.data.tags[TRIAL_ID]
        best = value if best is None else max(best, value)


def test_sweep_whose_trials_keep_failing_stops_with_a_clear_message(tmp_path, tracking_store, class_folder,
                                                                    monkeypatch):
    from pipeline.errors import UserError

    monkeypatch.chdir(tmp_path)
    config = {"tuner": "random", "max_trials": 5, "max_consecutive_failed_trials": 2,
              "space": {"backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32},
                        "learning_rate": {"fixed": 1.0e38}, "epochs": {"fixed": 1}, "fine_tune": {"fixed": False},
                        "dropout": {"choice": [0.1, 0.2, 0.3, 0.4]}}}
    with pytest.raises(UserError, match=r"sweep stopped: 2 trials failed in a row; last error: .*loss became NaN/inf; "
                                        r"lower the learning rate.*run the same command again with --on-change restart"):
        run_sweep(str(class_folder), sweep=write_sweep(tmp_path, config, "bad"), experiment="bad",
                  state_dir=str(tmp_path / "state"), verbose=0)
    exp = mlflow.get_experiment_by_name("bad")
    runs = MlflowClient().search_runs([exp.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FAILED"]  # parent + 2 trials


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_sweep_leaves_no_run_running(tmp_path, tracking_store, class_folder, sig):
    import os

    # augmentation keeps the backbone in every epoch (no feature cache), so the trial is really long
    config = {"tuner": "random", "max_trials": 3,
              "space": {**TINY["space"], "learning_rate": {"fixed": 0.01}, "epochs": {"fixed": 5000},
                        "augment": {"fixed": True}}}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with children_sigint():  # as from a terminal
        proc = subprocess.Popen(
            [sys.executable, "-m", "sweeps.cli", "sweep", "--dataset", str(class_folder), "--sweep",
             write_sweep(tmp_path, config, "long"), "--experiment", "interrupt", "--state-dir", str(tmp_path / "state"),
             "--tracking-uri", tracking_store, "--quiet"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    try:
        _interrupt_and_check(proc, tracking_store, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _interrupt_and_check(proc, tracking_store, sig):
    import signal
    import time

    client = MlflowClient(tracking_store)
    deadline = time.time() + 240
    trial = None
    while time.time() < deadline and trial is None and proc.poll() is None:
        time.sleep(2)
        exp = client.get_experiment_by_name("interrupt")
        found = client.search_runs([exp.experiment_id], "tags.`tlsweep.kind` = 'trial'") if exp else []
        trial = found[0] if found else None
    if trial is None:  # say why: the sweep's own output
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"the trial never started (the sweep's exit code {proc.returncode}):\n{err[-3000:]}")
    time.sleep(3)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    children = psutil.Process(proc.pid).children(recursive=True)  # the trial's own process, and helpers
    assert trial_workers(of=proc.pid), "an augmented trial runs in a fresh process"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running after the sweep ended: {[c.cmdline() for c in alive]}"
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again to continue" in err and "Traceback" not in err
    runs = client.search_runs([client.get_experiment_by_name("interrupt").experiment_id])
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]  # the parent and its trial


@pytest.mark.slow
def test_sigkill_mid_trial_then_the_same_command_resumes(tmp_path, tracking_store, class_folder):
    """kill -9 during trial 2; rerun: trial 1 is not redone, trial 2 is, the orphan run is closed as KILLED."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = {"tuner": "grid", "max_trials": 2,
              "space": {**TINY["space"], "learning_rate": {"fixed": 0.01}, "epochs": {"fixed": 40},
                        "augment": {"fixed": True}, "fine_tune_epochs": {"fixed": 0}}}
    command = [sys.executable, "-m", "sweeps.cli", "sweep", "--dataset", str(class_folder), "--sweep",
               write_sweep(tmp_path, config, "killme"), "--experiment", "killed", "--state-dir",
               str(tmp_path / "state"), "--tracking-uri", tracking_store, "--quiet"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(tracking_store)

    def trials():
        exp = client.get_experiment_by_name("killed")
        return client.search_runs([exp.experiment_id], "tags.`tlsweep.kind` = 'trial'") if exp else []

    deadline = time.time() + 300
    while time.time() < deadline:  # wait until trial 1 finished and trial 2 is running
        runs = trials()
        if any(r.info.status == "FINISHED" for r in runs) and any(r.info.status == "RUNNING" for r in runs):
            break
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.5)
    else:
        pytest.fail("never saw trial 2 running")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed = [r for r in trials() if r.info.status == "RUNNING"]
    assert len(killed) == 1, "the killed trial's run is left RUNNING by a dead process"

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"closed 1 trial run(s) left RUNNING by a process that died: {killed[0].info.run_id}" in rerun.stdout
    runs = trials()
    finished = sorted(r.data.tags[TRIAL_ID] for r in runs if r.info.status == "FINISHED")
    assert finished == ["0", "1"], "exactly one finished child per trial; trial 0 was not rerun"
    assert client.get_run(killed[0].info.run_id).info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    exp = client.get_experiment_by_name("killed")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`tlsweep.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_staged_search_fine_tunes_the_best_heads_from_where_they_stopped(tmp_path, tracking_store, class_folder,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "tuner": "random", "max_trials": 2,
        "space": {"backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "epochs": {"fixed": 2},
                  "batch_size": {"fixed": 8}, "learning_rate": {"choice": [0.01, 0.02]}},
        "stage2": {"top_k": 1, "trials_per_config": 2,
                   "space": {"fine_tune_at": {"choice": [120, 130]}, "fine_tune_epochs": {"fixed": 1}}},
    }
    parent = run_sweep(str(class_folder), sweep=write_sweep(tmp_path, config, "staged"), experiment="staged",
                       state_dir=str(tmp_path / "state"), verbose=0)
    client = MlflowClient()
    kids = children("staged", parent)
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids), [k.data.tags.get("error") for k in kids]
    stage1 = [k for k in kids if k.data.tags.get("tlsweep.stage") == "1"]
    stage2 = [k for k in kids if k.data.tags.get("tlsweep.stage") == "2"]
    assert len(stage1) == 2 and len(stage2) == 2
    assert all(values(k)["fine_tune"] == "False" and values(k)["feature_cache"] == "True" for k in stage1)
    # the stage-1 trial that stage 2 started from (named in its trial ids) is a best one by validation
    (source,) = {k.data.tags[TRIAL_ID].split("/")[0].rsplit("-", 1)[1] for k in stage2}
    best = next(k for k in stage1 if k.data.tags[TRIAL_ID] == source)
    assert best.data.metrics["val_accuracy"] == max(k.data.metrics["val_accuracy"] for k in stage1)
    assert {values(k)["fine_tune_at"] for k in stage2} == {"120", "130"}
    for run in stage2:
        assert values(run)["fine_tune"] == "True"
        assert values(run)["learning_rate"] == values(best)["learning_rate"]
        assert run.data.tags[TRIAL_ID].startswith(f"staged-stage2-{best.data.tags[TRIAL_ID]}/")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == [2], "stage 2 runs only the fine-tuning epochs"
        # it starts from the best stage-1 head: before fine-tuning it scores exactly what that trial scored
        assert run.data.metrics["head_test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
        assert run.data.metrics["trainable_params"] > best.data.metrics["trainable_params"]


@pytest.mark.slow
def test_a_search_that_runs_out_of_configurations_says_why_it_ended_early(tmp_path, tracking_store, class_folder,
                                                                         capsys):
    config = {"tuner": "grid", "max_trials": 5, "trial_process": "same", "space": {
        **TINY["space"], "fine_tune": {"fixed": False}, "learning_rate": {"fixed": 0.01}, "epochs": {"fixed": 1}}}
    sweep = write_sweep(tmp_path, config, "small")
    parent = run_sweep(str(class_folder), sweep=sweep, experiment="small", split="60/20/20",
                       state_dir=str(tmp_path / "state"), verbose=0)
    out = capsys.readouterr().out
    assert len(children("small", parent)) == 2, "dropout 0.1 and 0.3: the grid's only two configurations"
    assert (f"[sweep] the search ended after 2 of max_trials 5: the grid tuner found no configuration of the space it "
            f"had not tried. Widen the space in {sweep} for more, or lower max_trials") in out
