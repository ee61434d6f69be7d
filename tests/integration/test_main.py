"""The one `tlsweep` command (sweeps/main.py): dispatch, the ui's links, the server's default bind."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.errors import UserError
from sweeps import main


def test_every_command_dispatches_and_unknown_ones_list_the_known(capsys):
    with pytest.raises(SystemExit):
        main.main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in main.HELP)
    with pytest.raises(SystemExit):
        main.main(["sweep", "--help"])
    assert "--max-trials" in capsys.readouterr().out, "sweep's own options (sweeps.cli)"
    with pytest.raises(SystemExit):
        main.main(["train", "--help"])
    assert "--fine-tune-at" in capsys.readouterr().out, "train's own options (pipeline.cli)"


def test_ui_links_go_to_the_runs_of_experiments_with_runs_and_compare_each_sweeps_trials(tracking_store, capsys):
    import json
    import urllib.parse

    from tracking import layout

    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("flowers")
    client.create_experiment("empty")
    parent = client.create_run(exp, run_name="sweep-quick", tags={layout.KIND: layout.SWEEP,
                                                                   layout.SWEEP_KEY: "flowers:quick"}).info.run_id
    trials = {}
    for name, score, status in (("a", 0.5, "FINISHED"), ("b", 0.9, "FINISHED"), ("c", None, "FAILED")):
        run_id = client.create_run(exp, tags={layout.KIND: layout.TRIAL, layout.PARENT_RUN_ID: parent}).info.run_id
        if score is not None:
            client.log_metric(run_id, layout.VAL_ACCURACY, score)
        client.set_terminated(run_id, status)
        trials[name] = run_id
    client.set_terminated(parent)
    links = main.experiment_links(tracking_store, "http://127.0.0.1:5000")
    runs = f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"  # not the GenAI view
    (sweep, count, compare), = links[0][2]
    assert [link[:2] for link in links] == [("flowers", runs)] and (sweep, count) == ("sweep-quick", 2)
    route, query = compare.split("?", 1)
    assert route == "http://127.0.0.1:5000/#/compare-runs"
    query = urllib.parse.parse_qs(query)
    assert json.loads(query["runs"][0]) == [trials["b"], trials["a"]], "the finished trials, best first"
    assert json.loads(query["experiments"][0]) == [exp]
    assert main.link_lines(links) == [f"  experiment 'flowers': {runs}",
                                      f"    sweep 'sweep-quick', its 2 finished trial(s) compared: {compare}"]
    with pytest.raises(UserError, match=r"experiment 'nope' is not in .*; known: .*flowers"):
        main.experiment_links(tracking_store, "http://127.0.0.1:5000", only="nope")
    assert main.main(["ui", "--tracking-uri", tracking_store, "--experiment", "nope"]) == 2
    assert "\nerror: experiment 'nope' is not in" in "\n" + capsys.readouterr().err


def test_the_server_binds_this_machine_only_unless_told():
    from tracking import server

    assert server.build_parser().parse_args([]).host == "127.0.0.1"
    assert main.ui_parser().parse_args([]).host == "127.0.0.1"


def test_system_metrics_interval_is_checked(monkeypatch):
    from tracking import system_metrics

    monkeypatch.setenv("TLSWEEP_SYSTEM_METRICS_SECONDS", "soon")
    with pytest.raises(UserError, match=r"TLSWEEP_SYSTEM_METRICS_SECONDS='soon' is not a number of seconds >= 0"):
        system_metrics.sampling_seconds()
    monkeypatch.setenv("TLSWEEP_SYSTEM_METRICS_SECONDS", "0")
    samples: list = []
    with system_metrics.sampled(samples):  # off: nothing is sampled
        pass
    assert samples == []


def test_a_trial_shorter_than_one_interval_still_gets_its_system_metrics_and_writes_them_with_its_record(
        tracking_store, tmp_path):
    """One sample when the block ends, even inside the first interval; the record writes them after the trial's own
    metrics, its val_accuracy first (what MLflow's compare page charts by default)."""
    import time

    from tracking import layout, system_metrics
    from tracking.recorder import Recorder

    samples: list = []
    with system_metrics.sampled(samples):
        time.sleep(0.5)
    assert {s[0] for s in samples} >= {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    assert {s[2] for s in samples} == {0} and all(s[3] > 0 for s in samples)
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("s")
    parent = client.create_run(exp).info.run_id
    recorder = Recorder(tmp_path / "journal")
    run = recorder.open(exp, parent, "trial-0", {})
    metrics = [("loss", 1.0, 0), (layout.VAL_ACCURACY, 0.5, 0), (layout.TEST_ACCURACY, 0.25, 0), *samples]
    recorder.finish(run, layout.Record({}, metrics, {}, {}), recorder.folder_for(run))
    recorder.close()
    client.set_terminated(parent)
    logged = client.get_run(run.id).data._metric_objs
    assert [m.key for m in logged][:3] == [layout.VAL_ACCURACY, layout.TEST_ACCURACY, "loss"]
    cpu = client.get_metric_history(run.id, "system/cpu_utilization_percentage")
    assert len(cpu) == 1 and cpu[0].timestamp == next(s[3] for s in samples if s[0] == cpu[0].key)


def test_ui_checks_the_store_as_report_does_before_starting_mlflow(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = {  # what a user may pass -> the start of the one line they get (MLflow is never started)
        "http://127.0.0.1:9": "http://127.0.0.1:9 is a tracking server, which serves MLflow's UI itself: open "
                              "http://127.0.0.1:9 in a browser",
        str(tmp_path / "mlflow.db"): "",  # a plain path: the store module's own line, whatever its words
        f"sqlite:///{tmp_path / 'nodir' / 'typo.db'}": "",
    }
    for uri, start in cases.items():
        assert main.main(["ui", "--tracking-uri", uri, "--port", "9"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {start}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "nodir").exists(), "a mistyped folder is not created"
