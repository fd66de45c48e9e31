"""The MLflow store: where it is, whether it works, and runs, params, metrics and tags in it.

The driver resolves the tracking URI to an absolute form (Ray workers run in other
directories), checks the store is reachable *before* any training starts, creates the run
and hands its id to the workers. Rank 0 logs through :class:`RunLogger`, which never sends
NaN/Inf and can tell which epochs a run already holds, so a restarted worker group logs
into the same run without duplicate points. Whoever opens a run closes it with
:func:`end_run`.

Everything goes through :class:`mlflow.tracking.MlflowClient` with an explicit run id: no
global "active run" state, which would leak between Ray tasks sharing a process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import yaml

from quakeray import storage
from quakeray.config import ExperimentConfig, flatten, to_dict
from quakeray.errors import TrackingError
from quakeray.locks import waited_for

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

__all__ = [
    "CONFIG_ARTIFACT",
    "RunLogger",
    "RunStatus",
    "check_existing_store",
    "check_tracking",
    "context_tags",
    "end_run",
    "get_or_create_experiment",
    "log_config",
    "mlflow_client",
    "mlflow_ui_command",
    "param_text",
    "resolve_tracking_uri",
    "run_status",
    "runs_view_link",
    "server_health",
    "start_run",
]

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

CONFIG_ARTIFACT = "config.yaml"
"""Artifact name of the resolved config of a run."""

_HEALTH_TIMEOUT_S = 5.0
# MLflow's own limits (mlflow.utils.validation); repeated so importing this module stays cheap.
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
_MAX_KEY_LENGTH = 250
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(uri: str = "") -> str:
    """The tracking URI to use, in a form valid from any working directory.

    Order: ``uri`` -> ``$MLFLOW_TRACKING_URI`` -> ``sqlite:///<abs cwd>/mlflow.db``.
    Relative sqlite and file paths are made absolute against the current directory,
    because Ray workers (which log metrics) run in other directories.

    Args:
        uri: The configured URI (``tracking.uri``); "" for the default chain.

    Returns:
        An absolute tracking URI.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        if rest and not rest.startswith("/") and rest != ":memory:":
            return f"sqlite:///{Path(rest).resolve()}"
        return uri
    if uri.startswith("file:"):
        path = urlparse(uri).path
        if not path.startswith("/"):
            path = uri[len("file:") :]
        return Path(path).resolve().as_uri()
    if not storage.is_remote(uri) and not uri.startswith("databricks"):
        # A bare path: MLflow reads it as a file store; make it absolute too.
        return str(Path(uri).resolve())
    return uri


