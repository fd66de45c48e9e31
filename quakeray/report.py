"""``quakeray report EXPERIMENT``: the paper's comparison, read back from MLflow.

Per backbone: the MSE-only MAE against the best joint-loss (MSE + ranking) MAE, each as
mean +- std over seeds where several seeds ran, and the relative improvement. Runs are
the finished training runs of the experiment (search trials or ``quakeray train`` runs);
trials that ASHA stopped early, failed runs and the search's parent runs are left out.

How runs become table cells:

- a *configuration* is a run's flattened config without its seeds and bookkeeping
  (``optim.seed``, ``tracking.*``, ``run.*``, ``search.*``, ...); the runs of one
  configuration are its seeds. MSE-only configurations (``loss.rank_weight = 0``) also
  ignore the other ``loss.*`` settings, which do nothing at weight 0;
- the best configuration of each side is chosen on **validation** (``best_val_MAE``, the
  best epoch's, else the last ``val_MAE``), never on test;
- the reported MAE is ``test_MAE`` when every run of the backbone has one (``search.test_trials``
  or ``quakeray evaluate``), else the validation MAE; the table says which;
- beside it, the MAE of the constant that predicts the train median on the same split
  (``<metric>_const_median``, logged by every run since quakeray logs baselines; "-" for
  older runs): a model above it has learned nothing a constant does not know;
- a search run with ``search.confirm`` adds its seed check below the table: each confirmed
  configuration's test MAE over fresh seeds, the constant, and whether each joint loss's
  difference from MSE only is beyond seed noise (a paired 95% interval). Its runs (role
  ``confirm``) stay out of the table above, which compares the search's own trials.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from quakeray.config import VARIANT_KEY
from quakeray.errors import SearchError
from quakeray.search.results import Confirmation
from quakeray.seeds import PairedDifference, SeedScores, paired_difference
from quakeray.tables import csv_text, markdown_table, text_table
from quakeray.tracking import tags

__all__ = [
    "Cell",
    "Format",
    "Report",
    "ReportRow",
    "RunResult",
    "SizeRow",
    "build_report",
    "config_key",
    "format_report",
    "format_size_rows",
    "print_report",
    "run_result",
    "size_rows",
    "table_rows",
]

Format = Literal["text", "markdown", "csv"]

PARENT_TAG = "mlflow.parentRunId"
_IGNORED_PREFIXES = ("tracking.", "run.", "search.", "trial.", "tune.", "optuna.", "scaling.")
_SELECT_METRICS = ("best_val_MAE", "val_MAE")
_REPORT_METRICS = ("test_MAE", "best_val_MAE", "val_MAE")


@dataclass(frozen=True)
class RunResult:
    """One finished run as the report sees it."""

    run_id: str
    backbone: str
    rank_weight: float
    margin: float
    config_key: tuple[tuple[str, str], ...]  # the configuration, seeds excluded
    metrics: dict[str, float]
    seed: int = 0  # optim.seed
    train_fraction: float = 1.0  # data.train_fraction
    variant: str = ""  # the search.variants bundle the trial ran ("" = none)

    @property
    def group(self) -> str:
        """The table row it belongs to: its backbone, and its variant when it has one."""
        return f"{self.backbone} ({self.variant})" if self.variant else self.backbone


@dataclass
class Cell:
    """Mean +- std of one configuration over its seeds."""

    mean: float
    std: float | None  # None with a single seed
    n: int
    margin: float
    rank_weight: float

    def text(self, digits: int = 4) -> str:
        """``2.6796 +- 0.0123 (n=3)`` or ``2.6796 (n=1)``."""
        spread = f" +- {self.std:.{digits}f}" if self.std is not None else ""
        return f"{self.mean:.{digits}f}{spread} (n={self.n})"


@dataclass
class ReportRow:
    """One backbone: MSE only vs the best joint loss."""

    backbone: str
    metric: str  # the reported metric (test_MAE, best_val_MAE or val_MAE)
    mse: Cell | None
    joint: Cell | None
    constant: float | None = None  # the metric of the constant train-median predictor

    @property
    def improvement_pct(self) -> float | None:
        """Relative MAE reduction of the joint loss over MSE only, in percent."""
        if self.mse is None or self.joint is None or self.mse.mean == 0:
            return None
        return 100.0 * (self.mse.mean - self.joint.mean) / self.mse.mean


@dataclass
class Report:
    """The whole table and where it came from."""

    experiment: str
    tracking_uri: str
    runs: int
    rows: list[ReportRow]
    confirmations: dict[str, Confirmation] = field(default_factory=dict)  # search -> its check
    sizes: list[SizeRow] = field(default_factory=list)  # by data.train_fraction, when it varies


@dataclass(frozen=True)
class SizeRow:
    """One training-set size: MSE only against the joint loss, over the same seeds."""

    backbone: str
    train_fraction: float
    metric: str
    mse: SeedScores | None
    joint: SeedScores | None
    difference: PairedDifference | None  # joint - MSE only, paired by seed
    constant: float | None  # the metric of the constant train-median predictor


def build_report(experiment: str, *, tracking_uri: str | None = None) -> Report:
    """Read the experiment's runs from MLflow and build the table.

    Raises:
        SearchError: No such experiment, or no finished run with a backbone, a loss
            weight and a validation MAE.
        TrackingError: The store does not exist or cannot be reached.
    """
    from mlflow.tracking import MlflowClient

    from quakeray.tracking import check_existing_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or "")
    check_existing_store(uri, "run the report where the search ran, or pass --tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=20)]
        raise SearchError(
            f"no MLflow experiment {experiment!r} in {uri} (found: {', '.join(names) or 'none'}); "
            "pass the search name, or --tracking-uri for another store"
        )
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50_000
    )
    parents = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tags.ROLE}` = 'search'", max_results=50_000
    )
    shared = {p.info.run_id: p.data.params for p in parents}
    results = [
        r
        for r in (run_result(run, shared.get(run.data.tags.get(PARENT_TAG, ""))) for run in runs)
        if r is not None
    ]
    if not results:
        raise SearchError(
            f"experiment {experiment!r} in {uri} holds no finished run with model.backbone, "
            "loss.rank_weight and val_MAE; run a search or training into it first"
        )
    return Report(
        experiment,
        uri,
        len(results),
        table_rows(results),
        _confirmations(uri, runs),
        size_rows(results),
    )


def _confirmations(uri: str, runs: Sequence[Any]) -> dict[str, Confirmation]:
    """The seed check of each search in the experiment that ran one, by search run name."""
    from quakeray.search.confirm import read_confirmation

    found = {}
    for run in runs:
        if run.data.tags.get(tags.ROLE) == "search":
            confirmation = read_confirmation(uri, run.info.experiment_id, run.info.run_id)
            if confirmation is not None:
                found[run.info.run_name or run.info.run_id] = confirmation
    return found


def run_result(run: Any, inherited: Mapping[str, str] | None = None) -> RunResult | None:
    """A finished MLflow run as a :class:`RunResult`, or None if it does not belong.

    Args:
        run: The MLflow run.
        inherited: Its search's (parent run's) params: a trial logs only the settings it
            does not share with every other trial, the parent holds those.
    """
    run_tags, metrics = run.data.tags, run.data.metrics
    params = {k: v for k, v in (inherited or {}).items() if not k.startswith(_IGNORED_PREFIXES)}
    params |= run.data.params
    if run_tags.get(tags.ROLE) in ("search", "confirm") or run_tags.get(tags.STATUS) in (
        "stopped",
        "failed",
        "cancelled",
    ):
        return None
    backbone = params.get("model.backbone")
    weight = _float(params.get("loss.rank_weight"))
    if not backbone or weight is None or not any(m in metrics for m in _SELECT_METRICS):
        return None
    return RunResult(
        run_id=run.info.run_id,
        backbone=backbone,
        rank_weight=weight,
        margin=_float(params.get("loss.margin")) or 0.0,
        config_key=config_key(params, mse_only=weight == 0),
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
        seed=int(_float(params.get("optim.seed")) or 0),
        train_fraction=_float(params.get("data.train_fraction")) or 1.0,
        variant=params.get(f"trial.{VARIANT_KEY}", ""),
    )


def config_key(params: Mapping[str, str], *, mse_only: bool) -> tuple[tuple[str, str], ...]:
    """The configuration a run belongs to: its params without seeds and bookkeeping."""
    keep = []
    for key, value in sorted(params.items()):
        if "seed" in key or key.startswith(_IGNORED_PREFIXES):
            continue
        if mse_only and key.startswith("loss.") and key != "loss.rank_weight":
            continue
        keep.append((key, value))
    return tuple(keep)


def table_rows(results: Sequence[RunResult]) -> list[ReportRow]:
    """One row per backbone, or per backbone and variant (sorted by name)."""
    rows = []
    for backbone in sorted({r.group for r in results}):
        mine = [r for r in results if r.group == backbone]
        metric = next((m for m in _REPORT_METRICS if all(m in r.metrics for r in mine)), "val_MAE")
        mse = _best_cell([r for r in mine if r.rank_weight == 0], metric)
        joint = _best_cell([r for r in mine if r.rank_weight > 0], metric)
        constants = [c for c in (r.metrics.get(f"{metric}_const_median") for r in mine) if c]
        constant = statistics.fmean(constants) if constants else None
        rows.append(ReportRow(backbone, metric, mse, joint, constant))
    return rows


def format_report(report: Report, fmt: Format = "text") -> str:
    """The table as aligned text, a markdown table, or CSV."""
    if fmt == "csv":
        return _csv(report.rows)
    header = [
        "backbone",
        "MAE",
        "constant",
        "MSE only",
        "MSE + ranking",
        "margin",
        "weight",
        "improvement",
    ]
    body = [
        [
            r.backbone,
            r.metric,
            "-" if r.constant is None else f"{r.constant:.4f}",
            r.mse.text() if r.mse else "-",
            r.joint.text() if r.joint else "-",
            f"{r.joint.margin:.4g}" if r.joint else "-",
            f"{r.joint.rank_weight:.4g}" if r.joint else "-",
            f"{r.improvement_pct:+.1f}%" if r.improvement_pct is not None else "-",
        ]
        for r in report.rows
    ]
    title = (
        f"experiment {report.experiment}: {report.runs} finished runs in {report.tracking_uri}; "
        "MAE = mean +- std over seeds (n); constant = the MAE of predicting the train median; "
        "best joint-loss configuration chosen on validation"
    )
    table = markdown_table(header, body) if fmt == "markdown" else text_table(header, body)
    checks = [
        f"seed check of search {name}: {confirmation.format()}"
        for name, confirmation in report.confirmations.items()
    ]
    sizes = [format_size_rows(report.sizes, fmt)] if report.sizes else []
    return "\n\n".join([title, table, *sizes, *checks])


def size_rows(results: Sequence[RunResult]) -> list[SizeRow]:
    """Per backbone and ``data.train_fraction`` (when runs differ in it): both losses over seeds.

    The joint side is the joint-loss configuration with the best mean validation MAE at
    that size; the metric is ``test_MAE`` when every run of the backbone has one.
    """
    rows = []
    for backbone in sorted({r.group for r in results}):
        mine = [r for r in results if r.group == backbone]
        fractions = sorted({r.train_fraction for r in mine})
        if len(fractions) < 2:
            continue
        metric = next((m for m in _REPORT_METRICS if all(m in r.metrics for r in mine)), "val_MAE")
        for fraction in fractions:
            here = [r for r in mine if r.train_fraction == fraction]
            mse = _seed_scores([r for r in here if r.rank_weight == 0], metric)
            joint = _seed_scores([r for r in here if r.rank_weight > 0], metric)
            constants = [c for r in here if (c := r.metrics.get(f"{metric}_const_median"))]
            rows.append(
                SizeRow(
                    backbone,
                    fraction,
                    metric,
                    mse,
                    joint,
                    paired_difference(joint.values, mse.values) if mse and joint else None,
                    statistics.fmean(constants) if constants else None,
                )
            )
    return rows


def format_size_rows(rows: Sequence[SizeRow], fmt: Format = "text") -> str:
    """The training-set-size table: MSE only and the joint loss per size, their difference."""
    header = [
        "backbone",
        "train fraction",
        "MAE",
        "constant",
        "MSE only",
        "MSE + ranking",
        "joint - MSE (95% CI)",
        "verdict",
    ]
    body = []
    for r in rows:
        d = r.difference
        paired = d is not None and d.n > 1
        interval = f"{d.mean:+.3f} ({d.low:+.3f} to {d.high:+.3f})" if d and paired else "-"
        verdict = (
            "-" if not (d and paired) else "beyond noise" if d.beyond_noise else "within noise"
        )
        body.append(
            [
                r.backbone,
                f"{r.train_fraction:g}",
                r.metric,
                "-" if r.constant is None else f"{r.constant:.4f}",
                r.mse.text() if r.mse else "-",
                r.joint.text() if r.joint else "-",
                interval,
                verdict,
            ]
        )
    table = markdown_table(header, body) if fmt == "markdown" else text_table(header, body)
    return "by training-set size (data.train_fraction), mean +- sd over seeds:\n\n" + table


def _seed_scores(runs: Sequence[RunResult], metric: str) -> SeedScores | None:
    """The best configuration (on validation) of ``runs``, its ``metric`` per seed."""
    if not runs:
        return None
    groups: dict[tuple[tuple[str, str], ...], list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.config_key, []).append(r)
    best = min(groups.values(), key=lambda g: statistics.fmean(_select_value(r) for r in g))
    return SeedScores({r.seed: r.metrics.get(metric, _select_value(r)) for r in best})


def print_report(experiment: str, *, tracking_uri: str | None = None, fmt: str = "text") -> None:
    """``quakeray report``: build and print the table."""
    if fmt not in ("text", "markdown", "csv"):
        raise SearchError(f"unknown report format {fmt!r}; use text, markdown or csv")
    text = format_report(build_report(experiment, tracking_uri=tracking_uri), fmt)  # type: ignore[arg-type]
    print(text, end="" if text.endswith("\n") else "\n")


# --------------------------------------------------------------------------- helpers


def _best_cell(runs: Sequence[RunResult], metric: str) -> Cell | None:
    """The configuration with the best mean validation MAE, as mean +- std of ``metric``."""
    if not runs:
        return None
    groups: dict[tuple[tuple[str, str], ...], list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.config_key, []).append(r)

    def selection(group: list[RunResult]) -> float:
        values = [_select_value(r) for r in group]
        return statistics.fmean(values)

    best = min(groups.values(), key=selection)
    values = [r.metrics.get(metric, _select_value(r)) for r in best]
    return Cell(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else None,
        n=len(values),
        margin=best[0].margin,
        rank_weight=best[0].rank_weight,
    )


def _select_value(r: RunResult) -> float:
    return next((r.metrics[m] for m in _SELECT_METRICS if m in r.metrics), math.inf)


def _csv(rows: Sequence[ReportRow]) -> str:
    header = [
        "backbone",
        "metric",
        "constant",
        "mse_mean",
        "mse_std",
        "mse_n",
        "joint_mean",
        "joint_std",
        "joint_n",
        "margin",
        "rank_weight",
        "improvement_pct",
    ]
    body = [
        [
            r.backbone,
            r.metric,
            "" if r.constant is None else r.constant,
            *(_cell_fields(r.mse)),
            *(_cell_fields(r.joint)),
            r.joint.margin if r.joint else "",
            r.joint.rank_weight if r.joint else "",
            "" if r.improvement_pct is None else round(r.improvement_pct, 3),
        ]
        for r in rows
    ]
    return csv_text(header, body)


def _cell_fields(cell: Cell | None) -> list[Any]:
    if cell is None:
        return ["", "", 0]
    return [cell.mean, "" if cell.std is None else cell.std, cell.n]


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
