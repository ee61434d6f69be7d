"""``make bench-search``: the winner of a search, the summary over seeds, and the whole benchmark on a few photos."""

import json

import pytest

from benchmarks import bench_search
from support import needs_flowers


def test_the_winner_is_the_best_validation_among_the_first_n_trials_the_earliest_on_ties():
    scores = [[0.5, 0.9], [None, None], [0.7, 0.6], [0.7, 0.8], [0.9, 0.1]]
    assert bench_search.winner(scores, 1) == (0.5, 0.9)
    assert bench_search.winner(scores, 2) == (0.5, 0.9), "a failed trial never wins"
    assert bench_search.winner(scores, 4) == (0.7, 0.6), "the earliest of a tie, as Keras Tuner's best trial"
    assert bench_search.winner(scores, 5) == (0.9, 0.1)
    assert bench_search.winner([[None, None]], 1) is None


def test_the_summary_gives_each_tuner_and_number_of_trials_the_spread_of_its_winners():
    scores = {"random": {1: [[0.5, 0.4], [0.7, 0.6]], 2: [[0.6, 0.5], [0.6, 0.9]], 3: [[0.8, 0.7], [0.1, 0.1]]}}
    at1, at2 = bench_search.summary(scores, [1, 2])
    assert at1["trials"] == 1 and at1["searches"] == 3
    assert at1["val_mean"] == pytest.approx(0.6333333) and at1["val_std"] == pytest.approx(0.1527525)
    assert (at1["test_min"], at1["test_median"], at1["test_max"]) == (0.4, 0.5, 0.7)
    assert (at2["val_min"], at2["val_max"], at2["test_mean"]) == (0.6, 0.8, pytest.approx(0.6))
    assert "| 2 | random | 3 | 0.7000 ± 0.1000 | 0.6000 / 0.7000 / 0.8000 | 0.6000 ± 0.1000 |" in \
        bench_search.markdown_table([at2])


@pytest.mark.slow
@needs_flowers()
@pytest.mark.realdata
def test_the_benchmark_runs_on_a_few_photos_and_writes_its_results(tmp_path, capsys):
    out = tmp_path / "results" / "search.md"
    args = ["--per-class", "8", "--seeds", "2", "--at", "2,3", "--backbones", "efficientnet_lite0", "--out", str(out)]
    assert bench_search.main(args) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    for n in (2, 3):
        for tuner in ("random", "bayesian", "tpe"):
            assert f"| {n} | {tuner} | 2 | " in printed and f"| {n} | {tuner} | 2 | " in text
    assert f"- command: `python -m benchmarks.bench_search {' '.join(args)}`" in text
    raw = json.loads(out.with_suffix(".json").read_text())["scores"]
    assert {t: sorted(s) for t, s in raw.items()} == {t: ["1", "2"] for t in ("random", "bayesian", "tpe")}
    for seed in ("1", "2"):
        assert all(len(raw[t][seed]) == 3 for t in raw)
        # every search starts from the default point, trained with the search's seed: the same first trial
        assert raw["random"][seed][0] == raw["bayesian"][seed][0] == raw["tpe"][seed][0]
        # Keras Tuner's Bayesian oracle draws its first 3 x (hyperparameters) points as its random search does
        assert raw["bayesian"][seed] == raw["random"][seed]
    # run again with --resume: the searches are kept, none is run again, the figures are the same
    assert bench_search.main(args + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert " seed " not in again and json.loads(out.with_suffix(".json").read_text())["scores"] == raw
    table = lambda text: text[text.index("| trials |"):text.index("written:")]  # noqa: E731
    assert table(again) == table(printed)