def check_tracking(uri: str) -> None:
    """Fail fast if the tracking store cannot be used; create a sqlite schema once.

    Called on the driver before any worker starts: an unreachable server must stop the
    run before it costs a worker group, and a new sqlite store must get its schema from
    one process before several processes write to it.

    Args:
        uri: An absolute tracking URI (see :func:`resolve_tracking_uri`).

    Raises:
        TrackingError: The server does not answer, or the store cannot be opened.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            response = server_health(uri)
        except requests.RequestException as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({type(exc).__name__}); "
                "start it (mlflow server ...) or set tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
        if not response.ok:
            raise TrackingError(
                f"MLflow tracking server {uri} answered HTTP {response.status_code} on /health; "
                "check the server or set tracking.uri / MLFLOW_TRACKING_URI"
            )
        return
    db = _sqlite_file(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"cannot create the folder of the MLflow store {uri}: {exc.strerror}; "
                "set tracking.uri to a writable sqlite path"
            ) from None
    file_store = scheme == "file" or (not scheme and not storage.is_remote(uri))
    if file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(
            f"tracking.uri {uri} is an MLflow file store, which MLflow 3 refuses; "
            "use sqlite:////abs/path/mlflow.db or an http:// server"
        )
    try:
        # MLflow creates a new sqlite store's schema on first use, without a lock: two
        # runs started together on a new store would both create its tables and one fail.
        schema_lock = db.parent / f".{db.name}.lock" if db is not None else None
        with waited_for(schema_lock) if schema_lock else contextlib.nullcontext():
            mlflow_client(uri).search_experiments(max_results=1)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"MLflow store {uri} cannot be used: {first[:200]}; fix tracking.uri"
        ) from None


def server_health(uri: str, *, timeout: float = _HEALTH_TIMEOUT_S) -> Any:
    """The answer of an MLflow server's ``/health`` (a ``requests.Response``).

    Raises:
        requests.RequestException: No answer within ``timeout`` seconds.
    """
    import requests

    return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)


def check_existing_store(uri: str, hint: str) -> None:
    """:func:`check_tracking` for commands that only read: a missing sqlite store is an error.

    Reading must not create an empty store in the working directory (and then report that
    it holds nothing).

    Args:
        uri: An absolute tracking URI (see :func:`resolve_tracking_uri`).
        hint: What the user should do instead, ending the one-line error.

    Raises:
        TrackingError: The sqlite file does not exist, or the store cannot be used.
    """
    db = _sqlite_file(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {uri}; {hint}")
    check_tracking(uri)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores and in-memory."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :]
    return Path(db) if db and db != ":memory:" else None


def get_or_create_experiment(uri: str, name: str) -> str:
    """Id of the experiment ``name``, created if missing (restored if deleted).

    For a sqlite store the artifacts go beside the database (``<db dir>/mlartifacts``),
    so a run's files stay with its store whatever the working directory was.

    Raises:
        TrackingError: The store refused to create it.
    """
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)
    location = None
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception as exc:
        # Two drivers may race to create it: the loser reads the winner's.
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        raise TrackingError(f"cannot create MLflow experiment {name!r} in {uri}: {exc}") from None


def start_run(
    uri: str,
    experiment_id: str,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create a RUNNING run and return its id (nested under ``parent_run_id`` if given).

    The run gets MLflow's context tags (user, source, git commit) as ``mlflow.start_run``
    would set them: ``MlflowClient.create_run`` alone sets none.
    """
    merged = {**context_tags(), **(tags or {})}
    all_tags = {k: _clip(str(v), _MAX_TAG_VAL_LENGTH) for k, v in merged.items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client(uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
    return str(run.info.run_id)


@functools.cache
def context_tags() -> dict[str, str]:
    """MLflow's context tags for runs of this process: ``mlflow.user``, ``mlflow.source.*``.

    From MLflow's own resolvers (what ``mlflow.start_run`` uses); when the entry point is
    not in a git checkout (an installed ``quakeray`` script), the commit, branch and
    remote of the quakeray sources are used, if those are one. Computed once per process.
    """
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils

    found = {k: str(v) for k, v in resolve_tags({}).items()}
    if "mlflow.source.git.commit" not in found:
        sources = str(Path(__file__).resolve().parents[1])
        for key, get in (
            ("mlflow.source.git.commit", git_utils.get_git_commit),
            ("mlflow.source.git.branch", git_utils.get_git_branch),
            ("mlflow.source.git.repoURL", git_utils.get_git_repo_url),
        ):
            value = get(sources)
            if value:
                found[key] = str(value)
    return found


def log_config(
    uri: str, run_id: str, cfg: ExperimentConfig, *, params: Mapping[str, Any] | None = None
) -> None:
    """Log the flattened config as params and the resolved YAML as an artifact.

    Params are ``section.field`` (``loss.margin``), values clipped to MLflow's length
    limit. Logging the same config twice is harmless (identical values are accepted).

    Args:
        uri: Tracking URI.
        run_id: The run.
        cfg: The run's whole config (the YAML artifact).
        params: The params to log instead of all of ``flatten(cfg)`` (a search's runs
            split them: what every trial shares on the parent, the rest on each trial).
    """
    logger = RunLogger(uri, run_id)
    logger.log_params(flatten(cfg) if params is None else params)
    logger.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), CONFIG_ARTIFACT)


