"""The selection rule (tracking.leaderboard.ranked, docs/selection.md): accuracy first, and among the trials the
validation split cannot tell apart, a steadier estimate; the test split never."""

import pandas as pd
import pytest

from tracking import leaderboard as lb


def _runs(rows, validation_size=45):
    """Runs as ``mlflow.search_runs`` gives them: (val_accuracy, val_loss, cv_accuracy or None, test_accuracy)."""
    return pd.DataFrame([{
        "run_id": f"r{i}", "tags.kt.trial_id": str(i), "status": "FINISHED", "params.backbone": "efficientnet_lite0",
        "metrics.val_accuracy": val, "metrics.val_loss": loss, "metrics.test_accuracy": test,
        **({"metrics.cv_accuracy": cv} if cv is not None else {}),
        "params.validation_size": str(validation_size), "params.test_size": "100"}
        for i, (val, loss, cv, test) in enumerate(rows)])


def test_on_a_small_validation_split_the_tied_trials_are_ranked_by_log_loss():
    table = lb.leaderboard(_runs([
        (43 / 45, 0.30, None, 0.95),  # the highest accuracy, two images ahead of trial 1: inside the noise
        (41 / 45, 0.12, None, 0.97),  # tied with it, far surer of its answers
        (30 / 45, 0.05, None, 0.70),  # clearly behind: its log loss does not lift it
    ]))
    assert list(table["run_id"]) == ["r1", "r0", "r2"]
    assert list(table["tied"]) == [True, True, False]
    assert list(table[lb.RANKED_BY]) == ["val_loss", "val_loss", "val_accuracy"]


def test_on_a_large_validation_split_accuracy_decides():
    table = lb.leaderboard(_runs([(0.95, 0.30, None, 0.95), (0.90, 0.12, None, 0.97)], validation_size=5000))
    assert list(table["run_id"]) == ["r0", "r1"]  # 250 images apart out of 5,000: not tied
    assert list(table[lb.RANKED_BY]) == ["val_accuracy", "val_accuracy"]


def test_cross_validation_ranks_the_tie_when_every_tied_trial_has_it():
    rows = [(44 / 45, 0.10, 0.90, 0.9), (43 / 45, 0.20, 0.95, 0.9), (42 / 45, 0.05, 0.93, 0.9)]
    table = lb.leaderboard(_runs(rows))
    assert list(table["run_id"]) == ["r1", "r2", "r0"] and set(table[lb.RANKED_BY]) == {"cv_accuracy"}
    rows[2] = (42 / 45, 0.05, None, 0.9)  # a fine-tuning trial has no cv_accuracy: the log loss ranks them all
    table = lb.leaderboard(_runs(rows))
    assert list(table["run_id"]) == ["r2", "r0", "r1"] and set(table[lb.RANKED_BY]) == {"val_loss"}


def test_the_test_split_never_changes_the_order():
    rows = [(43 / 45, 0.30, None, 0.95), (41 / 45, 0.12, None, 0.97), (42 / 45, 0.20, None, 0.5)]
    first = lb.leaderboard(_runs(rows))
    shuffled = lb.leaderboard(_runs([(v, l, c, 1.0 - t) for v, l, c, t in rows]).drop(
        columns=["params.test_size"]))
    assert list(first["run_id"]) == list(shuffled["run_id"]) == ["r1", "r2", "r0"]


def test_runs_without_log_loss_or_sizes_keep_the_accuracy_order():
    no_loss = _runs([(41 / 45, None, None, 0.9), (43 / 45, None, None, 0.9)])
    assert list(lb.leaderboard(no_loss)["run_id"]) == ["r1", "r0"]
    no_sizes = _runs([(41 / 45, 0.1, None, 0.9), (43 / 45, 0.3, None, 0.9)]).drop(columns=["params.validation_size"])
    table = lb.leaderboard(no_sizes)
    assert list(table["run_id"]) == ["r1", "r0"] and list(table[lb.RANKED_BY]) == ["val_accuracy"] * 2


