"""What a search found: one row per trial, the best trial, the summary a person reads.

Rows join Tune's view of each trial (its last result) with its MLflow run (status tag,
best checkpoint); the summary table and ``results.csv`` are written from the same rows
through :mod:`quakeray.tables`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from quakeray.search.trial_spec import sample_of
from quakeray.seeds import PairedDifference, SeedScores
from quakeray.tables import csv_text, text_table
from quakeray.tracking import tags

if TYPE_CHECKING:
    from mlflow.entities import Run
    from ray.tune import ResultGrid

__all__ = [
    "Confirmation",
    "SearchSummary",
    "TrialRow",
    "best_row",
    "collect_rows",
    "format_table",
    "parse_param",
    "rank_rows",
    "results_list",
    "rows_csv",
]


@dataclass
class TrialRow:
    """One trial as the search reports it (Tune's view joined with its MLflow run)."""

    trial_id: str
    run_id: str
    status: str  # completed | stopped | failed | cancelled | running
    reference: str  # mse_only | paper | "" for sampled trials
    params: dict[str, Any]  # the trial's sampled (or fixed reference) settings
    value: float | None  # last reported value of search.metric
    epochs: int  # epochs reported
    checkpoint: str = ""  # best checkpoint of the trial ("" if none)
    baseline: float | None = None  # the metric of the constant train-median predictor

    @property
    def vs_baseline(self) -> float | None:
        """The value as a multiple of the constant predictor's (0.5: half its error)."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline


@dataclass(frozen=True)
class Confirmation:
    """The search's answer trained again on fresh seeds and scored on test.

    ``scores`` holds, per confirmed configuration (``mse_only``, ``paper``, ``best``), its
    score on each seed; ``differences`` each joint-loss configuration against
    ``mse_only``, paired by seed.
    """

    metric: str  # the score: test_MAE
    configs: dict[str, dict[str, Any]]  # label -> its settings
    scores: dict[str, SeedScores]  # label -> score per seed
    constant: float | None  # the metric of the constant train-median predictor
    differences: dict[str, PairedDifference]  # joint label -> (label - mse_only) by seed

    def verdicts(self) -> list[str]:
        """One sentence per joint-loss configuration against MSE only."""
        return [
            d.verdict(f"{label} ({_params_text(self.configs[label])})", "MSE only", self.metric)
            for label, d in self.differences.items()
        ]

    def table(self) -> str:
        """Each configuration: its settings, the metric over seeds, x the constant."""
        body = [
            [
                label,
                _params_text(self.configs[label]),
                scores.text(),
                f"{scores.mean / self.constant:.2f}" if self.constant else "-",
            ]
            for label, scores in self.scores.items()
        ]
        return text_table(["confirmed", "settings", self.metric, "x constant"], body)

    def format(self) -> str:
        """The table, the constant, and the verdicts."""
        n = max((s.n for s in self.scores.values()), default=0)
        lines = [f"confirmed on {n} fresh seeds, scored on the test split:", "", self.table()]
        if self.constant is not None:
            lines.append(f"constant train median: {self.metric} {self.constant:.4f}")
        return "\n".join([*lines, "", *self.verdicts()])


@dataclass
class SearchSummary:
    """What ``quakeray tune`` produced."""

    name: str
    search_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_checkpoint: str | None
    test_metrics: dict[str, float] = field(default_factory=dict)
    registered_model: str | None = None  # models:/<name>@champion
    confirmation: Confirmation | None = None
    wall_s: float = 0.0

    @property
    def baseline(self) -> float | None:
        """The search metric of the constant train-median predictor (same for every trial)."""
        return next((r.baseline for r in self.rows if r.baseline is not None), None)

    def counts(self) -> dict[str, int]:
        """Trials per final status."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out

    def format(self, top_k: int = 5) -> str:
        """The end-of-search summary: top-k table, best trial, where everything is."""
        from quakeray.tracking import mlflow_ui_command, runs_view_link

        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        lines = [
            f"search {self.name} finished in {self.wall_s:.0f} s: {len(self.rows)} trials "
            f"({counts})",
            "",
        ]
        if self.baseline is not None:
            lines += [
                f"constant baseline: predicting the train median for every sample scores "
                f"{self.metric} {self.baseline:.4f}",
                "",
            ]
        lines += [format_table(rank_rows(self.rows, self.mode)[:top_k], metric=self.metric), ""]
        if self.best is not None:
            ratio = self.best.vs_baseline
            versus = f", {ratio:.2f} x the constant's" if ratio is not None else ""
            lines.append(
                f"best trial       {self.best.trial_id} "
                f"({self.metric} {self.best.value:.4f}{versus})"
            )
            lines.append(f"best config      {_params_text(self.best.params)}")
            lines.append(f"best checkpoint  {self.best_checkpoint}")
            if self.registered_model:
                lines.append(f"best model       {self.registered_model} (quakeray predict --model)")
        lines += _test_lines(self.test_metrics)
        if self.confirmation is not None:
            lines += ["", self.confirmation.format(), ""]
        lines.append(f"search folder    {self.search_dir}")
        lines.append(f"MLflow           parent run {self.parent_run_id} in {self.tracking_uri}")
        lines.append(f"browse with      {mlflow_ui_command(self.tracking_uri)}")
        lines.append(f"runs view        {runs_view_link(self.tracking_uri, self.experiment_id)}")
        return "\n".join(lines)


def rank_rows(rows: Sequence[TrialRow], mode: str) -> list[TrialRow]:
    """Rows best first; trials without a value last, in start order."""
    sign = 1.0 if mode == "min" else -1.0
    scored = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    rest = [r for r in rows if r not in scored]
    return sorted(scored, key=lambda r: sign * float(r.value or 0.0)) + rest


def format_table(rows: Sequence[TrialRow], *, metric: str) -> str:
    """Aligned text table of trials (id, status, metric, x constant, epochs, settings)."""
    keys = sorted({k for r in rows for k in r.params})
    body = [
        [
            r.trial_id + (f" ({r.reference})" if r.reference else ""),
            r.status,
            "-" if r.value is None else f"{r.value:.4f}",
            "-" if r.vs_baseline is None else f"{r.vs_baseline:.2f}",
            str(r.epochs),
            *[_short(r.params.get(k, "")) for k in keys],
        ]
        for r in rows
    ]
    return text_table(["trial", "status", metric, "x constant", "epochs", *keys], body)


def rows_csv(rows: Sequence[TrialRow], *, metric: str) -> str:
    """The results table as CSV (one line per trial, settings as columns)."""
    keys = sorted({k for r in rows for k in r.params})
    header = [
        "trial_id",
        "run_id",
        "status",
        "reference",
        metric,
        f"{metric}_const_median",
        "epochs",
        "checkpoint",
        *keys,
    ]
    body = [
        [
            r.trial_id,
            r.run_id,
            r.status,
            r.reference,
            "" if r.value is None else r.value,
            "" if r.baseline is None else r.baseline,
            r.epochs,
            r.checkpoint,
            *[r.params.get(k, "") for k in keys],
        ]
        for r in rows
    ]
    return csv_text(header, body)


def collect_rows(
    results: ResultGrid,
    runs: Sequence[Run],
    *,
    metric: str,
    base_values: Mapping[str, Any] | None = None,
) -> list[TrialRow]:
    """One row per child run (start order), with Tune's last result where there is one.

    ``params`` holds each trial's effective value of every searched field: its sample,
    else ``base_values`` (a reference point fixes only some fields).
    """
    by_trial: dict[str, Any] = {}
    for r in results_list(results):
        tid = (r.metrics or {}).get("trial_id")
        if tid:
            by_trial[str(tid)] = r
    rows = []
    for run in runs:
        run_tags = run.data.tags
        if run_tags.get(tags.ROLE, "trial") != "trial":
            continue  # seed confirmations are reported apart
        tid = run_tags.get(tags.TRIAL_ID, "")
        res = by_trial.get(tid)
        if res is not None:
            params = sample_of(res.config)
            reported = res.metrics
            epochs = int(reported["epoch"]) + 1 if "epoch" in reported else 0
        else:
            params = {
                k[len("trial.") :]: parse_param(v)
                for k, v in run.data.params.items()
                if k.startswith("trial.")
            }
            reported = run.data.metrics
            epochs = 0
        value, baseline = reported.get(metric), reported.get(f"{metric}_const_median")
        params = {**(base_values or {}), **params}
        rows.append(
            TrialRow(
                trial_id=tid,
                run_id=run.info.run_id,
                status=run_tags.get(tags.STATUS, "running"),
                reference=run_tags.get(tags.REFERENCE, ""),
                params=params,
                value=float(value) if value is not None else None,
                epochs=epochs,
                checkpoint=run_tags.get(tags.BEST_CHECKPOINT, ""),
                baseline=float(baseline) if baseline is not None else None,
            )
        )
    return rows


def best_row(
    results: ResultGrid, rows: Sequence[TrialRow], metric: str, mode: str
) -> TrialRow | None:
    """The row of Tune's best result (last reported value), or None if none reported."""
    try:
        best = results.get_best_result(metric=metric, mode=mode, filter_nan_and_inf=True)
    except RuntimeError:
        return None
    tid = str((best.metrics or {}).get("trial_id", ""))
    return next((r for r in rows if r.trial_id == tid), None)


def results_list(results: ResultGrid) -> list[Any]:
    """The grid's results as a list (ResultGrid is indexable, not typed as iterable)."""
    return [results[i] for i in range(len(results))]


def _test_lines(metrics: Mapping[str, float]) -> list[str]:
    """The best trial's test scores, the MAE beside the constant predictor's."""
    lines = []
    for key in ("test_MAE", "test_RMSE", "test_spearman", "test_rank_acc"):
        if key not in metrics:
            continue
        line = f"{key:<16} {metrics[key]:.4f}"
        constant = metrics.get(f"{key}_const_median")
        if constant:
            line += f"  (constant train median: {constant:.4f}; {metrics[key] / constant:.2f} x)"
        lines.append(line)
    return lines


def parse_param(text: str) -> Any:
    """An MLflow param's value back as YAML reads it (``0.02`` -> 0.02); else the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items())) or "(base config)"
