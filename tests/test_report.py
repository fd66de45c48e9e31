"""The report's table from constructed runs: the constant beside every MAE, blanks for old runs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from quakeray.report import (
    Report,
    format_report,
    format_size_rows,
    run_result,
    size_rows,
    table_rows,
)


def _run(run_id: str, weight: float, seed: int, metrics: dict[str, float]) -> Any:
    params = {
        "model.backbone": "test_resnet",
        "loss.rank_weight": str(weight),
        "loss.margin": "0.02",
        "optim.seed": str(seed),
    }
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id),
        data=SimpleNamespace(tags={"quakeray.status": "completed"}, params=params, metrics=metrics),
    )


def test_the_constant_stands_beside_the_mae_and_old_runs_get_a_blank() -> None:
    runs = [
        _run("a", 0.0, 1, {"test_MAE": 1.0, "best_val_MAE": 1.0, "test_MAE_const_median": 2.0}),
        _run("b", 0.0, 2, {"test_MAE": 1.2, "best_val_MAE": 1.1, "test_MAE_const_median": 2.0}),
        _run("c", 1.0, 1, {"test_MAE": 0.8, "best_val_MAE": 0.9, "test_MAE_const_median": 2.0}),
    ]
    (row,) = table_rows([r for r in map(run_result, runs) if r is not None])
    assert (row.metric, row.constant) == ("test_MAE", 2.0)
    assert row.mse is not None and row.mse.n == 2 and row.mse.mean == 1.1
    text = format_report(Report("demo", "sqlite:///x", 3, [row]))
    assert "test_MAE  2.0000" in text and "constant" in text
    assert (
        format_report(Report("demo", "x", 3, [row]), "csv")
        .splitlines()[1]
        .startswith("test_resnet,test_MAE,2.0,")
    )

    # Runs from before quakeray logged baselines: a marked blank, never a made-up number.
    old = [_run("d", 0.0, 1, {"best_val_MAE": 1.0}), _run("e", 1.0, 1, {"best_val_MAE": 0.9})]
    (row,) = table_rows([r for r in map(run_result, old) if r is not None])
    assert row.constant is None
    line = format_report(Report("old", "x", 2, [row])).splitlines()[-1]
    assert line.split()[:3] == ["test_resnet", "best_val_MAE", "-"]


def _sized(run_id: str, weight: float, seed: int, fraction: float, mae: float) -> Any:
    run = _run(run_id, weight, seed, {"test_MAE": mae, "best_val_MAE": mae})
    run.data.params["data.train_fraction"] = str(fraction)
    run.data.metrics["test_MAE_const_median"] = 2.0
    return run


def test_by_training_set_size_a_known_gain_and_no_gain() -> None:
    runs = []
    for seed, noise in ((1, 0.0), (2, 0.2), (3, -0.1)):
        # At 10% the ranking term wins by 0.3 on every seed; at 100% they tie within noise.
        runs.append(_sized(f"m10-{seed}", 0.0, seed, 0.1, 1.5 + noise))
        runs.append(_sized(f"j10-{seed}", 1.0, seed, 0.1, 1.2 + noise + 0.01 * seed))
        runs.append(_sized(f"m100-{seed}", 0.0, seed, 1.0, 0.8 + noise))
        runs.append(_sized(f"j100-{seed}", 1.0, seed, 1.0, 0.8 + noise + 0.05 * (seed - 2)))
    rows = size_rows([r for r in map(run_result, runs) if r is not None])
    assert [(r.train_fraction, r.metric) for r in rows] == [(0.1, "test_MAE"), (1.0, "test_MAE")]
    low, full = rows
    assert low.mse is not None and sorted(low.mse.values) == [1, 2, 3]
    assert low.difference is not None and low.difference.beyond_noise
    assert low.difference.mean == pytest.approx(-0.3 + 0.02)
    assert full.difference is not None and not full.difference.beyond_noise
    assert low.constant == 2.0
    text = format_size_rows(rows)
    assert "beyond noise" in text and "within noise" in text and "0.1 " in text
    # One size only: no section.
    assert size_rows([r for r in map(run_result, runs[:2]) if r is not None]) == []


def test_variants_get_a_row_each_so_faithful_and_improved_stay_apart() -> None:
    runs = []
    for variant, mse, joint in (("faithful", 2.0, 1.9), ("improved", 1.0, 0.8)):
        for seed in (1, 2):
            for weight, mae in ((0.0, mse), (1.0, joint)):
                run = _run(f"{variant}{seed}{weight}", weight, seed, {"test_MAE": mae})
                run.data.metrics |= {"best_val_MAE": mae, "test_MAE_const_median": 1.5}
                run.data.params["trial.variant"] = variant
                runs.append(run)
    rows = table_rows([r for r in map(run_result, runs) if r is not None])
    assert [r.backbone for r in rows] == ["test_resnet (faithful)", "test_resnet (improved)"]
    faithful, improved = rows
    assert faithful.mse is not None and faithful.joint is not None
    assert (faithful.mse.mean, faithful.joint.mean, faithful.mse.n) == (2.0, 1.9, 2)
    assert improved.improvement_pct == pytest.approx(20.0)
    # Without variants, one row per backbone as before.
    for run in runs:
        del run.data.params["trial.variant"]
    assert len(table_rows([r for r in map(run_result, runs) if r is not None])) == 1
