"""``quakeray tune``: hyperparameter search with Ray Tune, Optuna and ASHA, tracked in MLflow.

One search is one Tune experiment in its own folder (:mod:`.layout`), one MLflow parent
run, and one child run per trial (:mod:`.runs`, :mod:`.tracker`). A trial
(:mod:`.trainable`) trains in its own process (one worker) or through a Ray Train
``TorchTrainer`` (several); each epoch reaches Tune, where ASHA (:mod:`.scheduler`) may
stop the trial early and Optuna's TPE (:mod:`.searchers`, :mod:`.study`) learns from it.
The reference points (MSE only, the paper's point) run first. ``quakeray tune --resume
FOLDER`` continues an interrupted search with ``Tuner.restore`` into the same parent run:
finished trials are kept, unfinished ones restart from their last checkpoint, the
searcher keeps its state, and what a killed driver left is continued
(:mod:`.recovery`).

Example:
    >>> summary = run_search(load_config("experiments/demo.yaml"))  # doctest: +SKIP
    >>> summary.best.params  # doctest: +SKIP
    {'loss.margin': 0.031, 'loss.rank_weight': 0.42}
"""

from __future__ import annotations

import contextlib
import logging
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
from quakeray.search.description import NOTE_TAG, describe_search
from quakeray.search.layout import SearchRef, new_search_dir
from quakeray.search.parent_run import log_best, log_results, log_size_study
from quakeray.search.recovery import plan_recovery
from quakeray.search.results import SearchSummary, best_row, collect_rows, results_list
from quakeray.search.runs import child_runs, close_open_children, finish_orphaned_runs
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
    varying_fields,
)
from quakeray.search.state import SearchState, load_search_state, write_state
from quakeray.search.trial_spec import spec_of
from quakeray.search.tuner import Search, fit, new_tuner, restored_tuner
from quakeray.tracking import tags

if TYPE_CHECKING:
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
        folder, state = resumed
        search = Search(cfg, state.ref(folder), data)
        tracking.mlflow_client(uri).update_run(search.ref.parent_run_id, status="RUNNING")
        tuner = restored_tuner(search, folder=folder, test_trials=cfg.search.test_trials)
        # What the killed driver left, read once, then handed to whoever acts on it.
        plan = plan_recovery(search.ref, results_list(tuner.tuner.get_results()))
        finish_orphaned_runs(search.ref, plan.ended, base=cfg)
        tuner.opener.recover(plan)
        tuner.rebuild_rungs(plan.histories)
    else:
        search, searcher = _start(cfg, uri, data)
        hold.enter_context(_claimed(search.ref.folder))
        tuner = new_tuner(
            search,
            searcher,
            folder=search.ref.folder,
            num_samples=num_trials(cfg),
            scheduler=build_scheduler(cfg),
            test_trials=cfg.search.test_trials,
            callbacks=callbacks,
        )
    ref = search.ref
    print(f"search folder {ref.folder}; MLflow parent run {ref.parent_run_id} in {uri}", flush=True)
    results = fit(tuner, search)
    try:
        summary = _finish(search, results)
        if cfg.search.confirm and summary.best is not None:
            summary.confirmation = confirm(search, summary.best)
            log_confirmation(search, summary.confirmation)
        tracking.RunLogger(uri, ref.parent_run_id).set_tags({NOTE_TAG: describe_search(summary)})
    except BaseException as exc:
        tracking.end_run(
            uri, ref.parent_run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        )
        raise
    tracking.end_run(uri, ref.parent_run_id, "FINISHED")
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
    ref = SearchRef(folder, uri, experiment_id, parent)
    state = SearchState(
        config=to_dict(cfg),
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        data_path=data.path,
        stats_path=data.stats_path,
        study_name=study,
    )
    write_state(ref, state)
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
    return Search(cfg, ref, data), searcher


# --------------------------------------------------------------------------- the end


def _configs(results: ResultGrid) -> list[dict[str, Any]]:
    """The config of every trial in a ``ResultGrid``."""
    return [dict(r.config or {}) for r in results_list(results)]


def _finish(search: Search, results: ResultGrid) -> SearchSummary:
    """Close every trial run, log the results to the parent, pick and test the best."""
    cfg, s, ref = search.cfg, search.cfg.search, search.ref
    # Nobody stays RUNNING, whatever happened.
    tune_runs = {spec_of(c).run_id for c in _configs(results)} - {""}
    close_open_children(ref, tune_runs=tune_runs)
    shown = [*s.space, *(k for p in reference_points(cfg) for k in p.values)]
    runs = child_runs(ref.uri, ref.experiment_id, ref.parent_run_id)
    rows = collect_rows(
        results,
        runs,
        metric=s.metric,
        base_values={k: space_value(cfg, k) for k in shown},
    )
    summary = SearchSummary(
        name=s.name,
        search_dir=ref.folder,
        tracking_uri=ref.uri,
        experiment_id=ref.experiment_id,
        parent_run_id=ref.parent_run_id,
        metric=s.metric,
        mode=s.mode,
        rows=rows,
        best=best_row(results, rows, s.metric, s.mode),
        best_checkpoint=None,
    )
    log_results(search, summary)
    if "data.train_fraction" in s.space:
        log_size_study(search, runs)
    if summary.best is None:
        errors = [r.error for r in results_list(results) if r.error is not None]
        first = (
            str(errors[0]).strip().splitlines()[-1][:200]
            if errors
            else "no trial reported a metric"
        )
        raise SearchError(f"all {len(rows)} trials failed ({first}); see {ref.folder}")
    log_best(search, summary)
    return summary
