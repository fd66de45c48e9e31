"""Two-node data-parallel training on one machine: ``ray.cluster_utils.Cluster`` with two raylets.

A 2-worker ``TorchTrainer`` with ``STRICT_SPREAD`` puts one rank on each node (checked from
the placement group Ray created), talks gloo across them, ranks with ``global`` pairs (an
all-gather of predictions across nodes), checkpoints into a bucket both nodes write to (a
real S3 API, ``moto_server``), and ends with exactly the validation metrics of the same run
packed onto one node.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quakeray.config import ExperimentConfig, load_config
from tests.conftest import S3Server

pytestmark = pytest.mark.slow

VAL_KEYS = ("val_loss", "val_MAE", "val_RMSE", "val_spearman", "val_rank_acc")


@pytest.fixture(scope="module")
def two_node_cluster(s3_server: S3Server) -> Iterator[Any]:
    """Two raylets; the S3 server is up first, so both nodes' workers reach the bucket."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 128 * 1024**2},
    )
    cluster.add_node(num_cpus=1, object_store_memory=128 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def data_copy(tiny_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # prepare_data writes statistics beside the file: work on a copy of the shared fixture.
    target = tmp_path_factory.mktemp("multinode_data") / "earthquakes.h5"
    shutil.copy(tiny_h5, target)
    return target


def _cfg(data: Path, strategy: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"data.path={data}",
            "model.backbone=test_resnet",
            "loss.pairing=global",
            "optim.epochs=2",
            "optim.batch_size=8",
            "optim.lr=0.003",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",
            f"scaling.placement_strategy={strategy}",
            "scaling.max_failures=0",
        ],
    )


class _PlacementWatcher:
    """Records the nodes of every placement group Ray creates while a fit runs (GCS only)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, set[str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _PlacementWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _poll(self) -> None:
        import ray

        while not self._stop.is_set():
            for pg_id, info in ray.util.placement_group_table().items():
                nodes = {n for n in info.get("bundles_to_node_id", {}).values() if n}
                if info.get("state") == "CREATED" and nodes:
                    self.seen[pg_id] = (info.get("strategy", ""), nodes)
            time.sleep(0.2)


def _fit(cfg: ExperimentConfig, storage: Path | str, name: str) -> tuple[Any, _PlacementWatcher]:
    from quakeray.data.prepare import prepare_data
    from quakeray.train import build_trainer

    data = prepare_data(cfg)
    trainer = build_trainer(
        cfg,
        data=data,
        name=name,
        storage_path=str(storage),
        tracking_uri="",
        mlflow_run_id=None,
    )
    with _PlacementWatcher() as watcher:
        result = trainer.fit()
    assert result.error is None
    return result, watcher


def test_two_nodes_strict_spread_equals_one_node(
    two_node_cluster: Any, data_copy: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    import ray

    from quakeray import storage
    from quakeray.checkpoint import load_checkpoint

    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2
    shared = s3_server.uri("multinode")  # a bucket both nodes write to, as on a cluster

    spread, spread_pgs = _fit(_cfg(data_copy, "STRICT_SPREAD"), shared, "two-nodes")
    packed, packed_pgs = _fit(_cfg(data_copy, "STRICT_PACK"), tmp_path / "one_node", "one-node")

    # One rank per node, really: the workers' placement group spans both raylets.
    spread_nodes = [
        nodes for strategy, nodes in spread_pgs.seen.values() if strategy == "STRICT_SPREAD"
    ]
    assert spread_nodes and spread_nodes[0] == node_ids
    packed_nodes = [
        nodes for strategy, nodes in packed_pgs.seen.values() if strategy == "STRICT_PACK"
    ]
    assert packed_nodes and len(packed_nodes[0]) == 1

    # Same seeds, same global batch, same pairs: the same numbers, node layout aside.
    for key in VAL_KEYS:
        assert spread.metrics[key] == pytest.approx(packed.metrics[key], rel=1e-5, abs=1e-7), key
    assert spread.metrics["epoch"] == packed.metrics["epoch"] == 1

    # Checkpoints landed in the bucket, written by rank 0, loadable anywhere.
    run_dir = f"{shared}/two-nodes"
    checkpoint = storage.with_scheme_of(spread.checkpoint.path, shared)
    assert checkpoint.startswith(f"{run_dir}/checkpoint_epoch_")
    state = load_checkpoint(checkpoint)
    assert state["world_size"] == 2
    assert state["config"]["loss"]["pairing"] == "global"
    assert state["epoch"] == 1
    assert [n for n in storage.list_dir(run_dir) if n.startswith("checkpoint")]
