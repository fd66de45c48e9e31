"""Where one search lives: its folder, what is in it, and its MLflow parent run.

One search is one folder, ``<run.storage_path>/<name>-<time>`` (a local path or a URI:
``s3://``, ``gs://``, ``file://``), holding Tune's experiment state, the state file
``--resume`` reads, the trials' Train folders and the seed check's own Tune experiment::

    <search folder>/
        quakeray_search.json      the search's config, store and data (state.py)
        train/train-<trial id>/   a trial's checkpoints, one folder per epoch
        confirm/                  the seed check (confirm.py)

:class:`SearchRef` names one search and is the one place these paths are built. Every
access goes through :mod:`quakeray.storage`, as Ray's own does through ``pyarrow.fs``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from quakeray import storage
from quakeray.errors import SearchError

__all__ = ["CONFIRM_SUBDIR", "STATE_FILE", "TRAIN_SUBDIR", "SearchRef", "new_search_dir"]

STATE_FILE = "quakeray_search.json"
"""Written into the search folder before the first trial: what ``--resume`` needs."""

TRAIN_SUBDIR = "train"
"""The trials' Train folders: ``<search folder>/train/train-<trial id>``."""

CONFIRM_SUBDIR = "confirm"
"""The seed check's Tune experiment: ``<search folder>/confirm``."""


@dataclass(frozen=True)
class SearchRef:
    """One search: its folder and its MLflow parent run. Picklable; shipped to trials."""

    folder: str  # a local path or a URI
    uri: str  # the MLflow tracking URI (absolute)
    experiment_id: str
    parent_run_id: str

    @property
    def state_file(self) -> str:
        """The state file ``quakeray tune --resume`` reads."""
        return storage.join(self.folder, STATE_FILE)

    @property
    def train_root(self) -> str:
        """The folder holding every trial's Train folder (Train's ``storage_path``)."""
        return storage.join(self.folder, TRAIN_SUBDIR)

    @property
    def confirm_folder(self) -> str:
        """The seed check's Tune experiment."""
        return storage.join(self.folder, CONFIRM_SUBDIR)

    @staticmethod
    def train_name(trial_id: str) -> str:
        """A trial's Train folder name (Train's run name: stable across restarts)."""
        return f"train-{trial_id}"

    def train_dir(self, trial_id: str) -> str:
        """A trial's Train folder: its checkpoints, one folder per epoch."""
        return storage.join(self.train_root, self.train_name(trial_id))


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
