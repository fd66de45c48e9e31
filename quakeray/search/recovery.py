"""Resuming after a killed driver: one plan, read once, handed to whoever acts on it.

Tune saves its experiment state on a period (10 s at least) and no scheduler state at
all. A driver killed between two saves leaves:

- trials that started, and short ones that even finished, in MLflow and in the search
  folder (``train/train-<trial id>``) but not in Tune's saved state. The resumed
  searcher, restored as it was at the last save, suggests those configurations again
  (unless a persistent Optuna storage already holds them: then it suggests others);
- trials Tune saved as ended whose runs its writer had not closed yet (still RUNNING);
- an ASHA that knows nothing of the ended trials it will judge the next ones against.

On ``--resume``, :func:`plan_recovery` reads the store, the folder and Tune's saved
trials once and returns a :class:`RecoveryPlan`: the runs to continue (handed to the run
opener: when a suggestion has the same settings, :meth:`RecoveryPlan.take`, the new trial
continues that run and that Train folder, ``TrialSpec.continues``; a finished one
reports its epochs again and ends, an unfinished one trains on), the runs to finish (at
once, from Tune's record of them), and the epochs of every ended trial (handed to ASHA to
rebuild its rungs). Nothing finished runs twice, and the search keeps one MLflow run per
trial. A run offered and not taken ends ``cancelled`` with what it logged
(:func:`~quakeray.search.runs.close_open_children`).

One repair is the trial's own: a restarted trial reports the epochs its checkpoint holds
again before it trains on (:mod:`.trainable`), from its own folder, so that a trial Tune
restarts without a driver restart does so too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from quakeray import storage, tracking
from quakeray.checkpoint import latest_checkpoint_at, read_history
from quakeray.config import ExperimentConfig
from quakeray.search.layout import SearchRef
from quakeray.search.runs import CHECKPOINT_KEY, child_runs
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
    """What a killed driver left, and what the resumed search does about it."""

    unsaved: dict[_Key, UnsavedRun] = field(default_factory=dict)
    """Runs to continue: (role label, settings) -> the run Tune never saved."""
    ended: list[Any] = field(default_factory=list)
    """Runs to finish now: Tune's results of ended trials whose runs are still RUNNING."""
    histories: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """Rungs to rebuild: trial id -> every epoch of a trial Tune saved as ended."""

    def take(self, base: ExperimentConfig, config: Mapping[str, Any]) -> UnsavedRun | None:
        """The unsaved trial with the settings of ``config``, once."""
        return self.unsaved.pop(_config_key(base, config), None)


def plan_recovery(ref: SearchRef, saved: Sequence[Any]) -> RecoveryPlan:
    """Read what the killed driver left: the store, the search folder, Tune's saved trials.

    Args:
        ref: The search.
        saved: Tune's results of the trials its saved state holds (``config``, ``error``,
            ``metrics``: the last result, ``done`` when the trial ended).
    """
    plan = RecoveryPlan()
    runs = child_runs(ref.uri, ref.experiment_id, ref.parent_run_id)
    running = {run.info.run_id for run in runs if run.info.status == "RUNNING"}
    known_run_ids = {spec_of(r.config or {}).run_id for r in saved} - {""}
    for result in saved:
        last = result.metrics or {}
        if not (last.get("done") or result.error is not None):
            continue  # unfinished: Tune runs it again, and it reports its epochs itself
        if result.error is None and spec_of(result.config or {}).run_id in running:
            plan.ended.append(result)
        history = _history(ref, last)
        if history:
            plan.histories[str(last.get("trial_id", ""))] = history
    for run in runs:
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


def _history(ref: SearchRef, last: Mapping[str, Any]) -> list[dict[str, float]]:
    """Every epoch in the history of a result's checkpoint; [] if it names none."""
    path = last.get(CHECKPOINT_KEY)
    if not path:
        return []
    folder = storage.with_scheme_of(str(path), ref.train_root)
    try:
        history = read_history(folder)
    except Exception:  # unreadable: ASHA's rungs miss this trial
        log.warning("no history in %s for ASHA's rungs", folder)
        return []
    return [{k: v for k, v in m.items() if v is not None} for m in history]


def _config_key(base: ExperimentConfig, config: Mapping[str, Any]) -> _Key:
    spec = spec_of(config)
    params = trial_params(base, config)
    return spec.label, tuple(sorted((k, tracking.param_text(v)) for k, v in params.items()))


def _run_key(run_tags: Mapping[str, str], params: Mapping[str, str]) -> _Key:
    role = run_tags.get(tags.REFERENCE) or run_tags.get(tags.CONFIRM) or ""
    return role, tuple(sorted((k, v) for k, v in params.items() if k.startswith("trial.")))
