"""The Optuna study of a TPE search, kept the way Optuna's own users (and its dashboard) read it.

Ray's ``OptunaSearch`` tells Optuna every trial that ended with a metric as COMPLETE, so
a trial ASHA stopped after one epoch enters TPE as if that epoch were its final score,
and its intermediate values are keyed by Tune's ``training_iteration`` (which starts
again at 1 when ``--resume`` restarts a trial). :class:`StudySearch` keeps Optuna's own
convention instead:

- every epoch's ``search.metric`` is an intermediate value at ``step = epoch``;
- a trial the scheduler stopped ends PRUNED (Optuna then gives it its last intermediate
  value, and TPE ranks it as a pruned trial); a trial that ran to its end ends COMPLETE
  with its last result's value, as before; a failed trial (or a NaN value) ends FAIL;
- each trial carries user attributes: ``tune_trial_id``, ``mlflow_run_id``,
  ``mlflow_tracking_uri`` and ``mlflow_experiment_id``, set by
  :class:`~quakeray.search.tracker.TrialRunOpener` through
  :func:`~quakeray.search.searchers.set_trial_user_attrs` when it opens the trial's run.

How a stop is recognised: Tune hands the searcher a result in ``on_trial_result`` only
when the scheduler did not decide STOP on it, so the result a trial was stopped on
reaches the searcher first in ``on_trial_complete``; a trial that ran to its end was
already told its last result (and then once more, as Tune's closing duplicate).

Imported only where a TPE search is built: Optuna is half a second of imports that a
trial process does not need. Its state (the study, the trials, the epochs told) is
pickled with Tune's experiment like Ray's own (``save``/``restore``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from quakeray.compat import optuna_completed, optuna_study, optuna_trial

__all__ = ["StudySearch"]

log = logging.getLogger(__name__)

EPOCH_KEY = "epoch"


class StudySearch(OptunaSearch):  # type: ignore[misc]
    """Ray's ``OptunaSearch`` with pruned trials, per-epoch values and MLflow run ids."""

    def __init__(self, *, space: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(space=space, **kwargs)
        self.distributions = dict(space)  # the Optuna distributions searched
        self._last_epoch: dict[str, int] = {}  # trial id -> epoch of its last result told
        self._steps: dict[str, set[int]] = {}  # trial id -> epochs reported to Optuna

    def set_trial_user_attrs(self, trial_id: str, attrs: Mapping[str, Any]) -> None:
        """Set user attributes of the trial's Optuna trial (no-op for a trial not asked here)."""
        ot_trial = optuna_trial(self, trial_id)
        if ot_trial is None:
            return
        try:
            for key, value in attrs.items():
                ot_trial.set_user_attr(key, value)
        except Exception:  # the storage's trouble never stops a search
            log.warning("Optuna: user attributes of trial %s not stored", trial_id, exc_info=True)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """An epoch the scheduler let go on: its value, an intermediate value at its epoch."""
        if trial_id in optuna_completed(self) or EPOCH_KEY not in result:
            return  # Ray's OptunaSearch would report at training_iteration; never here
        self._last_epoch[trial_id] = int(result[EPOCH_KEY])
        self._report(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Tell Optuna how the trial ended: COMPLETE, PRUNED (stopped early) or FAIL."""
        ot_trial = optuna_trial(self, trial_id)
        if trial_id in optuna_completed(self) or ot_trial is None:
            return
        optuna_completed(self).add(trial_id)
        result = result or {}
        raw = result.get(self.metric)
        value = float(raw) if isinstance(raw, (int, float)) else None
        state, told = TrialState.COMPLETE, value
        if error or (value is not None and math.isnan(value)):
            state, told = TrialState.FAIL, None
        elif value is None:  # ended without a metric (removed while pending): as Ray does
            state = TrialState.PRUNED
        elif EPOCH_KEY in result:
            epoch = int(result[EPOCH_KEY])
            self._report(trial_id, result)  # a stopped trial's last epoch is told only here
            if self._last_epoch.get(trial_id) != epoch:
                state, told = TrialState.PRUNED, None
        try:
            optuna_study(self).tell(ot_trial, told, state=state)
        except Exception:
            log.warning("Optuna: could not tell trial %s (%s)", trial_id, state.name, exc_info=True)

    def add_evaluated_point(
        self,
        parameters: dict[str, Any],
        value: float,
        error: bool = False,
        pruned: bool = False,
        intermediate_values: list[float] | None = None,
        *,
        steps: Mapping[int, float] | None = None,
        user_attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Ray's ``add_evaluated_point``, also with values by epoch and user attributes.

        A reference point's trial (run outside Optuna, see
        :class:`~quakeray.search.searchers.ReferenceFirst`) enters the study this way.
        """
        if steps is None and user_attrs is None:
            super().add_evaluated_point(parameters, value, error, pruned, intermediate_values)
            return
        state = TrialState.FAIL if error else TrialState.PRUNED if pruned else TrialState.COMPLETE
        trial = optuna.trial.create_trial(
            state=state,
            value=None if error else value,
            params=parameters,
            distributions=self.distributions,
            intermediate_values=dict(steps or {}),
            user_attrs=dict(user_attrs or {}),
        )
        optuna_study(self).add_trial(trial)

    def _report(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """The result's metric as the intermediate value of its epoch, once per epoch."""
        raw = result.get(self.metric)
        if not isinstance(raw, (int, float)) or EPOCH_KEY not in result:
            return
        epoch = int(result[EPOCH_KEY])
        told = self._steps.setdefault(trial_id, set())
        if epoch in told or epoch < 0:
            return
        try:
            optuna_trial(self, trial_id).report(float(raw), step=epoch)
        except Exception:
            log.warning("Optuna: epoch %d of trial %s not reported", epoch, trial_id, exc_info=True)
            return
        told.add(epoch)
