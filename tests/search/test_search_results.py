"""What a search reports: rows ranked, the table and CSV, the summary beside the constant."""

from __future__ import annotations

import csv
import io

from quakeray.search.results import SearchSummary, TrialRow, format_table, rank_rows, rows_csv


def _row(trial_id: str, value: float | None, reference: str = "") -> TrialRow:
    return TrialRow(
        trial_id=trial_id,
        run_id=f"run-{trial_id}",
        status="completed" if value is not None else "failed",
        reference=reference,
        params={"loss.margin": 0.02, "loss.rank_weight": 1.0 if reference != "mse_only" else 0.0},
        value=value,
        epochs=10,
        baseline=2.0,
    )


ROWS = [_row("a", 1.2), _row("b", None), _row("c", 0.8, "paper"), _row("d", float("nan"))]


def test_rows_rank_best_first_and_trials_without_a_value_last_in_start_order() -> None:
    assert [r.trial_id for r in rank_rows(ROWS, "min")] == ["c", "a", "b", "d"]
    assert [r.trial_id for r in rank_rows(ROWS, "max")] == ["a", "c", "b", "d"]


def test_every_value_stands_beside_the_constant() -> None:
    table = format_table(rank_rows(ROWS, "min")[:2], metric="val_MAE")
    assert "x constant" in table.splitlines()[0]
    assert "c (paper)" in table and "0.8000" in table and "0.40" in table  # 0.8 / 2.0
    rows = list(csv.DictReader(io.StringIO(rows_csv(ROWS, metric="val_MAE"))))
    assert [r["trial_id"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[2]["val_MAE_const_median"] == "2.0" and rows[1]["val_MAE"] == ""


def test_the_summary_leads_with_the_constant_and_names_the_best() -> None:
    summary = SearchSummary(
        name="demo",
        search_dir="/runs/demo-1",
        tracking_uri="sqlite:////tmp/mlflow.db",
        experiment_id="1",
        parent_run_id="p",
        metric="val_MAE",
        mode="min",
        rows=ROWS,
        best=ROWS[2],
        best_checkpoint="/runs/demo-1/train/train-c/checkpoint_epoch_0009",
    )
    text = summary.format(top_k=2)
    assert summary.counts() == {"completed": 3, "failed": 1}
    assert "predicting the train median for every sample scores val_MAE 2.0000" in text
    assert "best trial       c (val_MAE 0.8000, 0.40 x the constant's)" in text
    assert "workflowType=machine_learning" in text  # the link opens the runs view
