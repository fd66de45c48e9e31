"""Pre-flight checks on a real simulated cluster: ``ray.cluster_utils.Cluster`` with 1 or 2 nodes.

Both "nodes" run on this machine, so they share its disk and its loopback interface; the
tests say where that matters. Probes really run as Ray tasks pinned to the second node.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quakeray import preflight
from quakeray.config import ExperimentConfig, load_config
from quakeray.errors import ClusterError, DataError
from tests.conftest import free_port


class _Nodes:
    """A Cluster whose size tests set with :meth:`ensure` (order-independent tests)."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2},
        )
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.extra: list[Any] = []

    def ensure(self, count: int) -> None:
        while len(self.extra) + 1 < count:
            self.extra.append(self.cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2))
        while len(self.extra) + 1 > count:
            self.cluster.remove_node(self.extra.pop())
        self.cluster.wait_for_nodes()
        assert len(preflight.alive_nodes()) == count

    def second_node_id(self) -> str:
        import ray

        mine = ray.get_runtime_context().get_node_id()
        return next(n["NodeID"] for n in preflight.alive_nodes() if n["NodeID"] != mine)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def nodes() -> Iterator[_Nodes]:
    handle = _Nodes()
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture()
def one_node(nodes: _Nodes) -> _Nodes:
    nodes.ensure(1)
    return nodes


