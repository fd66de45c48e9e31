"""What a person reads first about a search in MLflow: the parent's description, the mark."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from quakeray import tracking
from quakeray.search.description import BEST_MARK, describe_search, mark_best
from quakeray.search.layout import SearchRef
from quakeray.search.results import SearchSummary, TrialRow
from quakeray.search.runs import open_trial_run
from quakeray.tracking.tags import BEST


def _row(trial_id: str, value: float, reference: str = "") -> TrialRow:
    params = {"loss.margin": 0.02, "loss.rank_weight": 0.0 if reference == "mse_only" else 1.0}
    return TrialRow(trial_id, f"run-{trial_id}", "completed", reference, params, value, 10, "", 2.0)


def test_the_description_leads_with_the_best_beside_both_references_and_the_constant() -> None:
    rows = [_row("m", 0.9, "mse_only"), _row("p", 0.8, "paper"), _row("t", 0.7)]
    test = {"test_MAE": 0.6, "test_MAE_const_median": 1.7}
    summary = SearchSummary(
        "demo", "/runs/demo-1", "sqlite:////tmp/m.db", "3", "p0", "val_MAE", "min", rows,
        best=rows[2], best_checkpoint=None, test_metrics=test,
    )  # fmt: skip
    text = describe_search(summary)
    table = [line for line in text.splitlines() if line.startswith("| [")]
    assert [line.split("]")[0] for line in table] == ["| [best (t)", "| [paper", "| [mse_only"]
    assert "(#/experiments/3/runs/run-t)" in table[0] and "| 0.7000 | 0.35 |" in table[0]
    assert "| constant (train median) | 2.0000 | 1.00 |" in text
    assert "test_MAE 0.6000 (constant: 1.7000)" in text
    assert "`/runs/demo-1`" in text  # the folder for --resume


def test_the_best_run_is_marked_and_an_earlier_best_unmarked(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.get_or_create_experiment(uri, "marks")
    parent = tracking.start_run(uri, experiment, run_name="search")
    ref = SearchRef(str(tmp_path), uri, experiment, parent)
    first, second = (open_trial_run(ref, t, run_name=f"tpe-00{t}") for t in ("1", "2"))
    mark_best(uri, experiment, parent, first)
    mark_best(uri, experiment, parent, second)  # a resumed search found a better one
    client = MlflowClient(uri)
    runs = {r: client.get_run(r) for r in (first, second)}
    assert runs[first].info.run_name == "tpe-001" and runs[first].data.tags[BEST] == "false"
    assert runs[second].info.run_name == BEST_MARK + "tpe-002"
    assert runs[second].data.tags[BEST] == "true"
