"""Training that outlives its tracking server: epochs held back while MLflow is away.

Rank 0 logs each epoch after its checkpoint is persisted. When the tracking server does
not answer, MLflow's client retries for minutes inside ``log_batch``; a worker blocked
that long is taken for a dead one by Ray Train, which restarts the worker group and in
the end gives up on a run that had nothing wrong with it. :class:`EpochLog` asks the
server's ``/health`` first (one cheap request, 2 s at most), keeps the epochs it cannot
log, and logs them, in order, at the first epoch the server answers again. Nothing is
lost meanwhile: every checkpoint holds the whole history, and ``quakeray sync RUN_DIR``
logs what is still missing once training has ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from urllib.parse import urlparse

from quakeray.tracking.store import RunLogger, server_health

__all__ = ["EpochLog", "answers"]

log = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 2.0
# During an epoch's logging only: one retry after 1 s, 10 s per request. MLflow's own
# defaults (7 retries with exponential backoff, 120 s timeouts) are right for a driver
# that must not lose a write, and block a training worker for minutes.
_EPOCH_LOG_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def answers(uri: str) -> bool:
    """Whether the tracking store answers now (a server's ``/health``; a database: yes)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return True  # a local database is there or the run could not have started
    import requests

    try:
        return bool(server_health(uri, timeout=_PROBE_TIMEOUT_S).ok)
    except requests.RequestException:
        return False


class EpochLog:
    """One run's epoch metrics in MLflow: each epoch once, late rather than never.

    Args:
        uri: The tracking URI.
        run_id: The run the epochs belong to.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self._logger = RunLogger(uri, run_id)
        self._logged: set[int] | None = None  # epochs already in MLflow (read when it answers)
        self._pending: dict[int, dict[str, float]] = {}
        self._away = False

    def log_once(self, metrics: Mapping[str, float], *, epoch: int) -> None:
        """Log an epoch's metrics unless MLflow has them; keep them while it is away."""
        if self._logged is not None and epoch in self._logged:
            return
        self._pending[epoch] = dict(metrics)
        self.flush()

    def flush(self) -> bool:
        """Log the held-back epochs, oldest first; False while the server is away."""
        if not answers(self.uri):
            return self._went_away("no answer on /health")
        try:
            with _environ(_EPOCH_LOG_HTTP):
                self._log_pending()
        except Exception as exc:  # a server that died between the probe and the call
            return self._went_away(type(exc).__name__)
        if self._away:
            log.warning("MLflow at %s answers again; the held-back epochs are logged", self.uri)
            self._away = False
        return True

    def _log_pending(self) -> None:
        if self._logged is None:
            self._logged = self._logger.logged_steps("epoch")
        self._logger.log_epochs(list(self._pending.items()), self._logged)
        self._pending.clear()

    def _went_away(self, why: str) -> bool:
        """Say once that MLflow is away (until it answers again); False."""
        if not self._away:
            log.warning(
                "MLflow at %s does not answer (%s); training goes on, epochs %s on are kept "
                "in the checkpoints and logged when it answers",
                self.uri,
                why,
                min(self._pending, default="?"),
            )
            self._away = True
        return False


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Environment variables set for the duration of a block, then put back."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
