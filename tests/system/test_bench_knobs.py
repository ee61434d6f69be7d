"""``make bench-knobs``: runs end to end on tiny data; its paired test is McNemar's exact one."""

import pytest

from benchmarks import bench_knobs


def test_mcnemar_counts_the_discordant_images_and_gives_the_exact_two_sided_p():
    assert bench_knobs.mcnemar([True, True, False, True], [True, False, True, True]) == (1, 1, 1.0)
    assert bench_knobs.mcnemar([True] * 3 + [False], [False] * 3 + [False]) == (3, 0, pytest.approx(0.25))
    assert bench_knobs.mcnemar([True] * 10, [False] * 10)[2] == pytest.approx(2 / 1024)
    assert bench_knobs.mcnemar([False] * 3, [False] * 3) == (0, 0, 1.0), "no discordant image: no difference"


def test_the_bench_prints_each_run_against_the_baseline(class_folder, capsys):
    args = ["--data", str(class_folder), "--image-size", "32", "--epochs", "1", "--fine-tune-epochs", "2",
            "--fine-tune-at", "120", "--runs", "warmup_cosine"]
    assert bench_knobs.main(args) == 0
    out = capsys.readouterr().out
    last = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())
    assert set(last) == {f"{run}_{split}{kind}" for run in ("baseline", "warmup_cosine") for split in ("val", "test")
                         for kind in ("", "_loss")} | {"warmup_cosine_p_val", "warmup_cosine_p_test"}
    assert all(0 <= float(v) <= 1 for k, v in last.items() if not k.endswith("_loss"))
    assert all(float(v) > 0 for k, v in last.items() if k.endswith("_loss"))
    assert "| warmup_cosine | fine_tune_schedule cosine, warmup_epochs 1.0 |" in out
    with pytest.raises(SystemExit):
        bench_knobs.main(["--runs", "dropout"])
