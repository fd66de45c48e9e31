"""Which checkpoint stands for a run: ranked by the run's ``run.checkpoint_metric``."""

from __future__ import annotations

from pathlib import Path

import pytest

from quakeray import storage
from quakeray.checkpoint import (
    best_checkpoint,
    best_checkpoint_at,
    checkpoint_dir_name,
    find_checkpoints,
    latest_checkpoint_at,
    prune_checkpoints,
    ranking_metric,
    read_metrics,
    save_checkpoint,
)
from quakeray.config import load_config, to_dict
from tests.conftest import S3Server

# val_MAE and val_loss disagree: epoch 1 has the best MAE, epoch 2 the best loss.
EPOCHS = [
    {"epoch": 0.0, "val_MAE": 1.0, "val_loss": 3.0},
    {"epoch": 1.0, "val_MAE": 0.5, "val_loss": 2.0},
    {"epoch": 2.0, "val_MAE": 0.8, "val_loss": 1.0},
    {"epoch": 3.0, "val_MAE": 0.9, "val_loss": 4.0},
]


def _run(root: Path, checkpoint_metric: str) -> Path:
    cfg = load_config(None, [f"run.checkpoint_metric={checkpoint_metric}"])
    for metrics in EPOCHS:
        folder = root / checkpoint_dir_name(int(metrics["epoch"]))
        save_checkpoint(folder, {"config": to_dict(cfg)}, metrics=metrics)
    return root


@pytest.mark.parametrize(("metric", "best_epoch"), [("val_MAE", 1), ("val_loss", 2)])
def test_the_run_s_own_metric_picks_and_prunes(
    tmp_path: Path, metric: str, best_epoch: int
) -> None:
    run = _run(tmp_path, metric)
    assert ranking_metric(find_checkpoints(run)[-1]) == metric
    best = best_checkpoint(run, None)  # no metric named: the one the run ranked by
    assert best is not None and best.name == checkpoint_dir_name(best_epoch)
    prune_checkpoints(run, keep=1, metric=metric)
    kept = {f.name for f in find_checkpoints(run)}
    assert kept == {checkpoint_dir_name(best_epoch), checkpoint_dir_name(3)}  # best + latest


def test_a_run_in_a_bucket_is_uploaded_ranked_and_pruned_as_a_local_one(
    s3_server: S3Server, tmp_path: Path
) -> None:
    # What the loop does without a worker group (no Ray Train to persist for it).
    local = _run(tmp_path / "local", "val_MAE")
    run = s3_server.uri("prune-test/run")
    for folder in find_checkpoints(local):
        storage.upload_dir(folder, storage.join(run, folder.name))
    storage.upload_dir(find_checkpoints(local)[0], storage.join(run, checkpoint_dir_name(0)))
    assert latest_checkpoint_at(run) == storage.join(run, checkpoint_dir_name(3))
    assert best_checkpoint_at(run, "val_MAE") == storage.join(run, checkpoint_dir_name(1))
    prune_checkpoints(run, keep=1, metric="val_MAE")
    assert storage.list_dir(run) == [checkpoint_dir_name(1), checkpoint_dir_name(3)]
    assert read_metrics(storage.join(run, checkpoint_dir_name(1)))["val_MAE"] == 0.5


def test_a_local_upload_replaces_a_folder_whole(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", "val_MAE")
    target = tmp_path / "copy" / checkpoint_dir_name(0)
    storage.upload_dir(run / checkpoint_dir_name(0), str(target))
    (target / "stale.txt").write_text("from an earlier write")
    storage.upload_dir(run / checkpoint_dir_name(1), str(target))
    assert sorted(p.name for p in target.iterdir()) == sorted(
        p.name for p in (run / checkpoint_dir_name(1)).iterdir()
    )
    assert read_metrics(target)["val_MAE"] == 0.5
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging left


def test_a_checkpoint_from_before_the_setting_ranks_by_val_mae(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / checkpoint_dir_name(0), {"config": {}}, metrics={})
    assert ranking_metric(folder) == "val_MAE"
    assert best_checkpoint(tmp_path / "empty", None) is None


def test_every_part_ranks_epochs_alike_lowest_then_earliest_and_never_nan(
    tmp_path: Path,
) -> None:
    import math
    from types import SimpleNamespace

    import pandas as pd

    from quakeray.checkpoint import rank_key
    from quakeray.search.runs import _best_reported
    from quakeray.train.parts import Progress
    from quakeray.train.trainer import best_checkpoint_path

    values = [math.nan, 0.7, 0.5, 0.5, 0.9]  # epochs 2 and 3 tie: the earlier wins
    assert min(range(5), key=lambda e: rank_key(values[e], e)) == 2
    assert rank_key(None, 0) > rank_key(1e9, 9)  # a missing value never wins
    cfg = load_config(None, ["run.checkpoint_metric=val_MAE"])
    rows = []
    for epoch, value in enumerate(values):
        metrics = {"epoch": float(epoch), "val_MAE": value}
        save_checkpoint(
            tmp_path / checkpoint_dir_name(epoch), {"config": to_dict(cfg)}, metrics=metrics
        )
        rows.append(metrics | {"checkpoint_path": str(tmp_path / checkpoint_dir_name(epoch))})
    winner = str(tmp_path / checkpoint_dir_name(2))
    assert str(best_checkpoint(tmp_path, "val_MAE")) == winner  # the folder
    assert best_checkpoint_at(str(tmp_path), "val_MAE") == winner
    progress = Progress(metric="val_MAE")  # the loop's best so far
    for row in rows:
        progress.record({"epoch": row["epoch"], "val_MAE": row["val_MAE"]})
    assert progress.best_epoch == 2
    fit = SimpleNamespace(  # Ray Train's kept checkpoints, newest first
        best_checkpoints=[
            (SimpleNamespace(path=row["checkpoint_path"]), row) for row in reversed(rows)
        ]
    )
    assert best_checkpoint_path(fit, run_dir=str(tmp_path), metric="val_MAE") == winner
    assert _best_reported(pd.DataFrame(rows), "val_MAE", str(tmp_path)) == winner  # Tune's
    prune_checkpoints(tmp_path, keep=1, metric="val_MAE")
    assert [p.name for p in find_checkpoints(tmp_path)] == [
        checkpoint_dir_name(2),
        checkpoint_dir_name(4),  # the latest is always kept
    ]
