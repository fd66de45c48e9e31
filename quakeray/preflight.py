"""Driver-side checks before any worker starts: the model builds, every node reaches what it needs.

On one machine everything sees the same disk, so a local ``storage_path``, a sqlite MLflow
store and a data file in the working directory all work. On several nodes they do not, and
the failure is silent: each node writes checkpoints and MLflow rows to its own disk, and a
node without the data file fails only when its worker opens it. :func:`preflight` runs on
the driver after ``ray.init`` and before any training, and turns each of these hazards into
a one-line error that says what to do.

Two environment variables tune it (both documented in the README, "Scaling out"):

``QUAKERAY_MULTI_NODE=1``
    Treat the cluster as multi-node even when only one node is alive right now. An
    autoscaling cluster starts with the head alone; ``cluster.yaml`` sets this on every node
    so that a search submitted before the GPU workers exist is checked as what it will be.
``QUAKERAY_SHARED_PATHS=/mnt/efs:/nfs/quakeray``
    Directories (``os.pathsep``-separated) mounted at the same path on every node (NFS, EFS,
    Lustre). A local ``storage_path`` under one of them is accepted on a multi-node cluster,
    after a marker file written by the driver is seen from every alive node.

Example:
    >>> ray.init()  # doctest: +SKIP
    >>> preflight(cfg, data_path="/data/quakeset/earthquakes.h5",
    ...           tracking_uri="http://10.0.0.5:5000", storage_path="s3://bucket/quakeray")
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from quakeray import storage
from quakeray.config import ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.errors import ClusterError, DataError

__all__ = [
    "MULTI_NODE_ENV",
    "PROBE_TIMEOUT_S",
    "SHARED_PATHS_ENV",
    "NodeProbe",
    "ProbePlan",
    "alive_nodes",
    "check_model",
    "check_nodes",
    "is_local_storage",
    "is_local_tracking",
    "is_multi_node",
    "preflight",
    "raise_for_probes",
    "run_probes",
    "shared_prefixes",
]

log = logging.getLogger(__name__)

MULTI_NODE_ENV = "QUAKERAY_MULTI_NODE"
"""Set to ``1`` to check a cluster as multi-node even while only one node is alive."""

SHARED_PATHS_ENV = "QUAKERAY_SHARED_PATHS"
"""``os.pathsep``-separated directories mounted at the same path on every node."""

PROBE_TIMEOUT_S = 120.0
"""How long to wait for the per-node probes; a busy node may need to start a worker process."""

# MLflow stores that live on the disk of whichever process opens them.
_LOCAL_TRACKING_SCHEMES = {"", "file", "sqlite"}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
_STAGING_HINT = (
    "stage it on every node (cluster.yaml setup_commands run `aws s3 sync` to the same local "
    "path) or download it with `quakeray data download`"
)


@dataclass(frozen=True)
class NodeProbe:
    """What one node sees: the answers of a tiny task pinned to it.

    Attributes:
        node_id: Ray node id (hex).
        host: Host name of the node.
        data_ok: The data file exists there (True when there is no data path to check).
        stats_ok: The normalisation statistics file exists there (True when not checked).
        storage_ok: The driver's storage marker file is visible there (True when not checked).
        tracking_error: Why the tracking server is unreachable from there ("" = reachable or
            not checked).
    """

    node_id: str
    host: str
    data_ok: bool = True
    stats_ok: bool = True
    storage_ok: bool = True
    tracking_error: str = ""


@dataclass
class ProbePlan:
    """What the per-node probes must check."""

    data_path: str = ""
    stats_path: str = ""
    marker: str = ""
    health_url: str = ""


def check_model(cfg: ExperimentConfig, data: PreparedData) -> None:
    """Build the model once on the driver: a bad backbone fails here, not in N workers."""
    from quakeray.data.quakeset import QuakeSetDataset
    from quakeray.models import build_model, input_size_for

    native = cfg.data.image_size or QuakeSetDataset(data.path, "train").image_size[0]
    build_model(cfg.model, in_chans=4, img_size=input_size_for(cfg.model, native))


def preflight(
    cfg: ExperimentConfig, *, data_path: str, tracking_uri: str, storage_path: str
) -> None:
    """Refuse settings that would lose data on a multi-node cluster, before any training.

    Call it on the driver after ``ray.init`` (a no-op for the cluster rules when Ray is not
    initialised). On a single node it only checks that the data file exists. On a multi-node
    cluster (more than one alive node, ``QUAKERAY_MULTI_NODE=1``, or a Ray address on another
    machine) it also requires shared checkpoint storage and a tracking store every node
    reaches, and checks the data file, the storage and the tracking server from every alive
    node with a zero-CPU task pinned to it.

    Args:
        cfg: The resolved experiment config (``run.ray_address`` is consulted).
        data_path: The data file the workers will open; "" = generated later (not checked).
        tracking_uri: The resolved MLflow tracking URI the workers will log to.
        storage_path: ``RunConfig.storage_path``: a local directory, or s3://, gs://, ...

    Raises:
        DataError: The data file is missing on the driver's node.
        ClusterError: A local storage path or tracking store on a multi-node cluster, or a node
            that misses the data file, the shared storage or the tracking server.
    """
    if data_path and storage.on_local_disk(data_path) and not Path(data_path).is_file():
        raise DataError(
            f"data file {data_path} does not exist on {socket.gethostname()}; {_STAGING_HINT}, "
            "or set data.path to the staged file"
        )
    if not is_multi_node(cfg):
        return
    _check_storage_static(storage_path)
    _check_tracking_static(tracking_uri)
    check_nodes(
        data_path=data_path,
        stats_path=_stats_path(cfg, data_path),
        tracking_uri=tracking_uri,
        storage_path=storage_path,
    )


# --------------------------------------------------------------------------- classification


def is_multi_node(cfg: ExperimentConfig | None = None) -> bool:
    """Whether the connected Ray cluster spans (or will span) more than one machine.

    True when more than one node is alive, when ``QUAKERAY_MULTI_NODE`` is set to a true
    value (autoscaling clusters start with the head alone), or when the Ray address names
    another machine (a Ray Client driver does not share the cluster's disks).
    """
    if _multi_node_declared():
        return True
    import ray

    if not ray.is_initialized():
        return False
    if len(alive_nodes()) > 1:
        return True
    address = (cfg.run.ray_address if cfg is not None else "") or os.environ.get("RAY_ADDRESS", "")
    return bool(address) and not _address_is_this_machine(address)


def is_local_storage(storage_path: str) -> bool:
    """Whether ``storage_path`` is a directory on the local disk (no s3://, gs://, ... scheme)."""
    return storage.on_local_disk(storage_path)


def is_local_tracking(tracking_uri: str) -> bool:
    """Whether the MLflow store lives on the local disk (a path, ``file:`` or ``sqlite:``)."""
    return storage.scheme(tracking_uri) in _LOCAL_TRACKING_SCHEMES


def shared_prefixes() -> list[Path]:
    """The shared mount points declared in ``QUAKERAY_SHARED_PATHS`` (absolute, resolved)."""
    raw = os.environ.get(SHARED_PATHS_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


# --------------------------------------------------------------------------- static rules


def _check_storage_static(storage_path: str) -> None:
    if not is_local_storage(storage_path):
        return
    path = storage.local_path(storage_path)
    if any(path == p or p in path.parents for p in shared_prefixes()):
        return  # declared shared; the node probes verify it
    raise ClusterError(
        f"run.storage_path {storage_path!r} is a local directory on a multi-node cluster: "
        "checkpoints written on other nodes would be lost; set run.storage_path=s3://BUCKET/"
        f"PREFIX (or a shared mount listed in {SHARED_PATHS_ENV})"
    )


def _check_tracking_static(tracking_uri: str) -> None:
    if is_local_tracking(tracking_uri):
        raise ClusterError(
            f"tracking URI {tracking_uri or '(default ./mlflow.db)'!r} is a local store on a "
            "multi-node cluster: workers on other nodes would write to their own disks; "
            "set tracking.uri=http://HEAD_PRIVATE_IP:5000 (the MLflow server on the head)"
        )
    host = urlparse(tracking_uri).hostname or ""
    if _is_loopback(host) and not _nodes_share_one_host():
        raise ClusterError(
            f"tracking URI {tracking_uri!r} points at localhost, which is a different machine "
            "for workers on other nodes; use the head's private IP, e.g. "
            "tracking.uri=http://HEAD_PRIVATE_IP:5000"
        )


# --------------------------------------------------------------------------- node probes


def check_nodes(
    *, data_path: str, tracking_uri: str, storage_path: str, stats_path: str = ""
) -> None:
    """Probe every alive node except the driver's own (already checked) in parallel."""
    import ray

    if not ray.is_initialized():
        return  # nothing to probe (and no Ray to start here)
    plan = ProbePlan(stats_path=stats_path)
    if data_path and storage.on_local_disk(data_path):
        plan.data_path = str(Path(data_path).resolve())
    if urlparse(tracking_uri).scheme in {"http", "https"}:
        plan.health_url = tracking_uri.rstrip("/") + "/health"
    marker_file: Path | None = None
    if is_local_storage(storage_path):
        # Declared shared: prove it with a file only the driver wrote.
        root = storage.local_path(storage_path)
        root.mkdir(parents=True, exist_ok=True)
        marker_file = root / f".quakeray-preflight-{uuid.uuid4().hex}"
        marker_file.write_text(socket.gethostname())
        plan.marker = str(marker_file)
    try:
        probes = run_probes(plan, exclude=ray.get_runtime_context().get_node_id())
    finally:
        if marker_file is not None:
            marker_file.unlink(missing_ok=True)
    raise_for_probes(probes, plan, storage_path=storage_path, tracking_uri=tracking_uri)


def run_probes(plan: ProbePlan, *, exclude: str) -> list[NodeProbe]:
    """Run the plan's checks on every alive node but ``exclude``, with a zero-CPU task each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in alive_nodes() if n["NodeID"] != exclude]
    if not nodes or not (plan.data_path or plan.stats_path or plan.marker or plan.health_url):
        return []
    # Zero CPUs: the probe must run even on a node whose CPUs are all reserved.
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    refs = {
        n["NodeID"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(plan.data_path, plan.stats_path, plan.marker, plan.health_url)
        for n in nodes
    }
    _ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    results: list[NodeProbe] = []
    for node_id, ref in refs.items():
        if ref in pending:
            # A slow node is not a hazard; its workers fail loudly later if something is wrong.
            log.warning("preflight: node %s did not answer within %.0f s", node_id, PROBE_TIMEOUT_S)
            ray.cancel(ref, force=True)
            continue
        host, data_ok, stats_ok, storage_ok, tracking_error = ray.get(ref)
        results.append(NodeProbe(node_id, host, data_ok, stats_ok, storage_ok, tracking_error))
    return results


def _probe_node(
    data_path: str, stats_path: str, marker: str, health_url: str
) -> tuple[str, bool, bool, bool, str]:
    """Runs on one node: does it see the data, the storage marker and the tracking server?"""
    data_ok = not data_path or os.path.isfile(data_path)
    stats_ok = not stats_path or os.path.isfile(stats_path)
    storage_ok = not marker or os.path.isfile(marker)
    tracking_error = ""
    if health_url:
        import requests

        try:
            requests.get(health_url, timeout=5).raise_for_status()
        except requests.RequestException as exc:
            tracking_error = type(exc).__name__
    return socket.gethostname(), data_ok, stats_ok, storage_ok, tracking_error


def raise_for_probes(
    probes: list[NodeProbe], plan: ProbePlan, *, storage_path: str, tracking_uri: str
) -> None:
    """Turn the first failed probe into a one-line ClusterError naming the nodes and the fix."""

    def where(bad: list[NodeProbe]) -> str:
        return ", ".join(f"{p.host} ({p.node_id[:8]})" for p in bad)

    if missing := [p for p in probes if not p.data_ok]:
        raise ClusterError(
            f"data file {plan.data_path} is missing on node(s) {where(missing)}; {_STAGING_HINT}"
        )
    if unstaged := [p for p in probes if not p.stats_ok]:
        raise ClusterError(
            f"normalisation statistics {plan.stats_path} are missing on node(s) "
            f"{where(unstaged)}; stage them beside the data (quakeray data stats FILE, then "
            "upload FILE.stats.json next to the data in S3) or set data.stats_path to a file "
            "present on every node"
        )
    if blind := [p for p in probes if not p.storage_ok]:
        raise ClusterError(
            f"run.storage_path {storage_path!r} is not shared: node(s) {where(blind)} do not see "
            f"it; mount it at the same path on every node or use s3://BUCKET/PREFIX"
        )
    if cut := [p for p in probes if p.tracking_error]:
        raise ClusterError(
            f"MLflow server {tracking_uri} is unreachable from node(s) {where(cut)} "
            f"({cut[0].tracking_error}); bind it to the head's private IP and allow the port "
            "inside the cluster's security group"
        )


# --------------------------------------------------------------------------- helpers


def _multi_node_declared() -> bool:
    return os.environ.get(MULTI_NODE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _stats_path(cfg: ExperimentConfig, data_path: str) -> str:
    """The statistics file every worker opens when normalising ("" when none)."""
    if not cfg.data.normalize:
        return ""
    if cfg.data.stats_path:
        return str(Path(cfg.data.stats_path).expanduser().resolve())
    if not data_path or not storage.on_local_disk(data_path):
        return ""
    from quakeray.data.transforms import default_stats_path

    return str(default_stats_path(Path(data_path).expanduser().resolve()))


def alive_nodes() -> list[dict[str, Any]]:
    """The Ray nodes alive now (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


def _nodes_share_one_host() -> bool:
    """All alive nodes run on the driver's machine (a simulated cluster), and no more may join."""
    if _multi_node_declared():
        return False
    import ray

    if not ray.is_initialized():
        return True
    addresses = {n.get("NodeManagerAddress") for n in alive_nodes()}
    return addresses <= {ray.util.get_node_ip_address()}  # type: ignore[no-untyped-call]


def _address_is_this_machine(address: str) -> bool:
    if address in {"auto", "local"}:
        return True
    host = urlparse(address if storage.is_remote(address) else f"ray://{address}").hostname or ""
    if _is_loopback(host):
        return True
    try:
        resolved = socket.gethostbyname(host)
    except OSError:
        return False
    import ray

    mine = {ray.util.get_node_ip_address(), socket.gethostbyname(socket.gethostname())}  # type: ignore[no-untyped-call]
    return resolved in mine or _is_loopback(resolved)


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
