"""``make bench-tracking`` on a tiny trial: a line per part and store, the totals, and the batches it relies on."""

import pytest
from mlflow.entities import Metric, Param, RunTag

from benchmarks import bench_tracking
from tracking.recorder import batches


@pytest.mark.slow
def test_the_tracking_bench_prints_each_part_and_the_total_for_both_stores(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TLSWEEP_SYSTEM_METRICS_SECONDS", "5")
    assert bench_tracking.main(["--epochs", "2", "--trial-seconds", "10", "--image-size", "32", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for store in ("sqlite", "server"):
        parts = [line.split(":")[0].split()[1] for line in lines if line.startswith(f"{store} ")]
        assert parts == [*bench_tracking.PARTS, "total"], lines
        total = next(line for line in lines if line.startswith(f"{store} total:"))
        assert float(total.split("record_median_s=")[1].split()[0]) > 0
    assert bench_tracking.main(["--stores", "nfs"]) == 2


def test_a_record_goes_in_as_few_batches_as_mlflow_takes():
    metrics = [Metric(f"m{i}", 0.0, 0, i) for i in range(2500)]
    params = [Param(f"p{i}", "1") for i in range(150)]
    tags = [RunTag(f"t{i}", "1") for i in range(30)]
    done = list(batches(metrics, params, tags))
    assert len(done) == 3
    assert all(len(b["params"]) <= 100 and len(b["tags"]) <= 100 and sum(map(len, b.values())) <= 1000 for b in done)
    assert [m for b in done for m in b["metrics"]] == metrics and [p for b in done for p in b["params"]] == params
    assert list(batches([], [], [])) == [{"params": [], "tags": [], "metrics": []}]
