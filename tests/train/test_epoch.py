"""One epoch of the worker loop, in this process at world size 1: train, gather, measure.

Real parts (:func:`~quakeray.train.parts.build_data`, ``test_resnet``) on the 32 px
file; no Ray, no process group.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from quakeray.checkpoint import Predictions
from quakeray.data.prepare import PreparedData
from quakeray.data.quakeset import QuakeSetDataset, collate
from quakeray.metrics import EPOCH_METRICS, ConstantBaseline
from quakeray.train.epoch import (
    EpochTotals,
    epoch_line,
    epoch_metrics,
    gather_predictions,
    train_epoch,
)
from quakeray.train.parts import BATCH_LAYOUT, LoopData, ModelParts, build_data, build_model_parts
from tests.train.conftest import StubSession, tiny_config


class CountingBar:
    """A progress bar that counts what it is told."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n


def _build(prepared: PreparedData, *overrides: str) -> tuple[LoopData, ModelParts]:
    cfg = tiny_config(prepared, *overrides)
    session = StubSession()
    data = build_data(cfg, prepared, rank=0, world=1, device=session.device)
    return data, build_model_parts(cfg, data, session)


def _params(parts: ModelParts) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in parts.raw_model.named_parameters()}


def _val_set(prepared: PreparedData) -> QuakeSetDataset:
    return QuakeSetDataset(prepared.path, "val", layout=BATCH_LAYOUT)


# --------------------------------------------------------------------------- train_epoch


