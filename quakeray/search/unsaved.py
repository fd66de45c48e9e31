"""Trials a killed driver ran but Tune never saved, continued instead of run again.

Tune saves its experiment state on a period (10 s at least). A driver killed between two
saves leaves trials that started, and short ones that even finished, in MLflow and in the
search folder (``train/train-<trial id>``) but not in Tune's saved state. The resumed
search's searcher, restored as it was at the last save, suggests those configurations
again (unless a persistent Optuna storage already holds them: then it suggests others).
Before the resumed search starts (:func:`offer_unsaved_trials`), the child runs Tune does
not know and whose Train folder holds a checkpoint are offered; when a suggestion has the
same settings (:func:`take_unsaved_trial`, called by the run opener), the new trial
continues that run and that Train folder (:data:`TRAIN_KEY`): a finished one reports its
epochs again and ends, an unfinished one trains on from its last epoch. Nothing finished
runs twice, and the search keeps one MLflow run per trial. A run offered and not taken
ends ``cancelled`` with what it logged (:func:`~quakeray.search.runs.close_open_children`).

The offer is handed over in the driver's memory, keyed by the search's parent run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping
from typing import Any

from quakeray import tracking
from quakeray.checkpoint import latest_checkpoint_at
from quakeray.config import ExperimentConfig
from quakeray.search.runs import child_runs
from quakeray.search.space import CONFIRM_KEY, REFERENCE_KEY, trial_params
from quakeray.search.state import train_run_dir
from quakeray.tracking import tags

__all__ = ["TRAIN_KEY", "offer_unsaved_trials", "take_unsaved_trial", "train_name"]

log = logging.getLogger(__name__)

TRAIN_KEY = "_train_trial"
"""Key of a trial's config naming the trial whose Train folder it continues."""

_Key = tuple[str, tuple[tuple[str, str], ...]]
_offers: dict[str, dict[_Key, tuple[str, str]]] = {}  # parent run -> key -> (run, trial)
_lock = threading.Lock()


def train_name(trial_id: str, config: Mapping[str, Any]) -> str:
    """The Train folder name of a trial: its own, or the unsaved trial's it continues."""
    return f"train-{config.get(TRAIN_KEY) or trial_id}"


def offer_unsaved_trials(
    search_dir: str,
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    *,
    known_run_ids: Collection[str],
) -> int:
    """Offer the search's runs that Tune never saved, and that trained, to the resumed search.

    Returns:
        How many runs were offered.
    """
    offers: dict[_Key, tuple[str, str]] = {}
    for run in child_runs(uri, experiment_id, parent_run_id):
        # A run continued once already trains in the folder of the trial it continued.
        trial_id = run.data.tags.get(tags.CONTINUES) or run.data.tags.get(tags.TRIAL_ID, "")
        if run.info.run_id in known_run_ids or not trial_id:
            continue
        if latest_checkpoint_at(train_run_dir(search_dir, trial_id)) is None:
            continue  # nothing trained: close_open_children deletes it at the end
        key = _run_key(run.data.tags, run.data.params)
        offers.setdefault(key, (run.info.run_id, trial_id))
    with _lock:
        _offers[parent_run_id] = offers
    if offers:
        log.info("%d trial(s) the killed driver ran but Tune never saved: continued", len(offers))
    return len(offers)


def take_unsaved_trial(
    parent_run_id: str, base: ExperimentConfig, config: Mapping[str, Any]
) -> tuple[str, str] | None:
    """The (run id, trial id) of an offered unsaved trial with the settings of ``config``."""
    with _lock:
        offers = _offers.get(parent_run_id)
        if not offers:
            return None
        return offers.pop(_config_key(base, config), None)


def _config_key(base: ExperimentConfig, config: Mapping[str, Any]) -> _Key:
    role = str(config.get(REFERENCE_KEY) or config.get(CONFIRM_KEY) or "")
    params = trial_params(base, config)
    return role, tuple(sorted((k, tracking.param_text(v)) for k, v in params.items()))


def _run_key(run_tags: Mapping[str, str], params: Mapping[str, str]) -> _Key:
    role = run_tags.get(tags.REFERENCE) or run_tags.get(tags.CONFIRM) or ""
    return role, tuple(sorted((k, v) for k, v in params.items() if k.startswith("trial.")))
