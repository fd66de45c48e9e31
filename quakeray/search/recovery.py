"""Resuming after a killed driver: one plan, read once, handed to whoever acts on it.

Tune saves its experiment state on a period (10 s at least). A driver killed between two
saves leaves trials that started, and short ones that even finished, in MLflow and in the
search folder (``train/train-<trial id>``) but not in Tune's saved state. The resumed
search's searcher, restored as it was at the last save, suggests those configurations
again (unless a persistent Optuna storage already holds them: then it suggests others).

On ``--resume``, :func:`plan_recovery` reads the store and the folder once and returns a
:class:`RecoveryPlan`: the child runs Tune does not know and whose Train folder holds a
checkpoint. The run opener (:class:`~quakeray.search.tracker.TrialRunOpener`) is handed
the plan; when a suggestion has the same settings (:meth:`RecoveryPlan.take`), the new
trial continues that run and that Train folder (``TrialSpec.continues``): a finished one
reports its epochs again and ends, an unfinished one trains on from its last epoch.
Nothing finished runs twice, and the search keeps one MLflow run per trial. A run offered
and not taken ends ``cancelled`` with what it logged
(:func:`~quakeray.search.runs.close_open_children`).

What else a resume repairs is done where the knowledge is: a restarted trial reports the
epochs its checkpoint holds again (:mod:`.trainable`), ASHA rebuilds its rungs from ended
trials' histories (:mod:`.scheduler`), and the tracker logs each epoch once, filling gaps
from a checkpoint's history (:mod:`.tracker`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from quakeray import tracking
from quakeray.checkpoint import latest_checkpoint_at
from quakeray.config import ExperimentConfig
from quakeray.search.layout import SearchRef
from quakeray.search.runs import child_runs
from quakeray.search.space import trial_params
from quakeray.search.trial_spec import spec_of
from quakeray.tracking import tags

__all__ = ["RecoveryPlan", "UnsavedRun", "plan_recovery"]

log = logging.getLogger(__name__)

_Key = tuple[str, tuple[tuple[str, str], ...]]


class UnsavedRun(NamedTuple):
    """A trial that ran under a killed driver and that Tune never saved."""

    run_id: str  # its MLflow run
    trial_id: str  # the trial whose Train folder holds its checkpoints
    run_name: str


@dataclass
class RecoveryPlan:
    """The runs a killed driver left that the resumed search continues."""

    unsaved: dict[_Key, UnsavedRun] = field(default_factory=dict)
    """(role label, settings) -> the run with those settings."""

    def take(self, base: ExperimentConfig, config: Mapping[str, Any]) -> UnsavedRun | None:
        """The unsaved trial with the settings of ``config``, once."""
        return self.unsaved.pop(_config_key(base, config), None)


def plan_recovery(ref: SearchRef, *, known_run_ids: Collection[str]) -> RecoveryPlan:
    """Find the search's runs that Tune never saved, and that trained.

    Args:
        ref: The search.
        known_run_ids: The runs of every trial Tune's saved state holds.
    """
    plan = RecoveryPlan()
    for run in child_runs(ref.uri, ref.experiment_id, ref.parent_run_id):
        # A run continued once already trains in the folder of the trial it continued.
        trial_id = run.data.tags.get(tags.CONTINUES) or run.data.tags.get(tags.TRIAL_ID, "")
        if run.info.run_id in known_run_ids or not trial_id:
            continue
        if latest_checkpoint_at(ref.train_dir(trial_id)) is None:
            continue  # nothing trained: close_open_children deletes it at the end
        key = _run_key(run.data.tags, run.data.params)
        plan.unsaved.setdefault(key, UnsavedRun(run.info.run_id, trial_id, run.info.run_name))
    if plan.unsaved:
        log.info(
            "%d trial(s) the killed driver ran but Tune never saved: continued", len(plan.unsaved)
        )
    return plan


def _config_key(base: ExperimentConfig, config: Mapping[str, Any]) -> _Key:
    spec = spec_of(config)
    params = trial_params(base, config)
    return spec.label, tuple(sorted((k, tracking.param_text(v)) for k, v in params.items()))


def _run_key(run_tags: Mapping[str, str], params: Mapping[str, str]) -> _Key:
    role = run_tags.get(tags.REFERENCE) or run_tags.get(tags.CONFIRM) or ""
    return role, tuple(sorted((k, v) for k, v in params.items() if k.startswith("trial.")))
