"""A search's folder and the state file in it: what ``quakeray tune --resume`` needs.

One search is one folder, ``<run.storage_path>/<name>-<time>`` (a local path or a URI:
``s3://``, ``gs://``, ``file://``), holding Tune's experiment state, the trials' Train
runs under ``train/`` and :data:`STATE_FILE`, written before the first trial. Every
access goes through :mod:`quakeray.storage`, as Ray's own does through ``pyarrow.fs``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from quakeray import storage
from quakeray.config import ExperimentConfig, from_dict
from quakeray.data.prepare import PreparedData
from quakeray.errors import SearchError

__all__ = [
    "STATE_FILE",
    "STATE_VERSION",
    "TRAIN_SUBDIR",
    "SearchState",
    "load_search_state",
    "new_search_dir",
    "train_run_dir",
    "write_state",
]

STATE_FILE = "quakeray_search.json"
"""Written into the search folder before the first trial: what ``--resume`` needs."""

STATE_VERSION = 3
"""3: the package's modules moved (Tune's pickled state names them); 2: the driver does
all of the trials' MLflow work (1: the trials did)."""

TRAIN_SUBDIR = "train"
"""Train runs of the trials live in ``<search folder>/train/train-<trial id>``."""

_REQUIRED = ("config", "tracking_uri", "experiment_id", "parent_run_id", "data_path")


@dataclass(frozen=True)
class SearchState:
    """The contents of :data:`STATE_FILE` (JSON, these keys)."""

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


def train_run_dir(search_dir: str, trial_id: str) -> str:
    """The Train run folder of a trial (``<search folder>/train/train-<trial id>``)."""
    return storage.join(search_dir, TRAIN_SUBDIR, f"train-{trial_id}")


def new_search_dir(location: str, name: str) -> str:
    """A new folder ``<location>/<name>-<time>[-n]``: a local path or a URI (s3://, ...).

    Raises:
        SearchError: The folder cannot be created there.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{name}-{stamp}"
    try:
        folder, n = storage.join(location, base), 1
        # Locally the folder is made in one step that fails when it exists: two searches
        # started in the same second get -1 and -2, never one folder between them.
        while not _made_new(folder):
            n += 1
            folder = storage.join(location, f"{base}-{n}")
    except (OSError, ValueError) as exc:  # unknown scheme, no credentials, read-only
        raise SearchError(
            f"run.storage_path {location}: cannot create the search folder ({exc}); "
            "set run.storage_path to a writable path or s3://BUCKET/PREFIX"
        ) from None
    return folder


def _made_new(folder: str) -> bool:
    """Create ``folder``; False when it already exists."""
    if storage.is_remote(folder):
        if storage.exists(folder):
            return False
        storage.makedirs(folder)
        return True
    path = storage.local_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


def write_state(search_dir: str, state: SearchState) -> None:
    """Write :data:`STATE_FILE` atomically (readers see the old or the new file)."""
    text = json.dumps(asdict(state), indent=1)
    storage.write_text_atomic(storage.join(search_dir, STATE_FILE), text)


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
