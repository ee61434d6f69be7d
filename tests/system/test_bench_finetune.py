"""``make bench-finetune``: both comparisons run end to end on tiny data and print their last line."""

import re

import pytest

from benchmarks import bench_finetune


@pytest.mark.parametrize("whole", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_bench_prints_its_speedups_and_both_sides_agree(class_folder, capsys, whole):
    args = ["--data", str(class_folder), "--image-size", "32", "--epochs", "1", "--fine-tune-epochs", "1"]
    assert bench_finetune.main(args + (["--whole-trial"] if whole else [])) == 0
    out = capsys.readouterr().out
    last = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())
    assert {"finetune_speedup", "finetune_speedup_cached", "cut_build_s", "test_accuracy_end_to_end",
            "test_accuracy_cut"} <= set(last)
    assert ({"trial_speedup", "trial_speedup_cached", "feature_build_s"} <= set(last)) == whole
    assert last["test_accuracy_end_to_end"] == last["test_accuracy_cut"]
    assert float(re.search(r"max \|weight difference\| (\S+);", out).group(1)) < 1e-4
    if whole:  # a side's trial time is its head and fine-tuning fits (printed rounded to 0.1 s)
        assert float(last["trial_end_to_end_s"]) >= float(last["finetune_end_to_end_s"])
        assert float(last["trial_ours_s"]) >= float(last["finetune_cut_s"])
        assert float(last["feature_build_s"]) > 0 and float(last["trial_speedup_cached"]) > 0