def end_run(uri: str, run_id: str, status: RunStatus) -> None:
    """Mark a run terminated with ``status`` (FINISHED, FAILED or KILLED)."""
    mlflow_client(uri).set_terminated(run_id, status=status)


def run_status(uri: str, run_id: str) -> str:
    """Current status of a run (RUNNING, FINISHED, FAILED, KILLED, SCHEDULED)."""
    return str(mlflow_client(uri).get_run(run_id).info.status)


class RunLogger:
    """A thin wrapper over :class:`MlflowClient` bound to one run.

    Used by rank 0 inside workers and by drivers. Metrics with NaN/Inf values are
    dropped (MLflow stores them, but they break charts and comparisons).
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = mlflow_client(uri)

    def log_metrics(
        self,
        metrics: Mapping[str, float | None],
        step: int,
        *,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Log finite numeric metrics at ``step``, and ``tags`` with them (one batch call)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key[:_MAX_KEY_LENGTH], float(value), now, int(step))
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(float(value))
        ]
        run_tags = _run_tags(tags or {})
        for start in range(0, max(len(batch), 1), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(
                self.run_id,
                metrics=batch[start : start + _MAX_METRICS_PER_BATCH],
                tags=run_tags if start == 0 else [],
            )

    def log_epochs(
        self,
        epochs: Iterable[tuple[int, Mapping[str, Any]]],
        logged: set[int],
        *,
        keys: Collection[str] | None = None,
    ) -> list[int]:
        """Each epoch once: log those not in ``logged`` (oldest first) and add them to it.

        The one routine that fills a run's epochs: a search's writer (an epoch, and a gap
        before it from a checkpoint's history), rank 0 after a tracking outage, and
        ``quakeray sync``. Values that are None (a non-finite value in ``history.json``)
        or non-finite are left out; ``keys`` keeps only those metrics.

        Returns:
            The epochs logged now.
        """
        now = []
        for epoch, metrics in sorted(epochs, key=lambda item: item[0]):
            if epoch in logged:
                continue
            kept = {k: v for k, v in metrics.items() if keys is None or k in keys}
            self.log_metrics(kept, step=epoch)  # drops None and non-finite values
            logged.add(epoch)
            now.append(epoch)
        return now

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which ``key`` was already logged (to skip them after a restart)."""
        return {int(m.step) for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified and clipped), in one batch call."""
        if tags:
            self.client.log_batch(self.run_id, tags=_run_tags(tags))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log extra params (values stringified and clipped)."""
        from mlflow.entities import Param

        items = [Param(k[:_MAX_KEY_LENGTH], param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact (e.g. ``plots/scatter.png``)."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file or folder into the run's artifacts."""
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Upload the files of a local folder into the run's artifacts (``artifact_path``)."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save text as an artifact."""
        self.client.log_text(self.run_id, text, artifact_file)


def _run_tags(tags: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, _clip(str(v), _MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]


def mlflow_ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def runs_view_link(uri: str, experiment_id: str) -> str:
    """The URL of an experiment's runs table (not MLflow 3's GenAI "Overview" page).

    For a local store: the address ``mlflow ui`` serves by default.
    """
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


@functools.lru_cache(maxsize=16)
def mlflow_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` bound to ``uri`` (mlflow imported on first use), one per URI.

    Built once: a search asks for one per MLflow call, dozens per trial, and each new
    client resolves its stores again. MLflow's clients are safe to share across threads
    (the finaliser thread's and Tune's); credentials are read per request.
    """
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def param_text(value: Any) -> str:
    """A param's value as MLflow stores it from :meth:`RunLogger.log_params` (text, clipped)."""
    return _clip(_param_text(value), _MAX_PARAM_VAL_LENGTH)


def _param_text(value: Any) -> str:
    return "" if value is None else str(value)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
