"""MLflow runs of a search: one parent run, one child run per trial, none left RUNNING.

A search's runs are written from its driver's node; trials and their Train workers write
none (but their test score with ``search.test_trials``). This keeps MLflow (1.5 s of
imports and store set-up in a fresh process) off every trial's critical path, and gives
each run one writer:

- the driver opens and closes the **parent** run (reopened on ``--resume``);
- the search's writer (:mod:`quakeray.search.writer`, an actor beside the driver) writes
  every trial's **child** run: :class:`~quakeray.search.tracker.TrialRunOpener`, the
  outermost searcher, has it opened when it suggests the trial and hands the run id to
  the trial in its :class:`~quakeray.search.trial_spec.TrialSpec`;
  :class:`~quakeray.search.tracker.TrialRunTracker`, a Tune callback, has each epoch
  logged once, the run of a restarted trial reopened, and the run closed through
  :func:`finish_trial_run`: completed trials and those stopped early by ASHA first get
  their best checkpoint's outputs, then end ``completed`` or ``stopped``; failed trials
  end ``failed`` with their error;
- :func:`finish_orphaned_runs` finishes, at the search's end, the runs of trials Tune
  saved as ended before a killed driver's writer closed them;
- trials cut off with the driver (Ctrl-C, an error in Tune) are closed ``cancelled`` by
  :func:`close_open_children` once ``Tuner.fit`` returns or raises (Tune marks them
  TERMINATED on its way out, so a callback cannot tell them apart). After a killed driver
  their runs stay RUNNING until ``--resume`` restarts those trials into them.

Statuses (tag ``quakeray.status``, with the MLflow run status in brackets): ``running``,
``completed`` (FINISHED), ``stopped`` (FINISHED: a valid, shorter run), ``failed``
(FAILED), ``cancelled`` (KILLED).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal

from quakeray import storage, tracking
from quakeray.checkpoint import rank_key
from quakeray.config import ExperimentConfig, replace
from quakeray.search.layout import SearchRef
from quakeray.search.space import trial_config
from quakeray.search.trial_spec import spec_of
from quakeray.tracking import outputs, tags
from quakeray.train.session import CHECKPOINT_PATH_KEY

if TYPE_CHECKING:
    from mlflow.entities import Run

__all__ = [
    "CHECKPOINT_KEY",
    "MLFLOW_STATUS",
    "TrialStatus",
    "child_runs",
    "close_open_children",
    "close_trial_run",
    "find_trial_run",
    "finish_orphaned_runs",
    "finish_trial_run",
    "open_trial_run",
    "reopen_trial_run",
]

log = logging.getLogger(__name__)

TrialStatus = Literal["running", "completed", "stopped", "failed", "cancelled"]

CHECKPOINT_KEY = CHECKPOINT_PATH_KEY
"""Key of a Tune result holding the checkpoint reported with it (Train's Tune callback,
or the loop itself in a trial's own process)."""

MLFLOW_STATUS: dict[TrialStatus, tracking.RunStatus] = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}


def finish_trial_run(
    uri: str,
    run_id: str,
    *,
    base: ExperimentConfig,
    config: Mapping[str, Any],
    checkpoint: str | None,
    status: TrialStatus,
    trial_id: str,
) -> None:
    """Finalise a still-RUNNING trial run from its best ``checkpoint``, then close it.

    A run someone else closed meanwhile (a trial unwinding after the driver marked it
    stopped) is left as it is.
    """
    if tracking.run_status(uri, run_id) != "RUNNING":
        return
    if checkpoint is not None:
        try:
            cfg = trial_config(base, config)
            # A trial logs no model unless asked: the search registers the best one.
            cfg = replace(
                cfg, tracking=replace(cfg.tracking, log_model=base.search.log_trial_models)
            )
            outputs.finalize_run(uri, run_id, cfg, checkpoint, figures=base.search.trial_figures)
        except Exception as exc:  # the run keeps its metrics; say what is missing
            log.warning("trial %s: could not log its best checkpoint", trial_id)
            tracking.RunLogger(uri, run_id).set_tags(
                {tags.ERROR: f"finalize: {type(exc).__name__}: {exc}"}
            )
    close_trial_run(uri, run_id, status)


def find_trial_run(ref: SearchRef, trial_id: str) -> Run | None:
    """The child run of ``trial_id`` in the search, or None."""
    runs = tracking.mlflow_client(ref.uri).search_runs(
        [ref.experiment_id],
        filter_string=(
            f"tags.`{tags.TRIAL_ID}` = '{trial_id}' "
            f"and tags.`mlflow.parentRunId` = '{ref.parent_run_id}'"
        ),
        max_results=2,
    )
    if len(runs) > 1:
        log.warning("trial %s has %d MLflow runs; using the first", trial_id, len(runs))
    return runs[0] if runs else None


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Run]:
    """All child runs of a search, oldest first."""
    return list(
        tracking.mlflow_client(uri).search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=10_000,
        )
    )


