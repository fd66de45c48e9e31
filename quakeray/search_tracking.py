"""MLflow runs of a search: one parent run, one child run per trial, none left RUNNING.

Ownership follows "whoever opens a run closes it":

- the driver opens and closes the **parent** run (reopened on ``--resume``);
- a trial opens its **child** run (or reopens it, found by its trial-id tag, when Tune
  restarts the trial: no duplicates) and closes it when it completes or fails;
- a trial that Tune ends from outside (stopped early by ASHA, lost with its actor)
  cannot close anything, so :class:`TrialRunCloser`, a Tune callback running in the
  driver, closes its run with the right status;
- trials cut off with the driver (Ctrl-C, an error in Tune) are closed ``cancelled`` by the
  driver once ``Tuner.fit`` returns or raises (Tune marks them TERMINATED on its way out,
  so a callback cannot tell them apart). After a killed driver their runs stay RUNNING
  until ``--resume`` restarts those trials into them.

Statuses (tag ``quakeray.status``, with the MLflow run status in brackets): ``running``,
``completed`` (FINISHED), ``stopped`` (FINISHED: a valid, shorter run), ``failed``
(FAILED), ``cancelled`` (KILLED).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from ray.tune import Callback

from quakeray import tracking

if TYPE_CHECKING:
    from mlflow.entities import Run
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

TrialStatus = Literal["running", "completed", "stopped", "failed", "cancelled"]

TAG_ROLE = "quakeray.role"  # "search" (parent) | "trial" (child)
TAG_SEARCH = "quakeray.search"  # search name
TAG_SEARCH_DIR = "quakeray.search_dir"  # folder to pass to --resume
TAG_TRIAL = "quakeray.trial_id"  # Tune trial id
TAG_STATUS = "quakeray.status"  # TrialStatus
TAG_REFERENCE = "quakeray.reference"  # mse_only | paper (reference points only)
TAG_ERROR = "quakeray.error"  # first line of a failed trial's error
TAG_CHECKPOINT = "quakeray.best_checkpoint"  # best checkpoint of a trial / the search
TAG_RESTARTS = "quakeray.restarts"  # times Tune restarted the trial

MLFLOW_STATUS: dict[TrialStatus, tracking.RunStatus] = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}


def find_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> Run | None:
    """The child run of ``trial_id`` under ``parent_run_id``, or None."""
    runs = tracking.mlflow_client(uri).search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'"
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
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    *,
    run_name: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the child run of a trial, or reopen it when Tune restarts the trial.

    Returns:
        The run id; the run is RUNNING with status tag ``running``.
    """
    existing = find_trial_run(uri, experiment_id, parent_run_id, trial_id)
    if existing is not None:
        run_id = str(existing.info.run_id)
        restarts = int(existing.data.tags.get(TAG_RESTARTS, "0")) + 1
        client = tracking.mlflow_client(uri)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, TAG_STATUS, "running")
        client.set_tag(run_id, TAG_RESTARTS, str(restarts))
        return run_id
    all_tags = {TAG_ROLE: "trial", TAG_TRIAL: trial_id, TAG_STATUS: "running", **(tags or {})}
    return tracking.start_run(
        uri, experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=all_tags
    )


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
    client = tracking.mlflow_client(uri)
    if only_if_running and client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, TAG_STATUS, status)
    if error:
        first = (error.strip().splitlines() or [""])[-1][:500]
        client.set_tag(run_id, TAG_ERROR, first)
    tracking.end_run(uri, run_id, MLFLOW_STATUS[status])
    return True


class TrialRunCloser(Callback):  # type: ignore[misc]
    """Tune callback (driver side) that closes child runs of trials ended from outside.

    Picklable (plain strings and sets only): Tune stores it with the experiment, and
    ``Tuner.restore`` brings it back for a resumed search.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._stopped: set[str] = set()

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        """Remember trials whose last result was cut short by the scheduler.

        Tune marks the result on which the scheduler decided STOP with ``done``; a
        trial that ran to its end finishes with a separate, silent result instead.
        """
        if result.get("done"):
            self._stopped.add(trial.trial_id)

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """Stopped early: FINISHED + ``stopped``; completed: make sure it is closed."""
        status: TrialStatus = "stopped" if trial.trial_id in self._stopped else "completed"
        self._close(trial, status)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """FAILED + ``failed``, with a run created for the record if the trial had none."""
        error = _trial_error(trial)
        self._close(trial, "failed", error=error, create=True)

    def _close(
        self, trial: Trial, status: TrialStatus, *, error: str | None = None, create: bool = False
    ) -> None:
        try:
            run = find_trial_run(self.uri, self.experiment_id, self.parent_run_id, trial.trial_id)
            if run is None:
                if not create:
                    return
                run_id = open_trial_run(
                    self.uri,
                    self.experiment_id,
                    self.parent_run_id,
                    trial.trial_id,
                    run_name=f"trial-{trial.trial_id}",
                )
            else:
                run_id = str(run.info.run_id)
            close_trial_run(self.uri, run_id, status, error=error, only_if_running=True)
        except Exception:  # tracking trouble must not take the search down
            log.warning("could not close the MLflow run of trial %s", trial.trial_id, exc_info=True)


def _trial_error(trial: Trial) -> str:
    """Best-effort text of a trial's error (Tune keeps it in a file)."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as fh:
                text = fh.read().strip()
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        except OSError:
            pass
    return "trial failed (see the Tune trial folder for the traceback)"
