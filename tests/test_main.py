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


def test_ui_links_go_to_the_runs_of_experiments_with_runs(tracking_store, capsys):
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("flowers")
    client.create_experiment("empty")
    client.set_terminated(client.create_run(exp).info.run_id)
    assert main.experiment_links(tracking_store, "http://127.0.0.1:5000") == [
        ("flowers", f"http://127.0.0.1:5000/#/experiments/{exp}/runs")]
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
    with system_metrics.monitored("no-such-run"):  # off: nothing is sampled or written
        pass


def test_a_trial_shorter_than_one_interval_still_gets_its_system_metrics(tracking_store):
    """MLflow's monitor drops the samples since its last write when it stops; ours writes them, after the block
    (leaving it does not wait for the store), by ``drain``."""
    import time

    from tracking import system_metrics

    client = mlflow.tracking.MlflowClient()
    run = client.create_run(client.create_experiment("s")).info.run_id
    with system_metrics.monitored(run):
        time.sleep(0.5)
    system_metrics.drain()
    client.set_terminated(run)
    metrics = client.get_run(run).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert len(client.get_metric_history(run, "system/cpu_utilization_percentage")) == 1
