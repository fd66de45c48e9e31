"""Training in local mode (``scaling.num_workers=0``: the worker loop runs in-process).

The same loop, checkpoints, resume and MLflow logging as a Ray run, in seconds; the
distributed behaviour (DDP, exact gathered metrics, worker failure) is in
``test_train_distributed.py``. Bad input is checked through the CLI, as users meet it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from quakeray.checkpoint import (
    STATE_FILE,
    best_checkpoint,
    find_checkpoints,
    prune_checkpoints,
    read_history,
    read_metrics,
)
from quakeray.config import load_config
from quakeray.data.quakeset import QuakeSetDataset, collate
from quakeray.errors import CheckpointError
from quakeray.metrics import EPOCH_METRICS
from quakeray.tracking.tags import BEST_CHECKPOINT as BEST_CHECKPOINT_TAG
from quakeray.train import TrainSummary, run_training
from tests.conftest import free_port

EPOCHS = 3
REPO = Path(__file__).resolve().parents[2]


@dataclass
class LocalRun:
    summary: TrainSummary
    uri: str
    root: Path
    data: Path


def _overrides(root: Path, data: Path, uri: str) -> list[str]:
    return [
        f"data.path={data}",
        f"run.storage_path={root / 'ray_results'}",
        f"tracking.uri={uri}",
        "tracking.experiment=local-tests",
        "scaling.num_workers=0",
        f"optim.epochs={EPOCHS}",
        "optim.batch_size=8",
        "optim.lr=1e-2",
        "run.checkpoints_to_keep=3",
    ]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, tiny_h5: Path) -> LocalRun:
    root = tmp_path_factory.mktemp("local_run")
    data = root / "q.h5"
    data.write_bytes(tiny_h5.read_bytes())  # statistics are written beside the file
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(None, [*_overrides(root, data, uri), "run.name=local"])
    return LocalRun(run_training(cfg), uri, root, data)


def test_checkpoints_are_self_describing(local_run: LocalRun) -> None:
    summary = local_run.summary
    folders = find_checkpoints(summary.run_dir)
    assert [f.name for f in folders] == [f"checkpoint_epoch_{e:04d}" for e in range(EPOCHS)]
    assert summary.best_checkpoint == str(best_checkpoint(summary.run_dir, None))
    # Plain tensors and types only: loads with weights_only=True.
    state = torch.load(Path(summary.best_checkpoint) / STATE_FILE, weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "config", "stats", "best_metric"):
        assert key in state
    assert state["config"]["model"]["backbone"] == "test_resnet"
    assert state["stats"]["to_db"] is True and len(state["stats"]["mean"]) == 2
    assert state["best_metric"] == pytest.approx(summary.best_metrics["val_MAE"])
    assert (Path(summary.best_checkpoint) / "predictions_val.csv").is_file()
    # Each holds every epoch's metrics so far (a search fills missed epochs from it).
    for epoch, folder in enumerate(folders):
        history = read_history(folder)
        assert [h["epoch"] for h in history] == list(range(epoch + 1))
        assert history[-1] == read_metrics(folder)


def test_mlflow_run_has_params_metrics_artifacts_model(local_run: LocalRun) -> None:
    client = MlflowClient(local_run.uri)
    run_id = local_run.summary.mlflow_run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.margin"] == "0.02"
    assert run.data.params["optim.epochs"] == str(EPOCHS)
    assert run.data.params["scaling.num_workers"] == "0"
    for name in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert steps == list(range(EPOCHS)), name  # one point per epoch, no duplicates
    assert run.data.tags[BEST_CHECKPOINT_TAG] == local_run.summary.best_checkpoint
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "plots", "predictions"} <= top
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/val_scatter.png", "plots/val_per_bin.png"} <= plots

    # The logged model takes raw images (the transform travels with it) and predicts.
    mlflow.set_tracking_uri(local_run.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.metadata.signature is not None
    val = QuakeSetDataset(local_run.data, "val")
    batch = collate(val.__getitems__(range(4)))
    pred = np.asarray(model.predict(batch["image"].numpy()))
    assert pred.shape == (4,) and np.isfinite(pred).all()
    assert ((pred >= 0) & (pred <= 10)).all()  # clamped at inference


def test_resume_continues_at_next_epoch_with_same_schedule(local_run: LocalRun) -> None:
    first = Path(local_run.summary.run_dir) / "checkpoint_epoch_0001"
    cfg = load_config(
        None, [*_overrides(local_run.root, local_run.data, local_run.uri), "run.name=resumed"]
    )
    summary = run_training(cfg, resume=str(first))
    client = MlflowClient(local_run.uri)
    steps = [m.step for m in client.get_metric_history(summary.mlflow_run_id, "epoch")]
    assert steps == [2]  # epochs 0 and 1 came from the checkpoint
    last = find_checkpoints(summary.run_dir)[-1]
    assert [h["epoch"] for h in read_history(last)] == [0, 1, 2]  # and so does their history
    # The one-cycle schedule goes on where it stopped: same lr as the original epoch 2.
    original = {
        m.step: m.value for m in client.get_metric_history(local_run.summary.mlflow_run_id, "lr")
    }
    resumed = {m.step: m.value for m in client.get_metric_history(summary.mlflow_run_id, "lr")}
    assert resumed[2] == pytest.approx(original[2], rel=1e-9)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.tags["quakeray.resumed_from"] == str(first)
    assert run.info.status == "FINISHED"


def test_prune_keeps_top_k_and_latest(local_run: LocalRun, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(local_run.summary.run_dir, run_dir)
    folders = find_checkpoints(run_dir)
    best = best_checkpoint(run_dir, None)
    prune_checkpoints(run_dir, keep=1, metric="val_MAE")
    kept = find_checkpoints(run_dir)
    assert best in kept and folders[-1] in kept and len(kept) <= 2


def test_paper_options_run(local_run: LocalRun, caplog: pytest.LogCaptureFixture) -> None:
    # The paper's halves pairing and clamp, clipping, no normalisation, and bf16 asked on
    # a CPU (trains in fp32 with a warning instead of failing).
    cfg = load_config(
        None,
        [
            *_overrides(local_run.root, local_run.data, local_run.uri),
            "run.name=options",
            "optim.epochs=1",
            "loss.pairing=halves",
            "model.clamp_in_forward=true",
            "optim.grad_clip=1.0",
            "optim.precision=bf16",
            "data.normalize=false",
            "tracking.log_model=false",
        ],
    )
    with caplog.at_level("WARNING", logger="quakeray.train"):
        summary = run_training(cfg)
    assert "needs a GPU" in caplog.text
    assert np.isfinite(summary.best_metrics["val_MAE"])
    assert load_checkpoint_stats(summary) is None  # nothing to normalise with


def test_the_paper_protocol_keeps_the_best_val_loss_checkpoint(local_run: LocalRun) -> None:
    # experiments/paper/protocol.yaml, shrunk to this file and a CPU: every faithful
    # setting holds, and the run stands for its epoch with the lowest val_loss.
    cfg = load_config(
        REPO / "experiments" / "paper" / "protocol.yaml",
        [
            *_overrides(local_run.root, local_run.data, local_run.uri),
            "run.name=paper-protocol",
            "scaling.use_gpu=false",
            "optim.epochs=4",
            "run.checkpoints_to_keep=1",
            "tracking.log_model=false",
        ],
    )
    summary = run_training(cfg)
    history = read_history(find_checkpoints(summary.run_dir)[-1])
    by_loss = min(history, key=lambda m: m["val_loss"])
    assert summary.best_epoch == int(by_loss["epoch"])
    assert summary.best_checkpoint == str(best_checkpoint(summary.run_dir, None))
    state = torch.load(Path(summary.best_checkpoint) / STATE_FILE, weights_only=True)
    assert state["best_metric"] == pytest.approx(by_loss["val_loss"])
    # Pruned by val_loss: its best and the latest stay.
    kept = {f.name for f in find_checkpoints(summary.run_dir)}
    assert kept == {f"checkpoint_epoch_{e:04d}" for e in (int(by_loss["epoch"]), 3)}
    # The paper's raw head (no target scaling), clamp in forward, halves pairing.
    assert float(state["model"]["target_mean"]) == 0.0
    assert float(state["model"]["target_std"]) == 1.0
    saved = state["config"]
    assert saved["model"]["clamp_in_forward"] is True and saved["loss"]["pairing"] == "halves"
    assert saved["data"]["normalize"] is False and saved["run"]["checkpoint_metric"] == "val_loss"


def test_last_batch_of_one_sample_trains(local_run: LocalRun) -> None:
    # 52 training samples in batches of 17 leave one: test_resnet's BatchNorm at 1x1
    # feature maps cannot train on a batch of one, so that sample is dropped.
    assert len(QuakeSetDataset(local_run.data, "train")) % 17 == 1
    cfg = load_config(
        None,
        [
            *_overrides(local_run.root, local_run.data, local_run.uri),
            "run.name=lone",
            "optim.epochs=1",
            "optim.batch_size=17",
            "tracking.log_model=false",
        ],
    )
    summary = run_training(cfg)
    assert np.isfinite(summary.best_metrics["val_MAE"])


def load_checkpoint_stats(summary: TrainSummary) -> object:
    assert summary.best_checkpoint is not None
    return torch.load(Path(summary.best_checkpoint) / STATE_FILE, weights_only=True)["stats"]


# --------------------------------------------------------------------------- bad input


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", "quakeray", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("quakeray: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    _assert_one_line_error(
        _cli("train", "loss.margn=0.1", cwd=tmp_path), "loss.margn", "did you mean 'loss.margin'"
    )
    _assert_one_line_error(_cli("train", "optim.epochs=many", cwd=tmp_path), "optim.epochs")


def test_cli_unreachable_tracking_server(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    proc = _cli("train", "--smoke-test", f"tracking.uri={uri}", cwd=tmp_path)
    _assert_one_line_error(proc, "not reachable", uri)
    assert "epoch 1/" not in proc.stdout  # refused before any training


def test_cli_missing_checkpoint(tmp_path: Path) -> None:
    proc = _cli("train", "--smoke-test", "--resume", str(tmp_path / "nope"), cwd=tmp_path)
    _assert_one_line_error(proc, "checkpoint not found", "nope")
    proc = _cli("evaluate", str(tmp_path / "nope"), cwd=tmp_path)
    _assert_one_line_error(proc, "checkpoint not found")


def test_cli_checkpoint_of_another_backbone(local_run: LocalRun, tmp_path: Path) -> None:
    ckpt = local_run.summary.best_checkpoint
    assert ckpt is not None
    proc = _cli(
        "train",
        "--resume",
        ckpt,
        "model.backbone=test_vit",
        f"optim.epochs={EPOCHS}",
        "optim.batch_size=8",
        "scaling.num_workers=0",
        cwd=tmp_path,
    )
    _assert_one_line_error(proc, "'test_resnet'", "'test_vit'")


def test_cli_bad_data_and_batch_fail_in_seconds_before_ray(tmp_path: Path) -> None:
    # Found before Ray starts: no "Started a local Ray instance" line, one error line.
    (tmp_path / "adir").mkdir()
    proc = _cli("train", "--smoke-test", f"data.path={tmp_path / 'adir'}", cwd=tmp_path)
    _assert_one_line_error(proc, "is a directory", "the QuakeSet HDF5 file inside")
    assert "Ray instance" not in proc.stderr
    proc = _cli(
        "train", "--smoke-test", "optim.batch_size=2", "scaling.num_workers=2", cwd=tmp_path
    )
    _assert_one_line_error(proc, "batches of 1", "raise optim.batch_size")


def test_a_run_folder_is_trained_in_by_one_process_at_a_time(
    local_run: LocalRun, tmp_path: Path
) -> None:
    from quakeray.errors import BusyError
    from quakeray.locks import held

    folder = local_run.root / "ray_results" / "claimed"
    with held(folder, what="run folder", instead="wait"):
        # Another process (the CLI) is refused in one line, naming this one...
        proc = _cli(
            "train",
            *_overrides(local_run.root, local_run.data, local_run.uri),
            "run.name=claimed",
            cwd=tmp_path,
        )
        _assert_one_line_error(proc, "run folder", "is in use by pid", "run.name")
        # ...and so is a second run in this process (flock is per open file).
        cfg = load_config(
            None, [*_overrides(local_run.root, local_run.data, local_run.uri), "run.name=claimed"]
        )
        with pytest.raises(BusyError):
            run_training(cfg)
    assert not find_checkpoints(folder)  # nothing was written by either


@pytest.mark.slow
def test_two_runs_started_at_once_on_a_new_store_stay_apart(tiny_h5: Path, tmp_path: Path) -> None:
    # The same command twice at the same moment, a fresh sqlite store, one storage path:
    # both finish, each in its own folder and MLflow run (names differ by a random part).
    data = tmp_path / "q.h5"
    data.write_bytes(tiny_h5.read_bytes())
    args = [
        sys.executable,
        "-m",
        "quakeray",
        "train",
        *_overrides(tmp_path, data, f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"),
        "optim.epochs=1",
        "tracking.log_model=false",
    ]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode()[-1500:] for _, e in outs]
    folders = sorted((tmp_path / "ray_results").glob("train-test_resnet-*"))
    assert len(folders) == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("local-tests").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["quakeray.run_dir"] for r in runs} == {str(f) for f in folders}
    for folder in folders:
        assert len(find_checkpoints(folder)) == 1


@pytest.mark.slow
def test_cli_impossible_scaling(tmp_path: Path) -> None:
    # No GPU here: asking for GPU workers must fail at once, not wait for them forever.
    proc = _cli("train", "--smoke-test", "scaling.use_gpu=true", cwd=tmp_path)
    _assert_one_line_error(proc, "GPU", "scaling.num_workers")
    proc = _cli(
        "train",
        "--smoke-test",
        "run.num_cpus=2",
        "scaling.num_workers=8",
        "optim.batch_size=16",
        cwd=tmp_path,
    )
    _assert_one_line_error(proc, "needs 4 CPUs", "has 2")


def test_rerun_of_a_name_with_another_model_or_schedule_is_refused(local_run: LocalRun) -> None:
    # A rerun of a name resumes from its checkpoints: refused before any training.
    base = [*_overrides(local_run.root, local_run.data, local_run.uri), "run.name=local"]
    with pytest.raises(CheckpointError, match=r"'test_resnet'.*'test_vit'.*another run\.name"):
        run_training(load_config(None, [*base, "model.backbone=test_vit"]))
    with pytest.raises(CheckpointError, match=r"optim\.epochs=3.*another run\.name"):
        run_training(load_config(None, [*base, "optim.epochs=5"]))
    run = MlflowClient(local_run.uri).get_run(local_run.summary.mlflow_run_id)
    assert run.info.status == "FINISHED"  # not reopened


def test_workers_leave_mlflow_to_a_driver_that_logs(
    local_run: LocalRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A search's driver logs what Tune receives, so its trainers run with log_metrics off:
    # nothing is logged from the loop, yet checkpoints still name their run (for
    # `quakeray evaluate`). The controller's poll interval comes from the config.
    from quakeray import tracking
    from quakeray.checkpoint import load_checkpoint
    from quakeray.data.prepare import prepare_data
    from quakeray.train import build_trainer

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)  # restored after
    cfg = load_config(
        None,
        [
            *_overrides(local_run.root, local_run.data, local_run.uri),
            "optim.epochs=1",
            "scaling.poll_interval_s=0.25",
        ],
    )
    experiment = tracking.get_or_create_experiment(local_run.uri, "local-tests")
    run_id = tracking.start_run(local_run.uri, experiment, run_name="driver-logs")
    trainer = build_trainer(
        cfg,
        data=prepare_data(cfg),
        name="driver-logs",
        storage_path=str(local_run.root / "ray_results"),
        tracking_uri=local_run.uri,
        mlflow_run_id=run_id,
        log_metrics=False,
    )
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25"
    trainer.fit()
    assert MlflowClient(local_run.uri).get_run(run_id).data.metrics == {}
    ckpt = best_checkpoint(local_run.root / "ray_results" / "driver-logs", None)
    assert ckpt is not None
    assert load_checkpoint(ckpt)["mlflow_run_id"] == run_id


def test_rerun_of_a_name_continues_in_the_same_mlflow_run(local_run: LocalRun) -> None:
    # Last in the module: it reopens the shared run. Same name, nothing left to train.
    cfg = load_config(
        None,
        [
            *_overrides(local_run.root, local_run.data, local_run.uri),
            "run.name=local",
            f"optim.epochs={EPOCHS}",
        ],
    )
    again = run_training(cfg)
    assert again.mlflow_run_id == local_run.summary.mlflow_run_id
    client = MlflowClient(local_run.uri)
    steps = [m.step for m in client.get_metric_history(again.mlflow_run_id, "epoch")]
    assert steps == list(range(EPOCHS))  # nothing retrained, nothing logged twice
    assert client.get_run(again.mlflow_run_id).info.status == "FINISHED"
