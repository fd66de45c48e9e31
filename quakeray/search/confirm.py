"""The seed check at a search's end: its answer trained again on fresh seeds, scored on test.

A search picks its best configuration on one seed, and a few percent between two trials
is within seed noise. With ``search.confirm``, the MSE-only point, the paper's point and
the best configuration (when it is neither) are each trained on ``search.confirm_seeds``
fresh seeds (``optim.seed + 1``, ``+ 2``, ...) and evaluated on test, as one more Tune
experiment in ``<search folder>/confirm`` whose runs are children of the search's parent
run (role ``confirm``). The verdict compares each joint-loss configuration with MSE only
seed by seed (:mod:`quakeray.seeds`).
"""

from __future__ import annotations

import logging
from typing import Any

from quakeray import tracking
from quakeray.config import VARIANT_KEY, ExperimentConfig
from quakeray.errors import SearchError
from quakeray.search.results import Confirmation, TrialRow, parse_param
from quakeray.search.runs import child_runs
from quakeray.search.searchers import PointsSearcher
from quakeray.search.space import REFERENCE_POINTS, space_value
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec
from quakeray.search.tuner import Search, fit, new_tuner, restored_tuner
from quakeray.seeds import SeedScores, paired_difference
from quakeray.tracking import tags

__all__ = [
    "CONFIRM_METRIC",
    "confirm",
    "confirmation_configs",
    "confirmation_points",
    "log_confirmation",
    "read_confirmation",
]

log = logging.getLogger(__name__)

CONFIRM_METRIC = "test_MAE"
"""What the confirmation scores (on the test split, which the search never saw)."""

MSE_ONLY = "mse_only"


def confirmation_configs(cfg: ExperimentConfig, best: TrialRow) -> dict[str, dict[str, Any]]:
    """Label -> settings: MSE only, the paper's point, and the best when it is neither."""
    shown = {k for p in REFERENCE_POINTS for k in p.values} | set(best.params)
    base = {k: space_value(cfg, k) for k in sorted(shown)}
    if VARIANT_KEY in best.params:  # both losses confirmed under the best's variant
        base[VARIANT_KEY] = best.params[VARIANT_KEY]
    configs = {p.name: {**base, **p.values} for p in REFERENCE_POINTS}
    best_settings = {**base, **best.params}
    if best_settings not in configs.values():
        configs["best"] = best_settings
    return configs


def confirmation_points(cfg: ExperimentConfig, best: TrialRow) -> list[dict[str, Any]]:
    """One trial per configuration and fresh seed, seeds outermost (pairs finish together)."""
    seeds = [cfg.optim.seed + i for i in range(1, cfg.search.confirm_seeds + 1)]
    configs = confirmation_configs(cfg, best)
    return [
        {**settings, "optim.seed": seed, SPEC_KEY: TrialSpec(role="confirm", label=label)}
        for seed in seeds
        for label, settings in configs.items()
    ]


def confirm(search: Search, best: TrialRow) -> Confirmation:
    """Run (or, on ``--resume``, continue) the confirmation and read its verdict back.

    Raises:
        KeyboardInterrupt: Ctrl-C; ``quakeray tune --resume`` continues the confirmation.
    """
    from ray.tune import Tuner
    from ray.tune.search import ConcurrencyLimiter

    folder = search.ref.confirm_folder
    if Tuner.can_restore(folder):
        tuner = restored_tuner(search, folder=folder, test_trials=True)
    else:
        s = search.cfg.search
        points = confirmation_points(search.cfg, best)
        searcher = ConcurrencyLimiter(
            PointsSearcher(points, metric=s.metric, mode=s.mode), max_concurrent=s.max_concurrent
        )
        tuner = new_tuner(
            search, searcher, folder=folder, num_samples=len(points), test_trials=True
        )
    print(f"confirming on {search.cfg.search.confirm_seeds} fresh seeds in {folder}", flush=True)
    fit(tuner, search)
    ref = search.ref
    found = read_confirmation(ref.uri, ref.experiment_id, ref.parent_run_id)
    if found is None:
        raise SearchError(f"no confirmation run finished with a test score; see {folder}")
    return found


def read_confirmation(uri: str, experiment_id: str, parent_run_id: str) -> Confirmation | None:
    """The confirmation runs of a search, read back from MLflow (None when it has none).

    Each run's settings are its ``trial.*`` params but the seed; only completed runs with
    a test score count.
    """
    values: dict[str, dict[int, float]] = {}
    configs: dict[str, dict[str, Any]] = {}
    constants = []
    for run in child_runs(uri, experiment_id, parent_run_id):
        run_tags, metrics = run.data.tags, run.data.metrics
        label = run_tags.get(tags.CONFIRM)
        if run_tags.get(tags.ROLE) != "confirm" or not label:
            continue
        if CONFIRM_METRIC not in metrics or run_tags.get(tags.STATUS) != "completed":
            log.warning("confirmation run %s has no %s", run.info.run_id, CONFIRM_METRIC)
            continue
        values.setdefault(label, {})[int(run_tags[tags.SEED])] = float(metrics[CONFIRM_METRIC])
        configs[label] = {
            k.removeprefix("trial."): parse_param(v)
            for k, v in sorted(run.data.params.items())
            if k.startswith("trial.") and k != "trial.optim.seed"
        }
        if f"{CONFIRM_METRIC}_const_median" in metrics:
            constants.append(float(metrics[f"{CONFIRM_METRIC}_const_median"]))
    if not values:
        return None
    order = sorted(values, key=lambda label: (label != MSE_ONLY, label != "paper", label))
    mse = values.get(MSE_ONLY, {})
    return Confirmation(
        metric=CONFIRM_METRIC,
        configs={label: configs[label] for label in order},
        scores={label: SeedScores(values[label]) for label in order},
        constant=sum(constants) / len(constants) if constants else None,
        differences={
            label: paired_difference(values[label], mse) for label in order if label != MSE_ONLY
        },
    )


def log_confirmation(search: Search, confirmation: Confirmation) -> None:
    """The parent run gets the table, the verdicts, a figure and each mean as a metric."""
    from quakeray.plots import confirmation_figure

    logger = tracking.RunLogger(search.ref.uri, search.ref.parent_run_id)
    logger.log_text(confirmation.format() + "\n", "confirmation.txt")
    scores = confirmation.scores
    figure = confirmation_figure(
        {label: (s.mean, s.sd or 0.0) for label, s in scores.items()},
        metric=confirmation.metric,
        constant=confirmation.constant,
    )
    logger.log_figure(figure, "plots/confirmation.png")
    logger.log_metrics(
        {
            f"confirm_{label}_{confirmation.metric}": s.mean
            for label, s in confirmation.scores.items()
        },
        step=0,
    )
    verdicts = confirmation.verdicts()
    if verdicts:  # (the parent's description shows them all: search.description)
        logger.set_tags({tags.VERDICT: verdicts[-1]})
