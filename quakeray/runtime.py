"""Ray start-up and resource checks: join a cluster when told to, else start a local one.

Two things here save hours (see ``docs/architecture.md``, field notes): a local Ray is started with
``address="local"`` (a stale ``ray_current_cluster`` file would otherwise make
``ray.init`` attach to a dead cluster) and with the dashboard (Train V2 needs its State
API to clean up placement groups of stopped trials). And a request the cluster cannot
hold is refused here with a :class:`ClusterError`, because Ray would wait for the
resources forever (no autoscaler) instead of failing.

What Ray says reaches the console only with ``--verbose`` (:func:`set_verbose`): by
default its processes' output is not forwarded to the driver (``log_to_driver``) and the
driver's ``ray`` logger shows errors only; both stay in the session's log files
(``<session>/logs``: ``worker-*.out|err`` for Ray's processes, :data:`DRIVER_LOG` for
the driver's Ray lines).
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import os
import sys

from quakeray.compat import autoscaler_max_resources
from quakeray.config import ExperimentConfig
from quakeray.errors import ClusterError

__all__ = [
    "DRIVER_LOG",
    "VERBOSE_ENV",
    "check_resources",
    "init_ray",
    "is_verbose",
    "local_num_cpus",
    "ray_address",
    "set_verbose",
]

log = logging.getLogger(__name__)

_EPS = 1e-9

DRIVER_LOG = "quakeray-driver-{pid}.log"
"""The driver's Ray log lines that the console does not show, in ``<session>/logs``."""

_RAY_LOG_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"

VERBOSE_ENV = "QUAKERAY_VERBOSE"
"""The process's console setting, in its environment: the processes it starts inherit it."""


def set_verbose(verbose: bool) -> None:
    """Show Ray's own lines on the console (``--verbose``, ``--debug``), or only its errors.

    Read when Ray is started (:func:`init_ray`): a Ray already running keeps its settings.
    Kept in the environment (:data:`VERBOSE_ENV`), a setting of the process like a log
    level, rather than in this module: nothing of quakeray's passes state through module
    globals.
    """
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def is_verbose() -> bool:
    """Whether Ray's own lines reach the console (:func:`set_verbose`)."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def ray_address(cfg: ExperimentConfig) -> str:
    """The cluster to join: ``run.ray_address``, else ``$RAY_ADDRESS``, else "" (local)."""
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")


def init_ray(
    cfg: ExperimentConfig, *, extra_cpus: float = 0.0, worker_output: bool = False
) -> None:
    """Connect to the configured Ray cluster or start a local one; no-op if connected.

    Args:
        cfg: The experiment config (``run.ray_address``, ``run.num_cpus``, ``scaling``).
        extra_cpus: CPUs needed beside the training workers (e.g. a Tune trial driver),
            used to size a local Ray when ``run.num_cpus`` is 0.
        worker_output: Forward the output of Ray's processes to this console even
            without ``--verbose`` (``quakeray train``: its epoch lines and bars come from
            rank 0). Always in their log files.

    Raises:
        ClusterError: The address cannot be reached.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = ray_address(cfg)
    verbose = is_verbose()
    forward = verbose or worker_output
    held = None if verbose else _hold_ray_lines()
    session_dir = ""
    try:
        if address:
            # Joining a running cluster: resources belong to the cluster, so no num_cpus
            # (passing it raises), and the dashboard is the head node's business.
            context = ray.init(address=address, log_to_driver=forward)
        else:
            context = ray.init(
                address="local",
                num_cpus=local_num_cpus(cfg, extra_cpus=extra_cpus),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=forward,
            )
        session_dir = str(getattr(context, "address_info", {}).get("session_dir") or "")
    except Exception as exc:  # Ray raises a plain Exception when a local start times out
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if address:
            raise ClusterError(
                f"cannot connect to the Ray cluster at {address!r}: {first}; check "
                "run.ray_address / RAY_ADDRESS or start the cluster (ray up / ray start)"
            ) from None
        raise ClusterError(
            f"the local Ray did not start: {first}; the machine may be overloaded: retry "
            "when it is quieter, or stop stale Ray processes with 'ray stop'"
        ) from None
    finally:
        if held is not None:
            _keep_ray_lines(held, session_dir)


def _hold_ray_lines() -> logging.handlers.MemoryHandler:
    """The driver's ``ray`` logger: errors only on the console; the rest held for its file.

    Lines logged while Ray starts (token authentication, "Started a local Ray instance")
    come before the session folder exists, so they are held until it does.
    """
    ray_logger = logging.getLogger("ray")
    for handler in ray_logger.handlers:
        handler.setLevel(logging.ERROR)
    held = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
    ray_logger.addHandler(held)
    return held


