"""One family of exceptions whose messages tell the user what to do.

Every error a user can cause (bad file, bad config, bad argument) is raised as a
:class:`QuakerayError` subclass with a one-line message that says what was wrong, where,
and what to do. The CLI prints that line and exits with :data:`EXIT_USAGE`; ``--debug``
shows the traceback.
"""

__all__ = [
    "EXIT_USAGE",
    "BusyError",
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "DataError",
    "DependencyError",
    "DownloadError",
    "ModelError",
    "QuakerayError",
    "SearchError",
    "TrackingError",
]

EXIT_USAGE = 2
"""Exit code for errors caused by the input (bad config, file, argument)."""


class QuakerayError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(QuakerayError):
    """An experiment config or override is invalid."""


class DataError(QuakerayError):
    """A dataset file is missing, unreadable or does not follow the QuakeSet layout."""


class DependencyError(QuakerayError):
    """An installed library is outside the versions this quakeray was tested with."""


class DownloadError(QuakerayError):
    """The dataset could not be downloaded or failed verification."""


class ModelError(QuakerayError):
    """A backbone cannot be built (unknown name, weights not available offline)."""


class CheckpointError(QuakerayError):
    """A checkpoint is missing, unreadable or belongs to a different model."""


class TrackingError(QuakerayError):
    """The MLflow tracking store cannot be reached or used."""


class ClusterError(QuakerayError):
    """The Ray cluster cannot run the request (resources, storage, address)."""


class BusyError(QuakerayError):
    """A run folder (or another resource) is held by another live process."""


class SearchError(QuakerayError):
    """A search space, search setting or resume path is invalid."""
