"""The state file of a search: what ``quakeray tune --resume`` needs to continue it.

Written into the search folder (:mod:`.layout`) before the first trial, atomically;
read back and checked by :func:`load_search_state`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from quakeray import storage
from quakeray.config import ExperimentConfig, from_dict
from quakeray.data.prepare import PreparedData
from quakeray.errors import SearchError
from quakeray.search.layout import STATE_FILE, SearchRef

__all__ = ["STATE_VERSION", "SearchState", "load_search_state", "write_state"]

STATE_VERSION = 4
"""Bumped whenever a class that Tune pickles with the search changes shape (4: a trial's
identity travels as one ``TrialSpec``, ASHA counts epochs under its own key)."""

_REQUIRED = ("config", "tracking_uri", "experiment_id", "parent_run_id", "data_path")


@dataclass(frozen=True)
class SearchState:
    """The contents of :data:`~quakeray.search.layout.STATE_FILE` (JSON, these keys)."""

    config: dict[str, Any]  # the search's resolved config (to_dict)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    data_path: str
    stats_path: str | None
    study_name: str
    version: int = STATE_VERSION

    @property
    def experiment_config(self) -> ExperimentConfig:
        """The search's config as the dataclass."""
        return from_dict(self.config, source=STATE_FILE)

    @property
    def data(self) -> PreparedData:
        """The data the search's trials train on."""
        return PreparedData(self.data_path, self.stats_path)

    def ref(self, folder: str) -> SearchRef:
        """The search this state describes, in ``folder``."""
        return SearchRef(folder, self.tracking_uri, self.experiment_id, self.parent_run_id)


def write_state(ref: SearchRef, state: SearchState) -> None:
    """Write the state file atomically (readers see the old or the new file)."""
    storage.write_text_atomic(ref.state_file, json.dumps(asdict(state), indent=1))


def load_search_state(path: str) -> tuple[str, SearchState]:
    """The search folder (absolute, or the URI as given) and its state file, checked.

    Raises:
        SearchError: The folder does not exist, holds no quakeray search, Tune's
            experiment state is missing, or another quakeray version started the search.
    """
    from ray.tune import Tuner

    folder = storage.resolve(path)
    hint = "pass the search folder printed when the search started (ray_results/<name>-<time>)"
    try:
        found = storage.is_dir(folder)
    except (OSError, ValueError) as exc:  # bad URI, unknown scheme, no credentials
        raise SearchError(f"--resume {path}: cannot open ({exc}); {hint}") from None
    if not found:
        raise SearchError(f"--resume {path}: no such folder; {hint}")
    state_file = storage.join(folder, STATE_FILE)
    if not storage.is_file(state_file) or not Tuner.can_restore(folder):
        raise SearchError(
            f"--resume {path}: holds no search ({STATE_FILE} or Tune state missing); {hint}"
        )
    try:
        raw = json.loads(storage.read_text(state_file))
    except ValueError:
        raw = None
    if not isinstance(raw, dict) or any(key not in raw for key in _REQUIRED):
        raise SearchError(f"--resume {path}: {STATE_FILE} is damaged; start a new search")
    if raw.get("version") != STATE_VERSION:
        raise SearchError(
            f"--resume {path}: the search was started by another quakeray version (state "
            f"version {raw.get('version')}, this one reads {STATE_VERSION}); resume it with "
            "that version, or start a new search"
        )
    state = SearchState(
        config=raw["config"],
        tracking_uri=raw["tracking_uri"],
        experiment_id=raw["experiment_id"],
        parent_run_id=raw["parent_run_id"],
        data_path=raw["data_path"],
        stats_path=raw.get("stats_path"),
        study_name=raw.get("study_name", ""),
    )
    return folder, state
