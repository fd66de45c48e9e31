"""Early stopping: ASHA over epochs completed, never cutting a last epoch or a reference point."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from quakeray.config import ExperimentConfig
from quakeray.search.space import REFERENCE_KEY

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["EpochASHA", "build_scheduler", "describe_scheduler", "max_epochs"]


class EpochASHA(AsyncHyperBandScheduler):  # type: ignore[misc]
    """ASHA whose time is epochs completed, and which never cuts a trial's last epoch.

    - Time is ``epoch + 1`` from the reported metrics rather than Tune's
      ``training_iteration``: a trial restarted after ``--resume`` continues its Train run
      mid-way while Tune's iteration count starts again at 1.
    - Plain ASHA answers STOP to every result at ``max_t``. For a trial on its last epoch
      that changes nothing about the search but kills the trial before it logs its model
      and closes its MLflow run, so such a result gets CONTINUE (the trial ends by itself).
    - The reference points (MSE only, the paper's point) are never stopped: they are the
      baselines every trial is compared with, which only means something at full length.
      Their results still set the rungs' cut-offs for the other trials.
    """

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        """ASHA's decision on epochs completed; never STOP at the last epoch or a reference."""
        result = _with_epoch_time(result, self._time_attr)
        at_end = result.get(self._time_attr, 0) >= self._max_t
        decision: str = super().on_trial_result(tune_controller, trial, result)
        exempt = at_end or bool((getattr(trial, "config", None) or {}).get(REFERENCE_KEY))
        return TrialScheduler.CONTINUE if exempt else decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        """Record the final result on epochs completed."""
        super().on_trial_complete(tune_controller, trial, _with_epoch_time(result, self._time_attr))


def _with_epoch_time(result: dict[str, Any], time_attr: str) -> dict[str, Any]:
    if "epoch" not in result:
        return result
    return {**result, time_attr: int(result["epoch"]) + 1}


def build_scheduler(cfg: ExperimentConfig) -> EpochASHA | None:
    """ASHA over epochs (``max_t`` = the most epochs a trial can run), or None."""
    s = cfg.search
    if not s.asha:
        return None
    max_t = max_epochs(cfg)
    return EpochASHA(
        time_attr="training_iteration",
        max_t=max_t,
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
