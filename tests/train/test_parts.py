"""What the worker loop builds before its first epoch, in this process without Ray.

Data shards and the batch transform (:func:`~quakeray.train.parts.build_data`), the model
and what steps it (:func:`~quakeray.train.parts.build_model_parts`), a checkpoint's state
loaded into them (:func:`~quakeray.train.parts.resume`), and the record of epochs
(:class:`~quakeray.train.parts.Progress`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from quakeray.checkpoint import build_state, checkpoint_dir_name, save_checkpoint
from quakeray.config import ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.data.quakeset import QuakeSetDataset
from quakeray.data.transforms import ChannelStats
from quakeray.errors import CheckpointError
from quakeray.metrics import SCORE_METRIC, ConstantBaseline
from quakeray.models import MagnitudeRegressor
from quakeray.train.epoch import epoch_metrics, gather_predictions, train_epoch
from quakeray.train.parts import (
    BATCH_LAYOUT,
    LoopData,
    ModelParts,
    Progress,
    build_data,
    build_model_parts,
    resume,
)
from tests.train.conftest import StubSession, tiny_config

CPU = torch.device("cpu")


def _parts(cfg: ExperimentConfig, prepared: PreparedData) -> tuple[LoopData, ModelParts]:
    data = build_data(cfg, prepared, rank=0, world=1, device=CPU)
    return data, build_model_parts(cfg, data, StubSession())


def _state(parts: ModelParts) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in parts.raw_model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- build_data


def test_one_rank_holds_both_splits_whole(prepared: PreparedData) -> None:
    cfg = tiny_config(prepared)
    data = build_data(cfg, prepared, rank=0, world=1, device=CPU)
    train = QuakeSetDataset(prepared.path, "train")
    val = QuakeSetDataset(prepared.path, "val")

    assert len(data.train_sampler) == len(train) == 52
    assert data.val_size == len(data.val_sampler) == len(val) == 19
    assert list(iter(data.val_sampler)) == list(range(len(val)))  # unshuffled, unpadded
    assert (data.train_loader.batch_size, data.val_loader.batch_size) == (8, 8)
    assert data.native_size == data.img_size == 32
    np.testing.assert_array_equal(data.train_targets, train.magnitudes)
    assert data.baseline == ConstantBaseline.of(train.magnitudes)
    assert prepared.stats_path is not None
    assert data.stats == ChannelStats.load(prepared.stats_path)

    # The transform turns a raw batch into the model's finite 4-channel input.
    batch = next(iter(data.val_loader))
    data.transform.eval()
    x = data.transform(batch["image"], layout=BATCH_LAYOUT)
    assert x.shape == (8, 4, 32, 32) and x.dtype == torch.float32
    assert torch.isfinite(x).all()  # the file's NaN gaps are filled


def test_the_global_batch_is_split_over_ranks_into_disjoint_shards(
    prepared: PreparedData,
) -> None:
    cfg = tiny_config(prepared, "optim.batch_size=8", "optim.eval_batch_size=5")
    ranks = [build_data(cfg, prepared, rank=r, world=2, device=CPU) for r in (0, 1)]
    assert [d.train_loader.batch_size for d in ranks] == [4, 4]  # 8 in all per step
    assert [d.val_loader.batch_size for d in ranks] == [5, 5]  # per worker, as set
    shards = [set(iter(d.train_sampler)) for d in ranks]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(52))
    # Validation: every sample on some rank (19 samples: one padded repeat).
    val = [list(iter(d.val_sampler)) for d in ranks]
    assert set(val[0]) | set(val[1]) == set(range(19)) and len(val[0]) == len(val[1]) == 10
    assert all(d.val_size == 19 for d in ranks)


@pytest.mark.parametrize(("batch", "drop_last", "steps"), [(8, False, 7), (17, True, 3)])
def test_only_a_last_batch_of_one_is_dropped(
    prepared: PreparedData, batch: int, drop_last: bool, steps: int
) -> None:
    cfg = tiny_config(prepared, f"optim.batch_size={batch}")
    data = build_data(cfg, prepared, rank=0, world=1, device=CPU)
    assert data.train_loader.drop_last is drop_last
    assert len(data.train_loader) == steps
    assert data.val_loader.drop_last is False  # every validation sample is predicted


def test_a_resized_unnormalised_input(prepared: PreparedData) -> None:
    cfg = tiny_config(prepared, "data.image_size=48", "data.normalize=false")
    data = build_data(cfg, PreparedData(prepared.path, None), rank=0, world=1, device=CPU)
    assert data.stats is None
    assert (data.native_size, data.img_size) == (32, 48)
    batch = next(iter(data.train_loader))
    assert data.transform(batch["image"], layout=BATCH_LAYOUT).shape[-2:] == (48, 48)


def test_a_train_fraction_keeps_whole_train_events_and_all_of_val(
    prepared: PreparedData,
) -> None:
    cfg = tiny_config(prepared, "data.train_fraction=0.5")
    data = build_data(cfg, prepared, rank=0, world=1, device=CPU)
    train = QuakeSetDataset(prepared.path, "train")
    kept = {train.event_ids[i] for i in iter(data.train_sampler)}
    assert 0 < len(kept) < len(set(train.event_ids))
    whole = [i for i, e in enumerate(train.event_ids) if e in kept]
    assert len(data.train_sampler) == len(whole)  # every patch of a kept event
    assert data.val_size == 19


# ---------------------------------------------------------------------- build_model_parts


def test_the_seed_decides_the_initial_weights(prepared: PreparedData) -> None:
    cfg = tiny_config(prepared)
    _, first = _parts(cfg, prepared)
    _, again = _parts(cfg, prepared)
    _, other = _parts(tiny_config(prepared, "optim.seed=7"), prepared)
    assert _same(_state(first), _state(again))
    assert not _same(_state(first), _state(other))


def test_model_parts_follow_the_config(prepared: PreparedData) -> None:
    cfg = tiny_config(
        prepared,
        "optim.epochs=3",
        "optim.grad_clip=1.5",
        "loss.pairing=global",
        "loss.margin=0.3",
        "loss.rank_weight=0.25",
    )
    data = build_data(cfg, prepared, rank=0, world=1, device=CPU)
    session = StubSession()
    parts = build_model_parts(cfg, data, session)

    assert session.prepared_models == 1  # the session places (or wraps) the model
    assert parts.model is parts.raw_model
    assert (parts.loss_fn.margin, parts.loss_fn.rank_weight) == (0.3, 0.25)
    assert parts.loss_fn.pairing == "global"
    assert parts.val_loss_fn.pairing == "all"  # the gathered split is one batch
    assert (parts.val_loss_fn.margin, parts.val_loss_fn.rank_weight) == (0.3, 0.25)
    assert parts.scheduler.total_steps == 3 * len(data.train_loader)
    assert parts.grad_clip == 1.5
    assert parts.amp_dtype is None and not parts.scaler.is_enabled()
    # The head predicts in magnitude units around the train split's mean.
    targets = data.train_targets.astype(np.float64)
    model = parts.raw_model
    assert isinstance(model, MagnitudeRegressor)
    assert float(model.target_mean) == pytest.approx(targets.mean(), rel=1e-6)
    assert float(model.target_std) == pytest.approx(targets.std(), rel=1e-6)


def test_a_wrapped_model_trains_through_its_wrapper_and_saves_the_module(
    prepared: PreparedData,
) -> None:
    class Wrapper(torch.nn.Module):  # what DDP looks like to the loop
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out: torch.Tensor = self.module(x)
            return out

    class WrappingSession(StubSession):
        def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
            return Wrapper(model)

    cfg = tiny_config(prepared)
    data = build_data(cfg, prepared, rank=0, world=1, device=CPU)
    parts = build_model_parts(cfg, data, WrappingSession())
    assert isinstance(parts.model, Wrapper) and parts.raw_model is parts.model.module
    train_epoch(parts, data, 0, distributed=False, bar=_NoBar())
    assert parts.model.calls == len(data.train_loader)
    assert "module.target_mean" not in parts.raw_model.state_dict()


def test_half_precision_on_a_cpu_trains_in_fp32_with_a_warning(
    prepared: PreparedData, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(prepared, "optim.precision=fp16")
    with caplog.at_level(logging.WARNING, logger="quakeray.train"):
        _, parts = _parts(cfg, prepared)
    assert parts.amp_dtype is None and not parts.scaler.is_enabled()
    assert "optim.precision=fp16 needs a GPU" in caplog.text


# --------------------------------------------------------------------------------- resume


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _trained_checkpoint(
    cfg: ExperimentConfig, prepared: PreparedData, folder: Path, epochs: int
) -> tuple[Path, ModelParts, Progress]:
    """``epochs`` epochs of the loop's own steps, the last one saved as the loop saves it."""
    data, parts = _parts(cfg, prepared)
    progress = Progress(metric=cfg.run.checkpoint_metric)
    for epoch in range(epochs):
        totals = train_epoch(parts, data, epoch, distributed=False, bar=_NoBar())
        predictions = gather_predictions(parts, data, distributed=False)
        progress.record(epoch_metrics(epoch, totals, predictions, parts, data))
    state = build_state(
        model=parts.raw_model,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        scaler=parts.scaler,
        epoch=epochs - 1,
        best_metric=progress.best,
        best_epoch=progress.best_epoch,
        history=progress.history,
        config=cfg,
        stats=data.stats,
        img_size=data.img_size,
        native_size=data.native_size,
        data_path=prepared.path,
        mlflow_run_id="",
        tracking_uri="",
        world_size=1,
        baseline=data.baseline,
    )
    out = folder / checkpoint_dir_name(epochs - 1)
    save_checkpoint(out, state, metrics=progress.history[-1], history=progress.history)
    return out, parts, progress


