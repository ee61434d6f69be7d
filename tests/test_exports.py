"""Trials' models are exported off the training path (sweeps.exports): a trial returns with only its checkpoint,
the sweep ends with every model it should have logged."""

import json

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.hparams import RunConfig
from sweeps.trial import TrialSpec
from tracking import layout
from tracking.entry import ENTRY, MODEL_DIR

HEADS = {"tuner": "grid", "max_trials": 3, "trial_process": "same", "space": {
    "backbone": {"fixed": "efficientnet_lite0"}, "image_size": {"fixed": 32}, "batch_size": {"fixed": 8},
    "epochs": {"fixed": 2}, "fine_tune": {"fixed": False}, "learning_rate": {"choice": [0.03, 0.0001, 0.01]}}}


def test_a_trial_that_logs_its_model_returns_before_the_model_is_exported(tmp_path, class_folder):
    from sweeps import trial as trials

    journal = tmp_path / "journal"
    spec = TrialSpec(run=RunConfig(image_size=32, epochs=1, fine_tune=False, batch_size=8), dataset=str(class_folder),
                     split=None, log_models="all", verbose=0, trial_dir=str(tmp_path / "t0"), export_metadata={},
                     run_spec={}, params={}, journal=str(journal))
    (tmp_path / "t0").mkdir()
    output = trials.run(spec, {})
    assert output.export_pending and output.export_seconds == 0.0
    entry = json.loads((tmp_path / "journal" / output.entry.split("/")[-1] / ENTRY).read_text())
    assert "model" not in entry, "no SavedModel was written on the trial's path"
    assert not list(journal.rglob(MODEL_DIR)) and not list(journal.rglob("saved_model.pb"))
    # what it keeps instead: its checkpoint, logged with the run (best-export works even if the sweep is killed now)
    # and its validation and test probabilities (what the sweep's ensemble is chosen from)
    logged, probabilities = sorted(entry["files"].values())
    assert logged.startswith(f"{layout.CHECKPOINT_DIR}/") and (tmp_path / "t0" / logged.split("/")[1]).is_file()
    assert probabilities == f"{layout.PROBABILITIES_DIR}/{layout.PROBABILITIES}"
    # a trial that does not log its model is marked so
    quiet = trials.run(TrialSpec(**{**spec.__dict__, "log_models": "improving", "best": 1.0,
                                    "trial_dir": str(tmp_path / "t1")}), {})
    assert not quiet.export_pending


def test_the_sweep_ends_with_the_models_of_its_improving_trials(tmp_path, tracking_store, class_folder, capsys):
    from sweeps.run import run_sweep

    (tmp_path / "heads.yaml").write_text(yaml.safe_dump(HEADS))  # log_models left out: the default, improving
    tuners: list = []
    parent = run_sweep(str(class_folder), sweep=str(tmp_path / "heads.yaml"), experiment="exports",
                       state_dir=str(tmp_path / "state"), verbose=0, tuner_out=tuners)
    assert tuners[0].config.log_models == "improving"
    exp = mlflow.get_experiment_by_name("exports").experiment_id
    kids = sorted(MlflowClient().search_runs([exp], f"tags.`{layout.PARENT_RUN_ID}` = '{parent}'"),
                  key=lambda r: r.info.start_time)
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    best, improved = None, []
    for run in kids:
        value = run.data.metrics[layout.VAL_ACCURACY]
        if best is None or value >= best:  # ties count: the winner has its model whichever of them wins
            improved.append(run.info.run_id)
        best = value if best is None else max(best, value)
    with_model = [k.info.run_id for k in kids if layout.MODEL_URI in k.data.tags]
    assert with_model == improved and sorted(tuners[0].exports.done) == sorted(improved)
    for run in kids:
        if run.info.run_id in improved:  # the exporter measured the SavedModel's cost
            assert run.data.tags[layout.COST_OF] == "savedmodel"
            model = mlflow.pyfunc.load_model(run.data.tags[layout.MODEL_URI])
            assert model.predict(__import__("numpy").full((1, 32, 32, 3), 100.0, "float32")).shape == (1, 3)
    assert tuners[0].timings["export"] == 0.0, "no export on the trials' path"
    assert tuners[0].exports._helper is None and tuners[0].exports.pending == 0
    winner = MlflowClient().get_run(parent).data.tags[layout.BEST_RUN_ID]
    assert winner in with_model, "the winner always has its model"


def test_a_killed_sweep_drops_its_queued_exports_and_says_the_checkpoints_stay():
    import time
    from concurrent.futures import Future

    from sweeps.exports import ModelExports

    lines: list[str] = []
    exports = ModelExports(say=lines.append)
    gate: Future = Future()  # the journal's write of the run, not done yet
    run: Future = Future()
    run.set_result("run-1")
    exports.submit(run, gate)  # the background thread takes it and waits for the write
    exports.submit(run, gate)  # queued behind it
    deadline = time.time() + 10
    while exports._queue.qsize() != 1 and time.time() < deadline:
        time.sleep(0.01)
    exports.close(wait=False)
    assert lines == ["[sweep] 1 model export(s) not done; those trials keep their logged checkpoint (make best-export "
                     "builds the winner's model from it)"]
    gate.set_result(None)
    while exports.pending and time.time() < deadline:
        time.sleep(0.01)
    assert exports.pending == 0 and exports.done == [] and exports._helper is None, "nothing exported after the kill"