def _keep_ray_lines(held: logging.handlers.MemoryHandler, session_dir: str) -> None:
    """From now on the driver's Ray lines go to :data:`DRIVER_LOG`, the held ones first.

    Without a session folder here (Ray did not start, or a Ray Client connection), they
    go back to the console: nothing is lost.
    """
    ray_logger = logging.getLogger("ray")
    ray_logger.removeHandler(held)
    logs = os.path.join(session_dir, "logs") if session_dir else ""
    target: logging.Handler
    if logs and os.path.isdir(logs):
        target = logging.FileHandler(os.path.join(logs, DRIVER_LOG.format(pid=os.getpid())))
        ray_logger.addHandler(target)
    else:
        for handler in ray_logger.handlers:
            handler.setLevel(logging.NOTSET)
        target = logging.StreamHandler(sys.stderr)
    target.setFormatter(logging.Formatter(_RAY_LOG_FORMAT))
    held.setTarget(target)
    held.close()  # hands the held lines on


def local_num_cpus(cfg: ExperimentConfig, *, extra_cpus: float = 0.0, concurrent: int = 1) -> int:
    """Logical CPUs of a local Ray: ``run.num_cpus``, else what the jobs need (>= cpu count).

    Logical CPUs are a scheduling budget, not cores: asking for more than the machine
    has is fine (fractional workers share cores).
    """
    if cfg.run.num_cpus:
        return cfg.run.num_cpus
    need = concurrent * (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + extra_cpus)
    return max(os.cpu_count() or 1, math.ceil(need - _EPS))


def check_resources(cfg: ExperimentConfig, *, concurrent: int = 1, extra_cpus: float = 0.0) -> None:
    """Refuse a request the cluster can never hold, instead of waiting for it forever.

    The capacity is the larger of what the cluster has now and what its autoscaler may
    add (from the autoscaler's config when there is one). Both the total and the
    per-worker need on one node are checked.

    Args:
        cfg: The experiment config (``scaling``).
        concurrent: Runs that must fit at once (e.g. concurrent Tune trials).
        extra_cpus: CPUs each run needs beside its workers (e.g. the trial driver).

    Raises:
        ClusterError: Not enough CPUs or GPUs, naming what is needed, what exists and
            which settings to change.
    """
    import ray

    sc = cfg.scaling
    workers = sc.num_workers
    gpus_per_worker = sc.gpus_per_worker if sc.use_gpu else 0.0
    need_cpu = concurrent * (workers * sc.cpus_per_worker + extra_cpus)
    need_gpu = concurrent * workers * gpus_per_worker

    now = ray.cluster_resources()  # type: ignore[no-untyped-call]
    total = {k: float(v) for k, v in now.items()}
    max_total = autoscaler_max_resources()
    if max_total:
        for key, value in max_total.items():
            total[key] = max(total.get(key, 0.0), float(value))
    have_cpu = total.get("CPU", 0.0)
    have_gpu = total.get("GPU", 0.0)
    where = "the local Ray" if not ray_address(cfg) else "the Ray cluster"
    shape = (
        f"{concurrent} x ({workers} workers x {sc.cpus_per_worker} CPU"
        + (f" + {gpus_per_worker} GPU" if gpus_per_worker else "")
        + ")"
        + (f" + {extra_cpus} CPU per run" if extra_cpus else "")
    )
    if need_gpu > have_gpu + _EPS:
        raise ClusterError(
            f"scaling needs {need_gpu:g} GPUs ({shape}) but {where} has {have_gpu:g}; "
            "lower scaling.num_workers / scaling.gpus_per_worker or set scaling.use_gpu=false"
        )
    if need_cpu > have_cpu + _EPS:
        raise ClusterError(
            f"scaling needs {need_cpu:g} CPUs ({shape}) but {where} has {have_cpu:g}; "
            "lower scaling.num_workers / scaling.cpus_per_worker"
            + (" or raise run.num_cpus" if not ray_address(cfg) else "")
        )
    if workers and not max_total:
        # One worker's bundle must fit on a single node (placement groups do not split).
        alive = ray.nodes()  # type: ignore[no-untyped-call]
        nodes = [n.get("Resources", {}) for n in alive if n.get("Alive")]
        fits = any(
            r.get("CPU", 0.0) + _EPS >= sc.cpus_per_worker
            and r.get("GPU", 0.0) + _EPS >= gpus_per_worker
            for r in nodes
        )
        if nodes and not fits:
            raise ClusterError(
                f"no node of {where} can hold one worker ({sc.cpus_per_worker} CPU"
                f"{f', {gpus_per_worker} GPU' if gpus_per_worker else ''}); "
                "lower scaling.cpus_per_worker / scaling.gpus_per_worker"
            )
