"""What a person reads first about a search in MLflow: the parent run's description.

MLflow shows a run's ``mlflow.note.content`` tag (Markdown) on top of the run's page. A
search's parent run gets the answer there: the best trial, the paper's point and MSE only
beside the constant predictor, the test score and the seed check's verdict, each run a
link. The best trial's run is renamed with a mark, so the runs table shows it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from quakeray import tracking
from quakeray.search.results import SearchSummary, TrialRow
from quakeray.tracking import tags

__all__ = ["BEST_MARK", "NOTE_TAG", "describe_search", "mark_best"]

NOTE_TAG = "mlflow.note.content"
BEST_MARK = "★ best: "
"""Put before the best trial's run name (at the start: the runs table cuts names' ends)."""


def _link(summary: SearchSummary, row: TrialRow, label: str) -> str:
    return f"[{label}](#/experiments/{summary.experiment_id}/runs/{row.run_id})"


def _cells(summary: SearchSummary, row: TrialRow, label: str, keys: Sequence[str]) -> str:
    ratio = row.vs_baseline
    value = f"{row.value:.4f}" if row.value is not None else "-"
    params = [str(row.params.get(k, "")) for k in keys]
    cells = [_link(summary, row, label), value, f"{ratio:.2f}" if ratio else "-"]
    return "| " + " | ".join([*cells, str(row.epochs), row.status, *params]) + " |"


def describe_search(summary: SearchSummary) -> str:
    """Markdown for the parent run: the answer first, then where everything is."""
    metric = summary.metric
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.counts().items()))
    lines = [
        f"**Search `{summary.name}`**: {len(summary.rows)} trials ({counts}), "
        f"ranked by {metric} ({'lower' if summary.mode == 'min' else 'higher'} is better).",
        "",
    ]
    shown: list[tuple[TrialRow, str]] = []
    if summary.best is not None:
        shown.append((summary.best, f"best ({summary.best.reference or summary.best.trial_id})"))
    for reference in ("paper", "mse_only"):
        row = next((r for r in summary.rows if r.reference == reference), None)
        if row is not None:
            shown.append((row, reference))
    keys = sorted({k for row, _ in shown for k in row.params})
    lines += [
        "| run | " + " | ".join([metric, "x constant", "epochs", "status", *keys]) + " |",
        "| --- | ---: | ---: | ---: | --- |" + " --- |" * len(keys),
        *(_cells(summary, row, label, keys) for row, label in shown),
    ]
    if summary.baseline is not None:
        blanks = " |" * (len(keys) + 2)
        lines.append(f"| constant (train median) | {summary.baseline:.4f} | 1.00 |{blanks}")
    test = summary.test_metrics
    if "test_MAE" in test:
        constant = test.get("test_MAE_const_median")
        versus = f" (constant: {constant:.4f})" if constant else ""
        lines += ["", f"Best trial on the test split: test_MAE {test['test_MAE']:.4f}{versus}."]
    if summary.confirmation is not None:
        lines += ["", "**Seed check** (fresh seeds, test split):", ""]
        lines += [f"- {v}" for v in summary.confirmation.verdicts()]
        lines += ["", f"```\n{summary.confirmation.format()}\n```"]
    if summary.registered_model:
        lines += ["", f"Best model: `{summary.registered_model}` (`quakeray predict --model ...`)."]
    lines += ["", f"Search folder (for `--resume`): `{summary.search_dir}`."]
    return "\n".join(lines)


def mark_best(uri: str, experiment_id: str, parent_run_id: str, run_id: str) -> None:
    """Rename the best trial's run with :data:`BEST_MARK`; unmark an earlier best (resume)."""
    client = tracking.mlflow_client(uri)
    marked = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{tags.BEST}` = 'true'"
        ),
    )
    for run in marked:
        if run.info.run_id != run_id:
            client.update_run(run.info.run_id, name=run.info.run_name.removeprefix(BEST_MARK))
            client.set_tag(run.info.run_id, tags.BEST, "false")
    run = client.get_run(run_id)
    if not run.info.run_name.startswith(BEST_MARK):
        client.update_run(run_id, name=BEST_MARK + run.info.run_name)
    client.set_tag(run_id, tags.BEST, "true")
