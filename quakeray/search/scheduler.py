"""Early stopping: ASHA over epochs completed, never cutting a last epoch or a reference point."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from quakeray.config import ExperimentConfig
from quakeray.search.trial_spec import spec_of

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["EPOCHS_DONE", "EpochASHA", "build_scheduler", "describe_scheduler", "max_epochs"]

log = logging.getLogger(__name__)

EPOCHS_DONE = "epochs_done"
"""ASHA's time: the epochs a trial has completed (its result's ``epoch`` + 1)."""


class EpochASHA(AsyncHyperBandScheduler):  # type: ignore[misc]
    """ASHA whose time is epochs completed, and which never cuts a trial's last epoch.

    - Time is :data:`EPOCHS_DONE`, ``epoch + 1`` of the reported metrics, rather than
      Tune's ``training_iteration``: a trial restarted after ``--resume`` continues its
      Train run mid-way while Tune's iteration count starts again at 1.
    - Plain ASHA answers STOP to every result at ``max_t``. For a trial on its last epoch
      that changes nothing about the search but kills the trial before it logs its model
      and closes its MLflow run, so such a result gets CONTINUE (the trial ends by itself).
    - The reference points (MSE only, the paper's point) are never stopped: they are the
      baselines every trial is compared with, which only means something at full length.
      Their results still set the rungs' cut-offs for the other trials.
    - Tune does not save a scheduler's state with the experiment, so a resumed search
      would judge its next trials against empty rungs. The rungs are rebuilt instead
      from each ended trial's epochs, which the resumed search's
      :class:`~quakeray.search.recovery.RecoveryPlan` read from their checkpoints
      (:meth:`rebuild_rungs`); a trial that runs again reports its epochs again first,
      and ASHA judges them as it would have (:func:`quakeray.search.trainable.search_trial`).

    Args:
        max_epochs: The most epochs a trial can run (ASHA's ``max_t``).
        **asha: ``AsyncHyperBandScheduler``'s other arguments.
    """

    def __init__(self, *, max_epochs: int, **asha: Any) -> None:
        super().__init__(time_attr=EPOCHS_DONE, max_t=max_epochs, **asha)
        self.max_epochs = max_epochs
        self.histories: dict[str, list[dict[str, float]]] = {}  # of ended restored trials

    def rebuild_rungs(self, histories: dict[str, list[dict[str, float]]]) -> None:
        """Epochs of the ended trials a resumed search restores (trial id -> its epochs)."""
        self.histories = dict(histories)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        """A new trial gets its bracket; a restored, ended one puts its epochs in the rungs.

        A restored trial that runs again reports its epochs again itself, and is judged.
        """
        super().on_trial_add(tune_controller, trial)
        if trial.status == "PENDING":
            return
        for metrics in self.histories.pop(trial.trial_id, []):
            # The decision was taken when the epoch first ran; only the rung is rebuilt.
            super().on_trial_result(tune_controller, trial, _with_epoch_time(metrics))

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        """ASHA's decision on epochs completed; never STOP at the last epoch or a reference."""
        result = _with_epoch_time(result)
        at_end = result.get(EPOCHS_DONE, 0) >= self.max_epochs
        decision: str = super().on_trial_result(tune_controller, trial, result)
        exempt = at_end or spec_of(trial.config).role == "reference"
        return TrialScheduler.CONTINUE if exempt else decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        """Record the final result on epochs completed."""
        super().on_trial_complete(tune_controller, trial, _with_epoch_time(result))


def _with_epoch_time(result: dict[str, Any]) -> dict[str, Any]:
    if "epoch" not in result:
        return result
    return {**result, EPOCHS_DONE: int(result["epoch"]) + 1}


def build_scheduler(cfg: ExperimentConfig) -> EpochASHA | None:
    """ASHA over epochs (``max_t`` = the most epochs a trial can run), or None."""
    s = cfg.search
    if not s.asha:
        return None
    max_t = max_epochs(cfg)
    return EpochASHA(
        max_epochs=max_t,
        grace_period=min(s.grace_period, max_t),
        reduction_factor=s.reduction_factor,
    )


def describe_scheduler(cfg: ExperimentConfig) -> str:
    """One-line description of the scheduler, for the parent run's params."""
    s = cfg.search
    if not s.asha:
        return "none (every trial runs all its epochs)"
    return (
        f"ASHA(time=epochs, max_t={max_epochs(cfg)}, grace_period={s.grace_period}, "
        f"reduction_factor={s.reduction_factor}, metric={s.metric}, mode={s.mode})"
    )


def max_epochs(cfg: ExperimentConfig) -> int:
    """The most epochs a trial of this search can run (``optim.epochs`` may be searched)."""
    param = cfg.search.space.get("optim.epochs")
    if param is None:
        return cfg.optim.epochs
    if param.kind == "choice":
        return max(int(c) for c in param.choices or [cfg.optim.epochs])
    return int(param.high or cfg.optim.epochs)
