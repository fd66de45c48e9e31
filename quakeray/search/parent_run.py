"""What a search's MLflow parent run gets at its end: results, figures, the best trial.

The parent holds the answer: ``results.csv`` and the search's figures
(:func:`log_results`), the size study when ``data.train_fraction`` was searched
(:func:`log_size_study`), and the best trial's value, settings, checkpoint, test score
and registered model (:func:`log_best`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import yaml

from quakeray import tracking
from quakeray.config import to_dict
from quakeray.search.description import mark_best
from quakeray.search.results import SearchSummary, rows_csv
from quakeray.search.space import trial_config
from quakeray.search.tuner import Search
from quakeray.tracking import tags

if TYPE_CHECKING:
    from mlflow.entities import Run

__all__ = ["log_best", "log_results", "log_size_study"]

log = logging.getLogger(__name__)


def log_results(search: Search, summary: SearchSummary) -> None:
    """The parent run gets ``results.csv``, the search's figures and the trial counts."""
    from quakeray.plots import history_figure, margin_weight_figure

    metric, rows = summary.metric, summary.rows
    logger = tracking.RunLogger(search.ref.uri, search.ref.parent_run_id)
    logger.log_text(rows_csv(rows, metric=metric), "results.csv")
    logger.log_figure(
        history_figure(rows, metric=metric, mode=summary.mode), "plots/optimisation_history.png"
    )
    surface = margin_weight_figure(rows, metric=metric)
    if surface is not None:
        logger.log_figure(surface, f"plots/{metric}_margin_weight.png")
    logger.log_metrics(
        {f"trials_{k}": v for k, v in summary.counts().items()}
        | {"trial_epochs": sum(r.epochs for r in rows)},
        step=0,
    )


def log_size_study(search: Search, runs: Sequence[Run]) -> None:
    """A search over ``data.train_fraction``: both losses against training-set size."""
    from quakeray.plots import size_figure
    from quakeray.report import format_size_rows, run_result, size_rows

    shared = tracking.mlflow_client(search.ref.uri).get_run(search.ref.parent_run_id).data.params
    results = [r for r in (run_result(run, shared) for run in runs) if r is not None]
    rows = size_rows(results)
    if not rows:
        return
    rows = [r for r in rows if r.backbone == rows[0].backbone]  # one figure, one backbone
    logger = tracking.RunLogger(search.ref.uri, search.ref.parent_run_id)
    logger.log_text(format_size_rows(rows) + "\n", "train_size.txt")
    constants = [r.constant for r in rows if r.constant is not None]
    figure = size_figure(
        [r.train_fraction for r in rows],
        {
            "MSE only": [(r.mse.mean, r.mse.sd or 0.0) if r.mse else None for r in rows],
            "MSE + ranking": [(r.joint.mean, r.joint.sd or 0.0) if r.joint else None for r in rows],
        },
        metric=rows[0].metric,
        constant=sum(constants) / len(constants) if constants else None,
    )
    logger.log_figure(figure, "plots/train_size.png")


def log_best(search: Search, summary: SearchSummary) -> None:
    """The best trial's value, tags, config and checkpoint on the parent; its test score."""
    from quakeray.checkpoint import best_checkpoint_at

    best, metric = summary.best, summary.metric
    assert best is not None
    best_cfg = trial_config(search.cfg, best.params)
    ranked_by = best_cfg.run.checkpoint_metric
    checkpoint = best.checkpoint
    if not checkpoint:  # not finalised: look in its Train folder (maybe a continued trial's)
        run = tracking.mlflow_client(search.ref.uri).get_run(best.run_id)
        folder_of = run.data.tags.get(tags.CONTINUES) or best.trial_id
        checkpoint = best_checkpoint_at(search.ref.train_dir(folder_of), ranked_by) or ""
    summary.best_checkpoint = checkpoint or None
    logger = tracking.RunLogger(search.ref.uri, search.ref.parent_run_id)
    logger.log_metrics({f"best_{metric}": float(best.value or math.nan)}, step=0)
    logger.set_tags(
        {
            tags.BEST_TRIAL_ID: best.trial_id,
            tags.BEST_RUN_ID: best.run_id,
            tags.BEST_CHECKPOINT: checkpoint,
        }
        | {f"best.{k}": v for k, v in best.params.items()}
    )
    # The best values as metrics too: a runs table sorts and compares those.
    numbers = {k: v for k, v in best.params.items() if isinstance(v, (int, float))}
    logger.log_metrics({f"best.{k}": float(v) for k, v in numbers.items()}, step=0)
    if best.run_id:
        mark_best(search.ref.uri, search.ref.experiment_id, search.ref.parent_run_id, best.run_id)
    logger.log_text(yaml.safe_dump(to_dict(best_cfg), sort_keys=False), "best_config.yaml")
    if search.cfg.search.evaluate_best and checkpoint:
        from quakeray.evaluate import evaluate_checkpoint
        from quakeray.tracking.datasets import log_dataset

        evaluated = evaluate_checkpoint(checkpoint, split="test", data_path=search.data.path)
        summary.test_metrics = dict(evaluated.metrics)
        logger.log_metrics(summary.test_metrics, step=0)
        log_dataset(search.ref.uri, search.ref.parent_run_id, search.data.path, ["test"])
    if search.cfg.tracking.register_best and checkpoint and best.run_id:
        from mlflow.exceptions import MlflowException

        from quakeray.tracking.outputs import register_model

        name = search.cfg.search.name
        try:
            summary.registered_model = register_model(search.ref.uri, best.run_id, checkpoint, name)
        except (MlflowException, OSError) as exc:  # the search's answer stands without it
            reason = str(exc).strip().splitlines()[0][:200]
            log.warning("the best model was not registered as %r: %s", name, reason)
        else:
            logger.set_tags({tags.REGISTERED_MODEL: summary.registered_model})
