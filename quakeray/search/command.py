"""``quakeray tune``: hyperparameter search with Ray Tune, Optuna and ASHA, tracked in MLflow.

One search is one Tune experiment in its own folder (:mod:`.state`), one MLflow parent
run, and one child run per trial (:mod:`.runs`, :mod:`.tracker`). A trial
(:mod:`.trial`) runs a Ray Train ``TorchTrainer``; epoch metrics reach Tune through
Train's ``TuneReportCallback``, where ASHA (:mod:`.scheduler`) may stop the trial early
and Optuna's TPE (:mod:`.searchers`) learns from it. The reference points (MSE only, the
paper's point) run first. ``quakeray tune --resume FOLDER`` continues an interrupted
search with ``Tuner.restore`` into the same parent run: finished trials are kept,
unfinished ones restart (their Train run resumes from its last checkpoint), and the
searcher keeps its state.

Example:
    >>> summary = run_search(load_config("experiments/demo.yaml"))  # doctest: +SKIP
    >>> summary.best.params  # doctest: +SKIP
    {'loss.margin': 0.031, 'loss.rank_weight': 0.42}
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

from quakeray import storage, tracking
from quakeray.config import ExperimentConfig, flatten, replace, to_dict
from quakeray.data.prepare import PreparedData, prepare_data
from quakeray.errors import SearchError
from quakeray.locks import claimed
from quakeray.preflight import check_model
from quakeray.search.confirm import confirm, log_confirmation
from quakeray.search.description import NOTE_TAG, describe_search, mark_best
from quakeray.search.results import (
    SearchSummary,
    best_row,
    collect_rows,
    results_list,
    rows_csv,
)
from quakeray.search.runs import (
    RUN_KEY,
    child_runs,
    close_open_children,
    finish_orphaned_runs,
)
from quakeray.search.scheduler import build_scheduler, describe_scheduler
from quakeray.search.searchers import build_searcher
from quakeray.search.space import (
    check_metric,
    check_space,
    data_for_every_trial,
    describe_sampler,
    num_trials,
    reference_points,
    space_value,
    trial_config,
    varying_fields,
)
from quakeray.search.state import (
    TRAIN_SUBDIR,
    SearchState,
    load_search_state,
    new_search_dir,
    train_run_dir,
    write_state,
)
from quakeray.search.tuner import Search, fit, new_tuner, restored_tuner
from quakeray.search.unsaved import offer_unsaved_trials
from quakeray.tracking import tags

if TYPE_CHECKING:
    from mlflow.entities import Run
    from ray.tune import ResultGrid

__all__ = ["run_search"]

log = logging.getLogger(__name__)


def run_search(
    cfg: ExperimentConfig, resume: str | None = None, *, callbacks: Sequence[Any] = ()
) -> SearchSummary:
    """``quakeray tune``: check, start or resume the search, summarise, log, evaluate.

    Args:
        cfg: The resolved config (ignored with ``resume``: the search's own is used).
        resume: A search folder to continue (``Tuner.restore``).
        callbacks: Extra Tune callbacks (driver side) for a new search, run after
            quakeray's own; a resumed search runs the ones it was started with.

    Returns:
        The summary (also printed).

    Raises:
        SearchError: Bad space or settings, a resume folder without a search, or every
            trial failed.
        KeyboardInterrupt: Ctrl-C; the search folder is resumable (the command is printed).
    """
    t0 = time.monotonic()
    cfg, resumed = _config_and_state(cfg, resume)
    with contextlib.ExitStack() as hold:
        if resumed:  # a new search's folder is held as soon as it exists
            hold.enter_context(_claimed(resumed[0]))
        summary = _search(cfg, resumed, hold, callbacks)
    summary.wall_s = time.monotonic() - t0
    print(summary.format(top_k=cfg.search.top_k), flush=True)
    return summary


def _claimed(folder: str) -> contextlib.AbstractContextManager[None]:
    """The search folder held by this driver: a second driver on it is refused."""
    return claimed(folder, what="search folder", instead="resume it when that driver has ended")


def _search(
    cfg: ExperimentConfig,
    resumed: tuple[str, SearchState] | None,
    hold: contextlib.ExitStack,
    callbacks: Sequence[Any],
) -> SearchSummary:
    """Checks, then Tune's run of the search, its summary and seed check; the parent closed."""
    check_space(cfg)
    check_metric(cfg)
    uri = resumed[1].tracking_uri if resumed else tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking(uri)
    data = resumed[1].data if resumed else prepare_data(data_for_every_trial(cfg))
    check_model(cfg, data)
    _start_ray(cfg, data, uri)
    if resumed:
        search = _reopen(cfg, *resumed, data=data)
        tuner = restored_tuner(search, folder=search.folder, test_trials=cfg.search.test_trials)
        saved = tuner.get_results()  # the trials Tune saved (read from the folder, no fit)
        offer_unsaved_trials(
            search.folder,
            search.uri,
            search.experiment_id,
            search.parent,
            known_run_ids={str(c[RUN_KEY]) for c in _configs(saved) if c.get(RUN_KEY)},
        )
    else:
        search, searcher = _start(cfg, uri, data)
        hold.enter_context(_claimed(search.folder))
        tuner = new_tuner(
            search,
            searcher,
            folder=search.folder,
            num_samples=num_trials(cfg),
            scheduler=build_scheduler(cfg, train_storage=storage.join(search.folder, TRAIN_SUBDIR)),
            test_trials=cfg.search.test_trials,
            callbacks=callbacks,
        )
    print(f"search folder {search.folder}; MLflow parent run {search.parent} in {uri}", flush=True)
    results = fit(tuner, search)
    try:
        summary = _finish(search, results)
        if cfg.search.confirm and summary.best is not None:
            summary.confirmation = confirm(search, summary.best)
            log_confirmation(search, summary.confirmation)
        tracking.RunLogger(uri, search.parent).set_tags({NOTE_TAG: describe_search(summary)})
    except BaseException as exc:
        tracking.end_run(
            uri, search.parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        )
        raise
    tracking.end_run(uri, search.parent, "FINISHED")
    return summary


# --------------------------------------------------------------------------- start or resume


def _config_and_state(
    cfg: ExperimentConfig, resume: str | None
) -> tuple[ExperimentConfig, tuple[str, SearchState] | None]:
    """The search's config, and (folder, state) when resuming one."""
    if resume:
        folder, state = load_search_state(resume)
        cfg = state.experiment_config
        print(f"resuming search {cfg.search.name} in {folder}", flush=True)
        return cfg, (folder, state)
    # The search's MLflow experiment is its name; the trials' params say so too.
    cfg = replace(cfg, tracking=replace(cfg.tracking, experiment=cfg.search.name))
    print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    return cfg, None


def _start_ray(cfg: ExperimentConfig, data: PreparedData, uri: str) -> None:
    """A Ray that holds ``max_concurrent`` trials at once, and a cluster preflight."""
    from quakeray.preflight import preflight
    from quakeray.runtime import check_resources, init_ray, local_num_cpus, ray_address

    s = cfg.search
    concurrent = max(1, min(s.max_concurrent, num_trials(cfg)))
    ray_cfg = cfg
    if not ray_address(cfg) and not cfg.run.num_cpus:
        cpus = local_num_cpus(cfg, extra_cpus=s.trial_cpus, concurrent=concurrent)
        ray_cfg = replace(cfg, run=replace(cfg.run, num_cpus=cpus))
    init_ray(ray_cfg, extra_cpus=s.trial_cpus)
    check_resources(cfg, concurrent=concurrent, extra_cpus=s.trial_cpus)
    preflight(
        cfg,
        data_path=data.path,
        tracking_uri=uri,
        storage_path=storage.resolve(cfg.run.storage_path),
    )


def _start(cfg: ExperimentConfig, uri: str, data: PreparedData) -> tuple[Search, Any]:
    """A new search: its folder, searcher, parent run and state file (in that order)."""
    s = cfg.search
    # Everything that can refuse the search runs before its folder and parent run exist.
    folder = new_search_dir(storage.resolve(cfg.run.storage_path), s.name)
    study = s.study_name or storage.name(folder)
    try:
        searcher = build_searcher(cfg, study_name=study, fresh=True)
    except BaseException:
        storage.remove_empty_dir(folder)
        raise
    experiment_id = tracking.get_or_create_experiment(uri, s.name)
    parent = tracking.start_run(
        uri,
        experiment_id,
        run_name=storage.name(folder),
        tags={tags.ROLE: "search", tags.SEARCH: s.name, tags.SEARCH_DIR: folder},
    )
    state = SearchState(
        config=to_dict(cfg),
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        data_path=data.path,
        stats_path=data.stats_path,
        study_name=study,
    )
    write_state(folder, state)
    # The settings every trial shares, once; the searched ones are each trial's own.
    varying = varying_fields(cfg)
    shared = {k: v for k, v in flatten(cfg).items() if k not in varying}
    tracking.log_config(uri, parent, cfg, params=shared)
    tracking.RunLogger(uri, parent).log_params(
        {
            "tune.sampler": describe_sampler(cfg),
            "tune.scheduler": describe_scheduler(cfg),
            "tune.trials": num_trials(cfg),
            "tune.reference_points": ", ".join(p.name for p in reference_points(cfg)) or "none",
            "tune.search_dir": folder,
            "optuna.study_name": study,
            "optuna.storage": s.optuna_storage or "memory",
        }
    )
    search = Search(cfg, folder, uri, experiment_id, parent, data)
    return search, searcher


def _reopen(
    cfg: ExperimentConfig, folder: str, state: SearchState, *, data: PreparedData
) -> Search:
    """A resumed search: its parent run RUNNING again."""
    tracking.mlflow_client(state.tracking_uri).update_run(state.parent_run_id, status="RUNNING")
    return Search(cfg, folder, state.tracking_uri, state.experiment_id, state.parent_run_id, data)


# --------------------------------------------------------------------------- the end


def _configs(results: ResultGrid) -> list[dict[str, Any]]:
    """The config of every trial in a ``ResultGrid``."""
    return [dict(getattr(r, "config", None) or {}) for r in results_list(results)]


def _finish(search: Search, results: ResultGrid) -> SearchSummary:
    """Close every trial run, log the results to the parent, pick and test the best."""
    cfg, s = search.cfg, search.cfg.search
    finish_orphaned_runs(
        search.uri,
        search.experiment_id,
        search.parent,
        results,
        base=cfg,
        train_storage=storage.join(search.folder, TRAIN_SUBDIR),
    )
    # Nobody stays RUNNING, whatever happened.
    tune_runs = {str(c[RUN_KEY]) for c in _configs(results) if c.get(RUN_KEY)}
    close_open_children(search.uri, search.experiment_id, search.parent, tune_runs=tune_runs)
    shown = [*s.space, *(k for p in reference_points(cfg) for k in p.values)]
    runs = child_runs(search.uri, search.experiment_id, search.parent)
    rows = collect_rows(
        results,
        runs,
        metric=s.metric,
        base_values={k: space_value(cfg, k) for k in shown},
    )
    summary = SearchSummary(
        name=s.name,
        search_dir=search.folder,
        tracking_uri=search.uri,
        experiment_id=search.experiment_id,
        parent_run_id=search.parent,
        metric=s.metric,
        mode=s.mode,
        rows=rows,
        best=best_row(results, rows, s.metric, s.mode),
        best_checkpoint=None,
    )
    _log_results(search, summary)
    if "data.train_fraction" in s.space:
        _log_size_study(search, runs)
    if summary.best is None:
        errors = [r.error for r in results_list(results) if r.error is not None]
        first = (
            str(errors[0]).strip().splitlines()[-1][:200]
            if errors
            else "no trial reported a metric"
        )
        raise SearchError(f"all {len(rows)} trials failed ({first}); see {search.folder}")
    _log_best(search, summary)
    return summary


def _log_results(search: Search, summary: SearchSummary) -> None:
    """The parent run gets ``results.csv``, the search's figures and the trial counts."""
    from quakeray.plots import history_figure, margin_weight_figure

    metric, rows = summary.metric, summary.rows
    logger = tracking.RunLogger(search.uri, search.parent)
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


def _log_size_study(search: Search, runs: Sequence[Run]) -> None:
    """A search over ``data.train_fraction``: both losses against training-set size."""
    from quakeray.plots import size_figure
    from quakeray.report import format_size_rows, run_result, size_rows

    shared = tracking.mlflow_client(search.uri).get_run(search.parent).data.params
    results = [r for r in (run_result(run, shared) for run in runs) if r is not None]
    rows = size_rows(results)
    if not rows:
        return
    rows = [r for r in rows if r.backbone == rows[0].backbone]  # one figure, one backbone
    logger = tracking.RunLogger(search.uri, search.parent)
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


def _log_best(search: Search, summary: SearchSummary) -> None:
    """The best trial's value, tags, config and checkpoint on the parent; its test score."""
    from quakeray.checkpoint import best_checkpoint_at

    best, metric = summary.best, summary.metric
    assert best is not None
    best_cfg = trial_config(search.cfg, best.params)
    ranked_by = best_cfg.run.checkpoint_metric
    checkpoint = best.checkpoint
    if not checkpoint:  # not finalised: look in its Train folder (maybe a continued trial's)
        run = tracking.mlflow_client(search.uri).get_run(best.run_id)
        folder_of = run.data.tags.get(tags.CONTINUES) or best.trial_id
        checkpoint = best_checkpoint_at(train_run_dir(search.folder, folder_of), ranked_by) or ""
    summary.best_checkpoint = checkpoint or None
    logger = tracking.RunLogger(search.uri, search.parent)
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
        mark_best(search.uri, search.experiment_id, search.parent, best.run_id)
    logger.log_text(yaml.safe_dump(to_dict(best_cfg), sort_keys=False), "best_config.yaml")
    if search.cfg.search.evaluate_best and checkpoint:
        from quakeray.evaluate import evaluate_checkpoint
        from quakeray.tracking.datasets import log_dataset

        evaluated = evaluate_checkpoint(checkpoint, split="test", data_path=search.data.path)
        summary.test_metrics = dict(evaluated.metrics)
        logger.log_metrics(summary.test_metrics, step=0)
        log_dataset(search.uri, search.parent, search.data.path, ["test"])
    if search.cfg.tracking.register_best and checkpoint and best.run_id:
        from mlflow.exceptions import MlflowException

        from quakeray.tracking.outputs import register_model

        name = search.cfg.search.name
        try:
            summary.registered_model = register_model(search.uri, best.run_id, checkpoint, name)
        except (MlflowException, OSError) as exc:  # the search's answer stands without it
            reason = str(exc).strip().splitlines()[0][:200]
            log.warning("the best model was not registered as %r: %s", name, reason)
        else:
            logger.set_tags({tags.REGISTERED_MODEL: summary.registered_model})