def test_nothing_to_resume_from_starts_at_epoch_zero(prepared: PreparedData) -> None:
    cfg = tiny_config(prepared)
    _, parts = _parts(cfg, prepared)
    before = _state(parts)
    progress, state, restarted = resume(parts, "", StubSession(), metric="val_loss")
    assert progress == Progress(metric="val_loss")
    assert (progress.next_epoch, progress.best, progress.history) == (0, math.inf, [])
    assert state is None and restarted is False
    assert _same(_state(parts), before)


def test_resume_from_a_checkpoint_restores_weights_schedule_and_progress(
    prepared: PreparedData, tmp_path: Path
) -> None:
    cfg = tiny_config(prepared, "optim.epochs=3")
    folder, trained, done = _trained_checkpoint(cfg, prepared, tmp_path, epochs=2)
    _, fresh = _parts(cfg, prepared)
    assert not _same(_state(fresh), _state(trained))

    progress, state, restarted = resume(fresh, str(folder), StubSession())
    assert restarted is False and state is not None and state["epoch"] == 1
    assert _same(_state(fresh), _state(trained))
    assert fresh.scheduler.last_epoch == trained.scheduler.last_epoch  # 2 epochs of steps
    assert fresh.scheduler.get_last_lr() == trained.scheduler.get_last_lr()
    # AdamW's moments go on too, not from zero.
    got, want = fresh.optimizer.state_dict()["state"], trained.optimizer.state_dict()["state"]
    assert got.keys() == want.keys() and len(got) > 0
    for key, moments in want.items():
        assert float(got[key]["step"]) == float(moments["step"]) == 14  # 2 epochs of 7 steps
        assert torch.equal(got[key]["exp_avg"], moments["exp_avg"])
        assert torch.equal(got[key]["exp_avg_sq"], moments["exp_avg_sq"])
    assert progress == done  # next epoch, best score and epoch, the history
    assert (progress.next_epoch, progress.metric) == (2, SCORE_METRIC)