def open_trial_run(
    ref: SearchRef,
    trial_id: str,
    *,
    run_name: str,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Create the child run of a trial (a trial Tune restarts keeps its run: its spec).

    No lookup first: a search of thousands of trials must not search its runs per trial.

    Returns:
        The run id; the run is RUNNING with status tag ``running``.
    """
    all_tags = {tags.ROLE: "trial", tags.TRIAL_ID: trial_id, tags.STATUS: "running"}
    all_tags.update(extra_tags or {})
    return tracking.start_run(
        ref.uri,
        ref.experiment_id,
        run_name=run_name,
        parent_run_id=ref.parent_run_id,
        tags=all_tags,
    )


def reopen_trial_run(uri: str, run: Run) -> None:
    """RUNNING again, status tag ``running``, one more restart counted."""
    run_id = str(run.info.run_id)
    restarts = int(run.data.tags.get(tags.RESTARTS, "0")) + 1
    client = tracking.mlflow_client(uri)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, tags.STATUS, "running")
    client.set_tag(run_id, tags.RESTARTS, str(restarts))


def close_trial_run(
    uri: str,
    run_id: str,
    status: TrialStatus,
    *,
    error: str | None = None,
    only_if_running: bool = False,
) -> bool:
    """End a child run with ``status``; returns whether it changed anything.

    Args:
        uri: Tracking URI.
        run_id: The child run.
        status: Final trial status (not ``running``).
        error: Error text for failed trials (first line kept).
        only_if_running: Leave a run that someone else already closed untouched (e.g. a
            trial unwinding after the driver marked it stopped).
    """
    if only_if_running and tracking.run_status(uri, run_id) != "RUNNING":
        return False
    run_tags: dict[str, str] = {tags.STATUS: status}
    if error:
        run_tags[tags.ERROR] = (error.strip().splitlines() or [""])[-1][:500]
    tracking.RunLogger(uri, run_id).set_tags(run_tags)
    tracking.end_run(uri, run_id, MLFLOW_STATUS[status])
    return True


def finish_orphaned_runs(
    ref: SearchRef,
    results: Any,
    *,
    base: ExperimentConfig,
    finalising: Collection[str] = (),
) -> int:
    """Finalise and close the runs of trials Tune ended but no finaliser closed.

    Tune saves a trial as ended while the writer may still hold its run; a
    driver killed then leaves the run RUNNING, and ``--resume`` does not rerun the trial.
    Its best reported checkpoint comes from Tune's record of its results.

    Args:
        ref: The search.
        results: Tune's results (``ResultGrid``): ``config``, ``error``,
            ``metrics_dataframe``.
        base: The search's resolved config.
        finalising: Runs the writer still holds (left alone).

    Returns:
        How many runs were finished here.
    """
    import pandas as pd

    ended = {
        spec_of(r.config).run_id: r
        for r in (results[i] for i in range(len(results)))  # a ResultGrid is indexed only
        if r.error is None and spec_of(r.config or {}).run_id
    }
    finished = 0
    for run in child_runs(ref.uri, ref.experiment_id, ref.parent_run_id):
        result = ended.get(run.info.run_id)
        if run.info.status != "RUNNING" or result is None or run.info.run_id in finalising:
            continue
        frame = result.metrics_dataframe
        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame()
        epochs = 0
        if "epoch" in frame and frame["epoch"].notna().any():
            epochs = int(frame["epoch"].max()) + 1
        trial_id = run.data.tags.get(tags.TRIAL_ID, "?")
        try:
            cfg = trial_config(base, result.config)
            finish_trial_run(
                ref.uri,
                run.info.run_id,
                base=base,
                config=result.config,
                checkpoint=_best_reported(frame, cfg.run.checkpoint_metric, ref.train_root),
                status="stopped" if epochs < cfg.optim.epochs else "completed",
                trial_id=trial_id,
            )
        except Exception:  # the search closes it as cancelled instead
            log.warning("could not finish the run of trial %s", trial_id, exc_info=True)
            continue
        finished += 1
    return finished


def _best_reported(frame: Any, metric: str, train_storage: str) -> str | None:
    """The best reported checkpoint in Tune's results table (:func:`rank_key`), or None."""
    if not {metric, CHECKPOINT_KEY, "epoch"} <= set(frame.columns):
        return None
    scored = [
        (rank_key(value, int(epoch)), str(path))
        for value, epoch, path in zip(
            frame[metric], frame["epoch"], frame[CHECKPOINT_KEY], strict=True
        )
        if isinstance(path, str) and path and epoch == epoch  # NaN epoch: not an epoch's row
    ]
    scored = [(key, path) for key, path in scored if math.isfinite(key[0])]
    if not scored:
        return None
    return storage.with_scheme_of(min(scored)[1], train_storage)


def close_open_children(
    ref: SearchRef,
    *,
    tune_runs: Collection[str] | None = None,
    finalising: Collection[str] = (),
) -> None:
    """Close the runs still RUNNING as ``cancelled``, but for those being finalised.

    With ``tune_runs`` (the run ids of every trial Tune knows), a RUNNING run outside it
    that holds no metric is deleted instead: a suggestion the searcher made, and opened a
    run for, after Tune last saved its state and before the driver died; it trained
    nothing. (One that trained was continued by the resumed search if it suggested the
    same settings again, :mod:`quakeray.search.recovery`, and is in ``tune_runs`` then;
    else it ends ``cancelled`` with what it logged.)

    Args:
        ref: The search.
        tune_runs: The run ids of every trial Tune knows (None: unknown, delete nothing).
        finalising: Runs the writer still holds (a second Ctrl-C cut the wait for
            them short): left alone.
    """
    client = tracking.mlflow_client(ref.uri)
    for run in child_runs(ref.uri, ref.experiment_id, ref.parent_run_id):
        if run.info.status != "RUNNING" or run.info.run_id in finalising:
            continue
        if tune_runs is not None and run.info.run_id not in tune_runs and not run.data.metrics:
            client.delete_run(run.info.run_id)
        else:
            close_trial_run(ref.uri, run.info.run_id, "cancelled")