@pytest.fixture()
def two_nodes(nodes: _Nodes) -> _Nodes:
    nodes.ensure(2)
    return nodes


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(preflight.MULTI_NODE_ENV, raising=False)
    monkeypatch.delenv(preflight.SHARED_PATHS_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture()
def cfg() -> ExperimentConfig:
    return load_config(None, [])


@pytest.fixture()
def health_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering 200 on /health, like ``mlflow server``."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def data_file(tmp_path: Path) -> str:
    path = tmp_path / "earthquakes.h5"
    path.write_bytes(b"staged")  # preflight checks presence; the data layer checks the layout
    (tmp_path / "earthquakes.h5.stats.json").write_text("{}")
    return str(path)


# --------------------------------------------------------------------------- single node


def test_single_node_accepts_local_storage_and_sqlite(
    one_node: _Nodes, cfg: ExperimentConfig, tmp_path: Path, data_file: str
) -> None:
    assert not preflight.is_multi_node(cfg)
    preflight.preflight(
        cfg,
        data_path=data_file,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage_path=str(tmp_path / "ray_results"),
    )
    preflight.preflight(cfg, data_path="", tracking_uri="", storage_path="ray_results")


def test_single_node_missing_data_is_a_data_error(
    one_node: _Nodes, cfg: ExperimentConfig, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "earthquakes.h5"
    with pytest.raises(DataError, match=r"nowhere/earthquakes\.h5 does not exist.*s3 sync"):
        preflight.preflight(
            cfg, data_path=str(missing), tracking_uri="", storage_path=str(tmp_path)
        )


def test_remote_ray_address_counts_as_multi_node(
    one_node: _Nodes, cfg: ExperimentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ray Client driver on another machine does not share the cluster's disks.
    remote = load_config(None, ["run.ray_address=ray://203.0.113.7:10001"])
    assert preflight.is_multi_node(remote)
    local = load_config(None, ["run.ray_address=127.0.0.1:6379"])
    assert not preflight.is_multi_node(local)
    monkeypatch.setenv(preflight.MULTI_NODE_ENV, "1")  # autoscaling cluster, head alone for now
    assert preflight.is_multi_node(cfg)


def test_multi_node_env_refuses_local_storage_with_one_node(
    one_node: _Nodes, cfg: ExperimentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(preflight.MULTI_NODE_ENV, "1")
    with pytest.raises(ClusterError, match="storage_path"):
        preflight.preflight(
            cfg,
            data_path="",
            tracking_uri="http://10.0.0.5:5000",
            storage_path=str(tmp_path),
        )


# --------------------------------------------------------------------------- two nodes


def test_two_nodes_refuse_local_storage(
    two_nodes: _Nodes, cfg: ExperimentConfig, tmp_path: Path, health_server: str
) -> None:
    assert preflight.is_multi_node(cfg)
    for local in (str(tmp_path / "ray_results"), "ray_results", f"file://{tmp_path}"):
        with pytest.raises(ClusterError, match=r"storage_path .* local directory.*s3://"):
            preflight.preflight(cfg, data_path="", tracking_uri=health_server, storage_path=local)


@pytest.mark.parametrize(
    "uri",
    ["", "sqlite:////tmp/x/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "mlruns"],
)
def test_two_nodes_refuse_local_tracking(
    two_nodes: _Nodes, cfg: ExperimentConfig, uri: str
) -> None:
    with pytest.raises(ClusterError, match=r"local store on a multi-node cluster.*http://"):
        preflight.preflight(cfg, data_path="", tracking_uri=uri, storage_path="s3://bucket/runs")


def test_two_nodes_accept_s3_and_a_reachable_server(
    two_nodes: _Nodes, cfg: ExperimentConfig, data_file: str, health_server: str
) -> None:
    # Both simulated nodes are this machine, so 127.0.0.1 reaches the same server from each.
    preflight.preflight(
        cfg, data_path=data_file, tracking_uri=health_server, storage_path="s3://bucket/runs"
    )


def test_loopback_tracking_refused_when_nodes_may_be_other_machines(
    two_nodes: _Nodes, cfg: ExperimentConfig, health_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(preflight.MULTI_NODE_ENV, "1")
    with pytest.raises(ClusterError, match=r"localhost.*HEAD_PRIVATE_IP"):
        preflight.preflight(
            cfg, data_path="", tracking_uri=health_server, storage_path="s3://bucket/runs"
        )


def test_two_nodes_unreachable_server_named_with_the_node(
    two_nodes: _Nodes, cfg: ExperimentConfig
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=r"unreachable from node\(s\) .*ConnectionError"):
        preflight.preflight(cfg, data_path="", tracking_uri=dead, storage_path="s3://bucket/runs")


def test_probe_runs_on_the_other_node_and_finds_missing_data(
    two_nodes: _Nodes, tmp_path: Path, data_file: str
) -> None:
    other = two_nodes.second_node_id()
    plan = preflight.ProbePlan(data_path=data_file)
    import ray

    probes = preflight.run_probes(plan, exclude=ray.get_runtime_context().get_node_id())
    assert [p.node_id for p in probes] == [other]
    assert probes[0].data_ok
    # The driver's own check comes first in preflight; here only the other node is asked, as
    # when the driver (head) has the file and a GPU node's setup never staged it.
    missing = str(tmp_path / "unstaged.h5")
    with pytest.raises(ClusterError, match=rf"{missing} is missing on node\(s\) .*{other[:8]}"):
        preflight.check_nodes(data_path=missing, tracking_uri="", storage_path="s3://b/p")


def test_declared_shared_mount_is_verified_and_left_clean(
    two_nodes: _Nodes,
    cfg: ExperimentConfig,
    tmp_path: Path,
    health_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared = tmp_path / "nfs"
    storage = shared / "quakeray" / "ray_results"
    monkeypatch.setenv(preflight.SHARED_PATHS_ENV, f"/does/not/matter:{shared}")
    preflight.preflight(cfg, data_path="", tracking_uri=health_server, storage_path=str(storage))
    assert list(storage.iterdir()) == []  # the marker file is removed
    # A sibling directory outside the declared mount is still refused.
    with pytest.raises(ClusterError, match="QUAKERAY_SHARED_PATHS"):
        preflight.preflight(
            cfg, data_path="", tracking_uri=health_server, storage_path=str(tmp_path / "local")
        )


def test_probe_reports_a_marker_another_node_cannot_see(two_nodes: _Nodes, tmp_path: Path) -> None:
    import ray

    plan = preflight.ProbePlan(marker=str(tmp_path / "written-by-nobody"))
    probes = preflight.run_probes(plan, exclude=ray.get_runtime_context().get_node_id())
    assert probes and not probes[0].storage_ok
    with pytest.raises(ClusterError, match="is not shared"):
        preflight.raise_for_probes(probes, plan, storage_path=str(tmp_path), tracking_uri="")


def test_two_nodes_need_the_statistics_file_everywhere(
    two_nodes: _Nodes, cfg: ExperimentConfig, data_file: str, health_server: str
) -> None:
    # The driver computes missing statistics beside its copy of the data; the workers on other
    # nodes open the same path on their own disks.
    stats = Path(data_file + ".stats.json")
    stats.unlink()
    with pytest.raises(ClusterError, match=r"statistics .*stats\.json are missing on node"):
        preflight.preflight(
            cfg, data_path=data_file, tracking_uri=health_server, storage_path="s3://b/p"
        )
    unnormalised = load_config(None, ["data.normalize=false"])
    preflight.preflight(
        unnormalised, data_path=data_file, tracking_uri=health_server, storage_path="s3://b/p"
    )


# --------------------------------------------------------------------------- through the CLI


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from quakeray.cli import main

    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("quakeray: error:")]
    assert len(errors) == 1, err
    return code, errors[0]


@pytest.fixture()
def staged_h5(tiny_h5: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "staged" / "earthquakes.h5"
    target.parent.mkdir()
    shutil.copy(tiny_h5, target)
    return target


def _runs_in(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids)) if ids else 0


def test_cli_train_refuses_local_storage_on_two_nodes_before_training(
    two_nodes: _Nodes,
    staged_h5: Path,
    tmp_path: Path,
    mlflow_uri: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = _cli(
        [
            "train",
            "--smoke-test",
            f"data.path={staged_h5}",
            f"run.storage_path={tmp_path / 'ray_results'}",
            f"tracking.uri={mlflow_uri}",
        ],
        capsys,
    )
    assert code == 2
    assert err.startswith("quakeray: error: run.storage_path")
    assert "s3://" in err
    assert _runs_in(mlflow_uri) == 0  # refused before any run was opened
    assert not (tmp_path / "ray_results").exists()


def test_cli_train_refuses_local_tracking_on_two_nodes(
    two_nodes: _Nodes, staged_h5: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli(
        [
            "train",
            "--smoke-test",
            f"data.path={staged_h5}",
            "run.storage_path=s3://quakeray-test-bucket/runs",
            f"tracking.uri={mlflow_uri}",
        ],
        capsys,
    )
    assert code == 2
    assert "local store on a multi-node cluster" in err
    assert _runs_in(mlflow_uri) == 0
