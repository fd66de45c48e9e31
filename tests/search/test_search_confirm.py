"""A search confirms its answer on fresh seeds and the test split, and says what it means.

A real local Ray and sqlite store; the reference points only (two trials), one epoch,
confirmed on 2 fresh seeds: four more trials in the search's ``confirm`` experiment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from quakeray.config import load_config
from quakeray.search import SearchSummary, run_search
from quakeray.search.confirm import confirmation_points
from quakeray.search.results import TrialRow
from quakeray.search.runs import child_runs
from quakeray.search.trial_spec import spec_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def confirmed(
    ray_local: None, tiny_h5: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SearchSummary, str]:
    root = tmp_path_factory.mktemp("confirm")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            f"data.path={tiny_h5}",
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri={uri}",
            "model.backbone=test_resnet",
            "scaling.num_workers=1",
            "optim.batch_size=8",
            "optim.epochs=1",
            "tracking.log_model=false",
            "search.name=confirm-test",
            "search.num_samples=2",
            "search.max_concurrent=2",
            "search.confirm=true",
            "search.confirm_seeds=2",
            "search.test_trials=true",
        ],
    )
    return run_search(cfg), uri


def test_confirmation_trains_each_answer_on_fresh_seeds_and_scores_test(
    confirmed: tuple[SearchSummary, str],
) -> None:
    summary, uri = confirmed
    assert [r.reference for r in summary.rows] == ["mse_only", "paper"]  # only search trials
    client = MlflowClient(tracking_uri=uri)
    for row in summary.rows:  # search.test_trials: each search trial scored on test too
        assert "test_MAE" in client.get_run(row.run_id).data.metrics
    c = summary.confirmation
    assert c is not None and c.metric == "test_MAE"
    assert sorted(c.scores) == ["mse_only", "paper"]  # the best is the paper's point
    runs = [
        r
        for r in child_runs(uri, summary.experiment_id, summary.parent_run_id)
        if r.data.tags["quakeray.role"] == "confirm"
    ]
    assert len(runs) == 4
    by_label: dict[str, dict[int, float]] = {}
    for run in runs:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["quakeray.status"] == "completed"
        assert run.data.params["optim.seed"] == tags["quakeray.seed"]
        by_label.setdefault(tags["quakeray.confirm"], {})[int(tags["quakeray.seed"])] = (
            run.data.metrics["test_MAE"]
        )
        assert run.data.metrics["test_MAE_const_median"] > 0
    assert by_label["mse_only"] == c.scores["mse_only"].values  # fresh seeds 43, 44
    assert sorted(by_label["paper"]) == [43, 44]
    d = c.differences["paper"]
    paired = [by_label["paper"][s] - by_label["mse_only"][s] for s in (43, 44)]
    assert d.n == 2 and d.mean == pytest.approx(sum(paired) / 2)
    assert c.constant is not None and c.constant > 0


def test_the_parent_run_and_the_summary_carry_the_verdict(
    confirmed: tuple[SearchSummary, str],
) -> None:
    summary, uri = confirmed
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    verdict = parent.data.tags["quakeray.verdict"]
    assert "against MSE only" in verdict and "seed" in verdict
    note = parent.data.tags["mlflow.note.content"]  # the run page's description
    assert note.startswith("**Search `") and "**Seed check**" in note and verdict in note
    assert {"confirm_mse_only_test_MAE", "confirm_paper_test_MAE"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    artifacts |= {a.path for a in client.list_artifacts(summary.parent_run_id, "plots")}
    assert {"confirmation.txt", "plots/confirmation.png"} <= artifacts
    text = summary.format()
    assert "confirmed on 2 fresh seeds" in text and verdict in text


def test_confirmation_points_cover_each_configuration_on_each_fresh_seed() -> None:
    cfg = load_config(None, ["optim.seed=7", "search.confirm_seeds=3"])
    best = TrialRow(
        "t", "r", "completed", "", {"loss.margin": 0.1, "loss.rank_weight": 2.0}, 1.0, 1
    )
    points = confirmation_points(cfg, best)
    assert len(points) == 9 and {p["optim.seed"] for p in points} == {8, 9, 10}
    assert [spec_of(p).label for p in points[:3]] == ["mse_only", "paper", "best"]
    assert points[2]["loss.margin"] == 0.1 and points[0]["loss.rank_weight"] == 0.0
    # When the best is a reference point, it is confirmed once, under that name.
    paper = TrialRow(
        "t", "r", "completed", "paper", {"loss.margin": 0.02, "loss.rank_weight": 1.0}, 1.0, 1
    )
    assert {spec_of(p).label for p in confirmation_points(cfg, paper)} == {"mse_only", "paper"}