def test_the_runner_s_own_checkpoint_wins_over_resume_from(
    prepared: PreparedData, tmp_path: Path
) -> None:
    # A restarted worker group continues its latest checkpoint, not the one it began from.
    cfg = tiny_config(prepared, "optim.epochs=3")
    first, _, _ = _trained_checkpoint(cfg, prepared, tmp_path / "a", epochs=1)
    latest, trained, _ = _trained_checkpoint(cfg, prepared, tmp_path / "b", epochs=2)
    _, fresh = _parts(cfg, prepared)
    progress, state, restarted = resume(fresh, str(first), StubSession(restored=str(latest)))
    assert restarted is True and state is not None
    assert progress.next_epoch == 2 and len(progress.history) == 2
    assert _same(_state(fresh), _state(trained))


def test_a_missing_checkpoint_is_refused(prepared: PreparedData, tmp_path: Path) -> None:
    _, parts = _parts(tiny_config(prepared), prepared)
    with pytest.raises(CheckpointError, match="not found"):
        resume(parts, str(tmp_path / "nope"), StubSession())


# ------------------------------------------------------------------------------- Progress


def test_progress_keeps_the_best_finite_score_and_every_epoch() -> None:
    progress = Progress()
    scores = [2.0, float("nan"), 1.0, 1.5, float("inf")]
    for epoch, score in enumerate(scores):
        progress.record({"epoch": float(epoch), SCORE_METRIC: score, "val_loss": -score})
    assert (progress.best, progress.best_epoch) == (1.0, 2)
    assert progress.next_epoch == 5
    assert [m["epoch"] for m in progress.history] == [0, 1, 2, 3, 4]


def test_progress_ranks_by_the_run_s_metric() -> None:
    progress = Progress(metric="val_loss")
    progress.record({"epoch": 0.0, "val_MAE": 1.0, "val_loss": 3.0})
    progress.record({"epoch": 1.0, "val_MAE": 2.0, "val_loss": 2.0})
    assert (progress.best, progress.best_epoch) == (2.0, 1)


def test_progress_of_only_nan_scores_has_no_best() -> None:
    progress = Progress()
    progress.record({"epoch": 0.0, SCORE_METRIC: float("nan")})
    assert (progress.best, progress.best_epoch, progress.next_epoch) == (math.inf, -1, 1)
