"""The joint loss: hand-computed values per pairing mode, gradients, edge batches, and the
``global`` mode across two real gloo processes (DDP gradient averaging included)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quakeray.config import LossConfig
from quakeray.errors import ConfigError
from quakeray.losses import JointLoss, build_loss

T = torch.tensor


# --------------------------------------------------------------------------- values


def test_halves_matches_hand_computation_with_tie_as_plus_one() -> None:
    # Pairs (0, 2) and (1, 3). Pair (0, 2) is a tie (4 vs 4): the paper counts it as +1, so
    # p0 - p2 = -2 costs 0.1 + 2 = 2.1. Pair (1, 3): y1 > y3 and p1 > p3 by 1.5: no cost.
    pred, target = T([1.0, 2.0, 3.0, 0.5]), T([4.0, 6.0, 4.0, 5.0])
    out = JointLoss(margin=0.1, rank_weight=2.0, pairing="halves")(pred, target)
    assert out.rank.item() == pytest.approx(1.05)
    assert out.mse.item() == pytest.approx((9 + 16 + 1 + 20.25) / 4)
    assert out.total.item() == pytest.approx(11.5625 + 2.0 * 1.05)
    assert out.value.item() == pytest.approx(out.total.item())
    # The same as torch's own MarginRankingLoss on the halves.
    ref = torch.nn.MarginRankingLoss(margin=0.1)(pred[:2], pred[2:], T([1.0, 1.0]))
    assert out.rank.item() == pytest.approx(ref.item())


def test_halves_odd_batch_leaves_the_last_element_out() -> None:
    loss = JointLoss(margin=0.5, rank_weight=1.0, pairing="halves")
    a = loss(T([1.0, 2.0, 3.0]), T([3.0, 1.0, 2.0]))
    b = loss(T([1.0, 2.0, -40.0]), T([3.0, 1.0, 2.0]))
    # One pair (0, 1): y0 > y1 but p0 < p1 by 1 -> 0.5 + 1.
    assert a.rank.item() == pytest.approx(1.5)
    assert b.rank.item() == pytest.approx(1.5)
    assert a.mse.item() != pytest.approx(b.mse.item())  # but the MSE does see it


def test_all_pairs_excludes_ties_and_averages_over_valid_pairs() -> None:
    # (0, 1) is a tie: excluded (any sign would change the mean). (0, 2): y0 < y2 but
    # p0 - p2 = 2 -> 0.5 + 2 = 2.5. (1, 2): p1 - p2 = 1 -> 1.5. Mean over 2 pairs = 2.0.
    out = JointLoss(margin=0.5, rank_weight=1.0, pairing="all")(
        T([3.0, 2.0, 1.0]), T([0.0, 0.0, 5.0])
    )
    assert out.rank.item() == pytest.approx(2.0)
    assert out.mse.item() == pytest.approx((9 + 4 + 16) / 3)
    assert out.total.item() == pytest.approx(29 / 3 + 2.0)


def test_all_pairs_correct_order_beyond_margin_costs_nothing() -> None:
    out = JointLoss(margin=0.5, pairing="all")(T([0.0, 1.0, 5.0]), T([0.0, 0.5, 6.0]))
    assert out.rank.item() == 0.0
    # Right order but inside the margin still costs: p1 - p0 = 0.2 -> 0.5 - 0.2 = 0.3.
    out = JointLoss(margin=0.5, pairing="all")(T([0.0, 0.2, 5.0]), T([0.0, 0.5, 6.0]))
    assert out.rank.item() == pytest.approx(0.3 / 3)


def test_global_without_process_group_is_exactly_all() -> None:
    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(9, generator=gen), torch.randint(0, 4, (9,), generator=gen).float()
    g = JointLoss(margin=0.3, rank_weight=0.7, pairing="global")(pred, target)
    a = JointLoss(margin=0.3, rank_weight=0.7, pairing="all")(pred, target)
    for field in ("total", "value", "mse", "rank"):
        assert getattr(g, field).item() == pytest.approx(getattr(a, field).item())


@pytest.mark.parametrize("pairing", ["halves", "all", "global"])
def test_batch_of_one_has_no_pairs_and_no_nan(pairing: str) -> None:
    pred = T([2.0], requires_grad=True)
    out = JointLoss(margin=0.2, pairing=pairing)(pred, T([5.0]))  # type: ignore[arg-type]
    assert out.rank.item() == 0.0
    assert out.mse.item() == pytest.approx(9.0)
    out.total.backward()
    assert pred.grad is not None
    assert pred.grad.item() == pytest.approx(2 * (2.0 - 5.0))


@pytest.mark.parametrize("pairing", ["halves", "all", "global"])
def test_all_ties_and_empty_batch_give_finite_values(pairing: str) -> None:
    loss = JointLoss(margin=0.2, pairing=pairing)  # type: ignore[arg-type]
    ties = loss(T([1.0, 2.0, 3.0, 4.0, 5.0]), torch.zeros(5))
    assert math.isfinite(ties.total.item())
    if pairing != "halves":  # ties carry no order: nothing to rank
        assert ties.rank.item() == 0.0
    empty_pred = torch.zeros(0, requires_grad=True)
    empty = loss(empty_pred, torch.zeros(0))
    assert empty.total.item() == 0.0 and empty.rank.item() == 0.0
    empty.total.backward()  # still a valid graph


def test_rank_weight_zero_is_plain_mse() -> None:
    pred, target = T([3.0, 2.0, 1.0]), T([0.0, 0.0, 5.0])
    out = JointLoss(margin=0.5, rank_weight=0.0, pairing="all")(pred, target)
    assert out.total.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item())
    assert out.rank.item() == pytest.approx(2.0)  # still reported for logging


def test_column_predictions_and_integer_targets_are_accepted() -> None:
    out = JointLoss(pairing="all")(T([[1.0], [2.0]]), torch.tensor([1, 2]))
    assert out.mse.item() == 0.0
    with pytest.raises(ValueError, match="target has 3"):
        JointLoss()(T([1.0, 2.0]), T([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": -0.1}, "loss.margin"),
        ({"margin": float("nan")}, "loss.margin"),
        ({"rank_weight": -1.0}, "loss.rank_weight"),
        ({"rank_weight": float("inf")}, "loss.rank_weight"),
        ({"pairing": "pairs"}, "loss.pairing must be one of halves, all, global"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        JointLoss(**kwargs)  # type: ignore[arg-type]


def test_build_loss_from_config() -> None:
    loss = build_loss(LossConfig(margin=0.05, rank_weight=3.0, pairing="halves"))
    assert (loss.margin, loss.rank_weight, loss.pairing) == (0.05, 3.0, "halves")
    with pytest.raises(ConfigError):
        build_loss(LossConfig(margin=-1.0))


# --------------------------------------------------------------------------- gradients


def test_all_pairs_gradient_matches_hand_derivation() -> None:
    # Active hinges (0, 2) = 0.5 + p0 - p2 and (1, 2) = 0.5 + p1 - p2, averaged over 2 pairs:
    # d rank / dp = [1/2, 1/2, -1]; d mse / dp = 2 (p - y) / 3.
    pred = T([3.0, 2.0, 1.0], requires_grad=True)
    target = T([0.0, 0.0, 5.0])
    JointLoss(margin=0.5, rank_weight=2.0, pairing="all")(pred, target).total.backward()
    expected = 2 * (pred.detach() - target) / 3 + 2.0 * T([0.5, 0.5, -1.0])
    assert pred.grad is not None
    torch.testing.assert_close(pred.grad, expected)


@pytest.mark.parametrize("pairing", ["halves", "all"])
def test_gradient_matches_finite_differences(pairing: str) -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (7,), generator=gen).double()  # many ties on purpose
    loss = JointLoss(margin=0.4, rank_weight=1.3, pairing=pairing)  # type: ignore[arg-type]

    def total(p: torch.Tensor) -> torch.Tensor:
        # The loss computes in float32; compare in float64 through the same formula.
        return loss(p, target).total.double()

    analytic = torch.autograd.grad(total(pred), pred)[0]
    eps = 1e-3
    numeric = torch.zeros(7, dtype=torch.float64)
    for i in range(7):
        bump = torch.zeros(7, dtype=torch.float64)
        bump[i] = eps
        numeric[i] = (total(pred + bump) - total(pred - bump)).item() / (2 * eps)
    torch.testing.assert_close(analytic, numeric, atol=2e-3, rtol=1e-3)
    assert analytic.abs().sum() > 0


# --------------------------------------------------------------------------- global, 2 processes

# Unequal shards (3 and 5 samples), ties across and within shards, targets 0 like negatives.
_X = torch.linspace(-1.0, 1.0, 24).reshape(8, 3) ** 2
_Y = T([0.0, 5.5, 6.0, 0.0, 7.0, 5.5, 4.8, 0.0])
_SPLIT = (3, 5)
_MARGIN, _WEIGHT = 1.0, 1.5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def _global_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # Both ranks on loopback: gloo otherwise binds the hostname's interface, which aborted
    # a rank once in CI ("terminate called without an active exception").
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        start = sum(_SPLIT[:rank])
        x, y = _X[start : start + _SPLIT[rank]], _Y[start : start + _SPLIT[rank]]
        out = JointLoss(margin=_MARGIN, rank_weight=_WEIGHT, pairing="global")(model(x)[:, 0], y)
        out.total.backward()  # DDP averages the gradients over the two processes here
        torch.save(
            {
                "value": out.value,
                "mse": out.mse,
                "rank": out.rank,
                "grads": [p.grad.detach().clone() for p in model.module.parameters()],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_global_across_two_gloo_processes_equals_all_on_concatenated_batch(tmp_path: Path) -> None:
    mp.spawn(
        _global_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    model = _model()
    ref = JointLoss(margin=_MARGIN, rank_weight=_WEIGHT, pairing="all")(model(_X)[:, 0], _Y)
    ref.total.backward()
    ref_grads = [p.grad for p in model.parameters()]
    assert ref.rank.item() > 0  # the ranking term is active, so the check has teeth
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["value"].item() == pytest.approx(ref.value.item(), rel=1e-6)
        assert got["rank"].item() == pytest.approx(ref.rank.item(), rel=1e-6)
        assert got["mse"].item() == pytest.approx(ref.mse.item(), rel=1e-6)
        for g, r in zip(got["grads"], ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