def test_an_epoch_steps_the_model_over_every_train_sample(prepared: PreparedData) -> None:
    data, parts = _build(prepared)
    before = _params(parts)
    bar = CountingBar()
    totals = train_epoch(parts, data, 0, distributed=False, bar=bar)

    n_train = len(QuakeSetDataset(prepared.path, "train"))
    assert n_train % 8 > 1  # a short last batch, kept
    assert totals.seen == n_train == bar.n
    changed = [k for k, v in _params(parts).items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every parameter got a step
    assert all(math.isfinite(v) for v in (totals.loss, totals.mse, totals.rank))
    assert totals.loss > 0 and totals.mse > 0 and totals.seconds > 0
    # The one-cycle schedule is stepped once per batch.
    assert parts.scheduler.last_epoch == len(data.train_loader) == math.ceil(n_train / 8)


def test_a_lone_last_sample_is_not_trained_on_nor_counted(prepared: PreparedData) -> None:
    # 52 samples in batches of 17 leave one: BatchNorm cannot train on a batch of one.
    data, parts = _build(prepared, "optim.batch_size=17")
    totals = train_epoch(parts, data, 0, distributed=False, bar=CountingBar())
    assert totals.seen == 51 and len(data.train_loader) == 3
    assert math.isfinite(totals.loss)


def test_the_ranking_weight_changes_the_loss_and_zero_is_plain_mse(
    prepared: PreparedData,
) -> None:
    totals: dict[float, EpochTotals] = {}
    for weight in (0.0, 1.0):
        data, parts = _build(prepared, f"loss.rank_weight={weight}", "loss.margin=0.5")
        totals[weight] = train_epoch(parts, data, 0, distributed=False, bar=CountingBar())
    mse_only, joint = totals[0.0], totals[1.0]
    assert mse_only.loss == pytest.approx(mse_only.mse, rel=1e-9)
    assert joint.rank > 0  # some pairs within the margin: the hinge is on
    assert joint.loss == pytest.approx(joint.mse + joint.rank, rel=1e-6)
    assert joint.loss != pytest.approx(mse_only.loss, rel=1e-3)


def test_the_epoch_reshuffles_the_shard_deterministically(prepared: PreparedData) -> None:
    data, parts = _build(prepared)
    train_epoch(parts, data, 3, distributed=False, bar=CountingBar())
    assert data.train_sampler.epoch == 3
    order = list(iter(data.train_sampler))
    again, _ = _build(prepared)
    again.train_sampler.set_epoch(3)
    assert list(iter(again.train_sampler)) == order  # same seed, same epoch: same order
    again.train_sampler.set_epoch(4)
    assert list(iter(again.train_sampler)) != order


# --------------------------------------------------------------------- gather_predictions


def _direct_predictions(parts: ModelParts, data: LoopData, val: QuakeSetDataset) -> np.ndarray:
    """The model on the whole split in one batch, in dataset order."""
    parts.raw_model.eval()
    data.transform.eval()
    batch = collate(val.__getitems__(range(len(val))))
    with torch.no_grad():
        out = parts.raw_model(data.transform(batch["image"], layout=BATCH_LAYOUT))
    return np.asarray(out.reshape(-1).tolist())


def _assert_dataset_order(predictions: Predictions, val: QuakeSetDataset) -> None:
    n = len(val)
    assert list(predictions.index) == list(range(n))
    assert list(predictions.event_id) == val.event_ids
    assert list(predictions.patch) == val.patches
    assert list(predictions.label) == val.labels.tolist()
    np.testing.assert_array_equal(predictions.magnitude, val.magnitudes)
    assert len(predictions.prediction) == n


def test_one_prediction_per_validation_sample_in_dataset_order(prepared: PreparedData) -> None:
    # Validation batches of 8 over 19 samples: the last batch is short.
    data, parts = _build(prepared)
    train_epoch(parts, data, 0, distributed=False, bar=CountingBar())
    predictions = gather_predictions(parts, data, distributed=False)

    val = _val_set(prepared)
    assert data.val_size == len(val) == 19
    _assert_dataset_order(predictions, val)
    np.testing.assert_allclose(
        predictions.prediction, _direct_predictions(parts, data, val), rtol=1e-5, atol=1e-5
    )
    assert len(set(predictions.prediction)) > 1  # a trained model, not a constant


def test_a_shuffled_and_padded_shard_comes_back_once_in_dataset_order(
    prepared: PreparedData,
) -> None:
    # What DistributedSampler can hand a rank: its samples in another order, and padding
    # (repeats of samples it already holds). Each sample is written once, by its index.
    data, parts = _build(prepared)
    val = _val_set(prepared)
    n = len(val)
    order = [*reversed(range(n)), 0, 1, 2]  # reversed, then three repeats
    shard = replace(
        data,
        val_sampler=cast(Any, order),
        val_loader=DataLoader(val, batch_size=5, sampler=order, collate_fn=collate),
    )
    predictions = gather_predictions(parts, shard, distributed=False)
    _assert_dataset_order(predictions, val)
    np.testing.assert_allclose(
        predictions.prediction, _direct_predictions(parts, data, val), rtol=1e-5, atol=1e-5
    )


def test_a_shard_alone_is_refused_as_the_whole_split(prepared: PreparedData) -> None:
    # Rank 0 of 2 without a process group to gather from: half the split is missing.
    cfg = tiny_config(prepared)
    session = StubSession()
    data = build_data(cfg, prepared, rank=0, world=2, device=session.device)
    parts = build_model_parts(cfg, data, session)
    with pytest.raises(RuntimeError, match="9 validation samples were not predicted"):
        gather_predictions(parts, data, distributed=False)


# -------------------------------------------------------------------------- epoch_metrics


def test_epoch_metrics_are_the_reported_names_all_finite(prepared: PreparedData) -> None:
    data, parts = _build(prepared)
    totals = train_epoch(parts, data, 0, distributed=False, bar=CountingBar())
    predictions = gather_predictions(parts, data, distributed=False)
    metrics = epoch_metrics(0, totals, predictions, parts, data)

    assert tuple(metrics) == EPOCH_METRICS  # every name the search and MLflow read, in order
    assert {"val_MAE_const_median", "val_MAE_const_mean", "val_skill"} <= set(metrics)
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, bad
    assert metrics["epoch"] == 0.0
    assert metrics["train_loss"] == pytest.approx(totals.loss / totals.seen)
    assert metrics["lr"] == pytest.approx(parts.scheduler.get_last_lr()[0])
    assert metrics["samples_per_s"] == pytest.approx(totals.seen / totals.seconds)

    # The values are those of the gathered split, against the train split's constants.
    pred = np.asarray(predictions.prediction)
    target = np.asarray(predictions.magnitude, dtype=np.float64)
    assert metrics["val_MAE"] == pytest.approx(np.mean(np.abs(pred - target)), rel=1e-6)
    train_targets = QuakeSetDataset(prepared.path, "train").magnitudes.astype(np.float64)
    assert data.baseline == ConstantBaseline.of(train_targets)
    const_median = np.mean(np.abs(target - np.median(train_targets)))
    assert metrics["val_MAE_const_median"] == pytest.approx(const_median, rel=1e-6)
    assert metrics["val_skill"] == pytest.approx(1 - metrics["val_MAE"] / const_median, rel=1e-6)
    val_loss = parts.val_loss_fn(torch.tensor(pred).float(), torch.tensor(target).float())
    assert metrics["val_loss"] == pytest.approx(float(val_loss.value), rel=1e-6)


def test_a_constant_model_scores_as_the_constant_baseline(prepared: PreparedData) -> None:
    # A model predicting the train median everywhere has the baseline's MAE: skill 0.
    data, parts = _build(prepared)
    median = data.baseline.median
    val = _val_set(prepared)
    n = len(val)
    predictions = Predictions(
        index=list(range(n)),
        event_id=val.event_ids,
        patch=val.patches,
        label=val.labels.tolist(),
        magnitude=val.magnitudes.tolist(),
        prediction=[median] * n,
    )
    totals = EpochTotals(loss=8.0, mse=6.0, rank=2.0, seen=4, seconds=2.0)
    metrics = epoch_metrics(1, totals, predictions, parts, data)
    assert metrics["val_MAE"] == pytest.approx(metrics["val_MAE_const_median"], rel=1e-6)
    assert metrics["val_skill"] == pytest.approx(0.0, abs=1e-6)
    assert (metrics["train_loss"], metrics["train_mse"], metrics["train_rank"]) == (2, 1.5, 0.5)
    assert metrics["samples_per_s"] == 2.0
    assert math.isnan(metrics["val_spearman"])  # undefined for a constant: NaN, not a crash


# ----------------------------------------------------------------------------- epoch_line


def test_the_epoch_line_a_person_reads() -> None:
    metrics = {
        "epoch": 1.0,
        "train_loss": 1.23456,
        "val_loss": 2.5,
        "val_MAE": 0.98765,
        "val_spearman": 0.5,
        "lr": 0.00123,
        "samples_per_s": 321.04,
    }
    assert epoch_line(metrics, 3) == (
        "epoch 2/3: train_loss 1.2346 val_loss 2.5000 val_MAE 0.9877 val_spearman 0.500 "
        "lr 1.23e-03 (321.0 samples/s)"
    )


def test_the_epoch_line_shows_a_nan_score_rather_than_failing() -> None:
    metrics = dict.fromkeys(EPOCH_METRICS, float("nan")) | {"epoch": 0.0}
    assert epoch_line(metrics, 1).startswith("epoch 1/1: train_loss nan val_loss nan")