def test_unfinished_runs_stay_last_and_are_not_ranked():
    runs = _runs([(41 / 45, 0.1, None, 0.9), (43 / 45, 0.3, None, 0.9), (0.99, 0.01, None, None)])
    runs.loc[2, "status"] = "FAILED"
    table = lb.leaderboard(runs)
    assert list(table["run_id"]) == ["r0", "r1", "r2"]
    assert list(table[lb.RANKED_BY]) == ["val_loss", "val_loss", ""]


@pytest.mark.parametrize("empty", [pd.DataFrame()])
def test_an_empty_leaderboard_has_the_column(empty):
    assert lb.RANKED_BY in lb.leaderboard(empty).columns


def test_best_export_says_which_estimate_chose_its_trial():
    from sweeps.best import why_chosen

    rows = [(43 / 45, 0.30, None, 0.95), (41 / 45, 0.12, None, 0.97), (30 / 45, 0.05, None, 0.7)]
    table = lb.leaderboard(_runs(rows))
    assert why_chosen(table.iloc[0], table) == (
        "trial 1 chosen by val_loss (0.1200) among the 2 trials whose val_accuracy the validation split (45 images) "
        "cannot tell apart (docs/selection.md)")
    alone = lb.leaderboard(_runs([(0.95, 0.30, None, 0.95)], validation_size=5000))
    assert why_chosen(alone.iloc[0], alone) == ""


def test_under_a_budget_the_tie_counts_only_the_trials_that_fit_it():
    from sweeps.best import fitting, why_chosen

    rows = [(43 / 45, 0.30, None, 0.95), (41 / 45, 0.12, None, 0.97), (42 / 45, 0.20, None, 0.96)]
    table = lb.leaderboard(_runs(rows))
    assert list(table["run_id"]) == ["r1", "r2", "r0"] and set(table[lb.RANKED_BY]) == {"val_loss"}  # all tied
    table = table.assign(latency_ms=[50.0, 9.0, 8.0])  # the surest, r1, is too slow
    fits = fitting(table, max_latency_ms=10)
    assert list(fits["run_id"]) == ["r2", "r0"]
    assert why_chosen(fits.iloc[0], fits).startswith("trial 2 chosen by val_loss (0.2000) among the 2 trials whose")
    alone = fitting(table, max_latency_ms=8.5)  # only r0 fits: the budget chose it, not the log loss
    assert list(alone["run_id"]) == ["r0"] and why_chosen(alone.iloc[0], alone) == ""


def test_the_report_names_the_winner_and_what_ranked_the_tie():
    from tracking.report import _facts

    table = lb.leaderboard(_runs([(43 / 45, 0.30, None, 0.95), (41 / 45, 0.12, None, 0.97)]))
    facts = _facts(table, table.iloc[0])
    assert facts["winner's val_accuracy"].startswith("0.9111 (95 % [0.793, 0.965] on 45 images) (trial 1, ")
    assert facts["trials tied with the highest val_accuracy"] == 2
    assert facts["tied trials ranked by"] == "val_loss (docs/selection.md)"


def test_a_refit_measured_above_the_budget_is_said_with_both_figures_and_what_to_do():
    from sweeps.best import refit_over_budget

    trial = {"latency_ms": 4.9, "size_mb": 3.1}
    assert refit_over_budget({"latency_ms": 4.8, "size_mb": 3.1}, trial, max_latency_ms=5.0) == ""
    assert refit_over_budget({"latency_ms": 5.3, "size_mb": 3.1}, trial) == ""  # no budget, nothing to say
    assert refit_over_budget({"size_mb": 3.1}, trial, max_latency_ms=5.0) == ""  # not measured: nothing to compare
    line = refit_over_budget({"latency_ms": 5.3, "size_mb": 3.1}, trial, max_latency_ms=5.0, max_size_mb=4.0)
    assert line == ("note: the refit measured latency_ms 5.3 (the trial's 4.9), above --max-latency-ms 5; it has the "
                    "trial's architecture, so the difference is measurement noise. Export without --refit to ship "
                    "the trial's own model, or raise --max-latency-ms")
