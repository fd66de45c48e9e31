"""Two Ray Train workers on a real local Ray: learning, exact metrics, MLflow, failures.

Each ``fit`` starts a worker group (~20 s on a 2-core machine), so the module runs two:
a training run shared by the learning / exact-metrics / MLflow assertions, and a run
against a real ``mlflow server`` during which a worker process is killed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from quakeray.checkpoint import load_checkpoint, read_predictions
from quakeray.config import load_config
from quakeray.data.quakeset import QuakeSetDataset
from quakeray.data.synthetic import write_synthetic
from quakeray.evaluate import evaluate_checkpoint
from quakeray.train import TrainSummary, run_training

pytestmark = pytest.mark.slow

EPOCHS = 8


@dataclass
class DistRun:
    summary: TrainSummary
    uri: str
    data: Path


@pytest.fixture(scope="module")
def learnable_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Bigger than tiny_h5: enough samples for test_resnet to beat the mean in 8 epochs.
    # 65 events give an odd validation split (51): the 2-rank DistributedSampler pads it
    # with a duplicate, which the exact-metrics test must see removed.
    return write_synthetic(
        tmp_path_factory.mktemp("learnable") / "q.h5", events=65, size=32, seed=0
    )


def _overrides(root: Path, data: Path, uri: str, epochs: int) -> list[str]:
    return [
        f"data.path={data}",
        f"run.storage_path={root / 'ray_results'}",
        f"tracking.uri={uri}",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        f"optim.epochs={epochs}",
        "optim.batch_size=16",
        "optim.lr=1e-2",
        "loss.pairing=global",
    ]


@pytest.fixture(scope="module")
def dist_run(
    ray_local: None, learnable_h5: Path, tmp_path_factory: pytest.TempPathFactory
) -> DistRun:
    root = tmp_path_factory.mktemp("dist_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(
        None, [*_overrides(root, learnable_h5, uri, EPOCHS), "tracking.experiment=dist"]
    )
    return DistRun(run_training(cfg), uri, learnable_h5)


def test_two_workers_learn(dist_run: DistRun) -> None:
    client = MlflowClient(dist_run.uri)
    run_id = dist_run.summary.mlflow_run_id
    train_loss = [m.value for m in client.get_metric_history(run_id, "train_loss")]
    assert len(train_loss) == EPOCHS
    assert train_loss[-1] < train_loss[0]
    train = QuakeSetDataset(dist_run.data, "train")
    val = QuakeSetDataset(dist_run.data, "val")
    mean_predictor = float(np.abs(val.magnitudes - train.magnitudes.mean()).mean())
    assert dist_run.summary.best_metrics["val_MAE"] < mean_predictor


def test_metrics_are_exact_across_ranks(dist_run: DistRun) -> None:
    ckpt = dist_run.summary.best_checkpoint
    assert ckpt is not None
    state = load_checkpoint(ckpt)
    assert state["world_size"] == 2
    single = evaluate_checkpoint(ckpt, split="val")
    # Every validation sample once (no DistributedSampler padding), in dataset order.
    gathered = read_predictions(Path(ckpt) / "predictions_val.csv")
    val = QuakeSetDataset(dist_run.data, "val")
    assert len(val) % 2 == 1  # so the sampler padded one rank's shard
    assert len(gathered.prediction) == len(val)
    assert gathered.event_id == val.event_ids
    np.testing.assert_allclose(
        gathered.prediction, single.predictions.prediction, rtol=1e-5, atol=1e-5
    )
    for key in ("val_MAE", "val_RMSE", "val_spearman", "val_rank_acc", "val_detection_acc"):
        assert single.metrics[key] == pytest.approx(dist_run.summary.best_metrics[key], abs=1e-5), (
            key
        )


def test_one_finished_mlflow_run_with_one_point_per_epoch(dist_run: DistRun) -> None:
    client = MlflowClient(dist_run.uri)
    exp = client.get_experiment_by_name("dist")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [dist_run.summary.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["scaling.num_workers"] == "2"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_MAE")]
    assert steps == list(range(EPOCHS))


def _train_workers() -> list[tuple[str, int, str]]:
    """(actor id, pid, state) of every Ray Train worker this Ray has seen."""
    import ray
    from ray.util.state import list_actors

    # Name this test's cluster: other Ray instances may run on the machine.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(
        address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000
    )
    return [(a.actor_id, a.pid, a.state) for a in actors]


def test_killed_worker_is_replaced_one_run_over_http(
    ray_local: None, mlflow_server: str, learnable_h5: Path, tmp_path: Path
) -> None:
    epochs = 6
    cfg = load_config(
        None,
        [
            *_overrides(tmp_path, learnable_h5, mlflow_server, epochs),
            "tracking.experiment=killed",
            "tracking.log_model=false",
            "scaling.max_failures=1",
        ],
    )
    client = MlflowClient(mlflow_server)
    killed: list[int] = []
    workers_before = len(_train_workers())

    def kill_a_worker_mid_training() -> None:
        # Wait until epoch 2 is logged (its checkpoint is persisted), then SIGKILL a worker.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not killed:
            exp = client.get_experiment_by_name("killed")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "epoch")) >= 2:
                pids = [pid for _, pid, state in _train_workers() if state == "ALIVE"]
                if pids:
                    pid = max(pids)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.3)

    killer = threading.Thread(target=kill_a_worker_mid_training, daemon=True)
    killer.start()
    summary = run_training(cfg)
    killer.join(timeout=5)
    assert killed, "training ended before a worker could be killed"
    # The group was replaced: 2 workers started, then 2 more after the failure.
    assert len(_train_workers()) - workers_before >= 4

    exp = client.get_experiment_by_name("killed")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [summary.mlflow_run_id]  # one run, restart included
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(summary.mlflow_run_id, "epoch")]
    assert steps == list(range(epochs))  # every epoch once: no gap, no duplicate
    # Over HTTP: the run's artifacts went through the server too.
    assert {"config.yaml", "plots", "predictions"} <= {
        a.path for a in client.list_artifacts(summary.mlflow_run_id)
    }
    assert summary.best_epoch is not None


def test_ctrl_c_ends_the_run_killed(ray_local: None, learnable_h5: Path, tmp_path: Path) -> None:
    # Last in the module: it aborts a worker group. Ray's fit() installs its own SIGINT
    # handler (abort, then SystemExit): the caller must still see a KeyboardInterrupt,
    # the MLflow run must end KILLED, and the previous handler must be back.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            *_overrides(tmp_path, learnable_h5, uri, 30),
            "tracking.experiment=interrupted",
            "tracking.log_model=false",
            "run.name=interrupted",
        ],
    )
    second = tmp_path / "ray_results" / "interrupted" / "checkpoint_epoch_0001"

    done = threading.Event()

    def ctrl_c_after_two_epochs() -> None:
        while not done.is_set() and not second.exists():
            time.sleep(0.3)
        if not done.is_set():  # never signal pytest itself once training returned
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=ctrl_c_after_two_epochs, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg)
    finally:
        done.set()
    assert signal.getsignal(signal.SIGINT) is handler
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("interrupted").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
