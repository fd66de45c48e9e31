"""Real searches on a real local Ray: Tune + Optuna + ASHA + Train, every trial in MLflow.

Searches share the module's Ray:

- a TPE search with ASHA, 4 trials, 3 epochs: the reference points learn (lr 1e-2) while
  the sampled trials barely move (lr from [1e-9, 1e-8], same seed and init), so ASHA
  must stop the sampled ones after their first epoch. Most assertions share it, run
  twice: single-worker trials in the trial's own process, and in a Train worker group;
- a 2-point grid where one trial names a backbone timm lacks: it fails, the search goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from quakeray.cli import main
from quakeray.config import ExperimentConfig, load_config
from quakeray.metrics import EPOCH_METRICS
from quakeray.report import build_report
from quakeray.search import SearchSummary, run_search
from quakeray.search.runs import child_runs

pytestmark = pytest.mark.slow

EPOCHS = 3


@dataclass
class Searched:
    summary: SearchSummary
    uri: str
    cfg: ExperimentConfig
    client: MlflowClient


def _base(root: Path, data: Path, uri: str, name: str) -> list[str]:
    return [
        f"data.path={data}",
        f"run.storage_path={root / 'ray_results'}",
        f"tracking.uri={uri}",
        "model.backbone=test_resnet",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=0.5",
        "optim.batch_size=8",
        "tracking.log_model=false",
        f"search.name={name}",
        "search.max_concurrent=2",
    ]


@pytest.fixture(scope="module", params=["in_process", "worker_group"])
def searched(
    request: pytest.FixtureRequest,
    ray_local: None,
    tiny_h5: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Searched:
    # Both ways to run a single-worker trial: in the trial's own process (the default),
    # and in Ray Train's worker group (as multi-worker trials are) must look the same.
    root = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            *_base(root, tiny_h5, uri, "asha-test"),
            f"optim.epochs={EPOCHS}",
            "optim.lr=1e-2",
            "search.num_samples=4",
            "search.grace_period=1",
            "search.reduction_factor=2",
            "search.space.optim.lr={kind: loguniform, low: 1.0e-9, high: 1.0e-8}",
            f"search.in_process_trials={request.param == 'in_process'}",
        ],
    )
    summary = run_search(cfg)
    return Searched(summary, uri, cfg, MlflowClient(tracking_uri=uri))


def test_reference_points_run_first_and_asha_stops_trials_early(searched: Searched) -> None:
    rows = searched.summary.rows
    assert len(rows) == 4
    # Served first; with two trials at a time both start together (rows are in start order).
    refs = {r.reference: r for r in rows[:2]}
    assert sorted(refs) == ["mse_only", "paper"]
    assert refs["mse_only"].params["loss.rank_weight"] == 0.0
    assert (refs["paper"].params["loss.margin"], refs["paper"].params["loss.rank_weight"]) == (
        0.02,
        1.0,
    )
    stopped = [r for r in rows if r.status == "stopped"]
    assert stopped, [(r.trial_id, r.status, r.value, r.epochs) for r in rows]
    assert all(r.epochs < EPOCHS for r in stopped)
    assert all(r.status == "completed" and r.epochs == EPOCHS for r in rows[:2])


def test_tune_best_is_the_best_child_run_in_mlflow(searched: Searched) -> None:
    s = searched.summary
    runs = child_runs(searched.uri, s.experiment_id, s.parent_run_id)
    best_run = min(runs, key=lambda r: r.data.metrics["val_MAE"])
    assert s.best is not None
    assert best_run.data.tags["quakeray.trial_id"] == s.best.trial_id
    assert best_run.data.metrics["val_MAE"] == pytest.approx(s.best.value)
    assert s.best_checkpoint and Path(s.best_checkpoint, "checkpoint.pt").is_file()


def test_one_child_run_per_trial_with_tags_and_epoch_metrics(searched: Searched) -> None:
    s, client = searched.summary, searched.client
    runs = child_runs(searched.uri, s.experiment_id, s.parent_run_id)
    assert sorted(r.data.tags["quakeray.trial_id"] for r in runs) == sorted(
        r.trial_id for r in s.rows
    )
    statuses = {r.trial_id: r.status for r in s.rows}
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == s.parent_run_id
        assert tags["quakeray.role"] == "trial"
        assert tags["quakeray.status"] == statuses[tags["quakeray.trial_id"]]
        assert run.info.status == "FINISHED"  # completed and stopped alike; none RUNNING
        # Rank correlations of constant predictions are NaN, which is not logged.
        assert set(EPOCH_METRICS) - {"val_spearman", "val_kendall"} <= set(run.data.metrics)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_MAE")]
        assert steps == sorted(set(steps))  # one point per epoch, no duplicates
        if tags["quakeray.status"] == "completed":
            assert set(EPOCH_METRICS) <= set(run.data.metrics)
            assert steps == list(range(EPOCHS))
        # Stopped trials are finalised too: best checkpoint, its metrics and figures.
        assert "quakeray.best_checkpoint" in tags
        assert "best_val_MAE" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert "plots/val_scatter.png" in artifacts
        # The searched fields under the same names in every trial; shared settings on the
        # parent only; MLflow's context tags and the data as the run's inputs.
        assert {"trial.optim.lr", "trial.loss.margin", "trial.loss.rank_weight"} <= set(
            run.data.params
        )
        assert "optim.epochs" not in run.data.params
        assert run.data.tags["mlflow.user"] and "mlflow.source.name" in run.data.tags
        contexts = {
            t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key.endswith("context")
        }
        assert contexts == {"train", "validation"}
        # Named by what they are; the best marked.
        reference = tags.get("quakeray.reference")
        name = run.info.run_name.removeprefix("★ best: ")
        if reference:
            assert name == reference
        else:
            assert re.fullmatch(r"tpe-\d{3} lr=\S+", name), name
        best = tags["quakeray.trial_id"] == s.best.trial_id  # type: ignore[union-attr]
        assert run.info.run_name.startswith("★ best: ") == best
        assert tags.get("quakeray.best", "false") == str(best).lower()
        # One best_* per score: no one-point chart per validation metric.
        summaries = {k for k in run.data.metrics if k.startswith("best_")}
        assert summaries <= {"best_val_MAE", "best_val_MAE_const_median"}
    assert searched.client.get_run(s.parent_run_id).data.params["optim.epochs"] == str(EPOCHS)


def test_parent_run_holds_the_search(searched: Searched) -> None:
    s, client = searched.summary, searched.client
    parent = client.get_run(s.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["quakeray.best_trial_id"] == s.best.trial_id  # type: ignore[union-attr]
    assert parent.data.metrics["best_val_MAE"] == pytest.approx(s.best.value)  # type: ignore[union-attr]
    assert "test_MAE" in parent.data.metrics  # best trial evaluated on the test split
    assert parent.data.params["search.space.optim.lr"].startswith("loguniform")
    assert parent.data.params["tune.scheduler"].startswith("ASHA")
    assert parent.data.params["tune.sampler"] == "optuna.TPESampler(seed=0)"
    # The search's params, not the paper point's: searched fields are not on the parent.
    assert "loss.margin" not in parent.data.params and "optim.lr" not in parent.data.params
    assert parent.data.metrics["best.optim.lr"] == pytest.approx(s.best.params["optim.lr"])  # type: ignore[union-attr]
    note = parent.data.tags["mlflow.note.content"]
    assert f"runs/{s.best.run_id}" in note and "constant (train median)" in note  # type: ignore[union-attr]
    assert "| [paper](" in note and "| [mse_only](" in note
    assert "runs view" in s.format() and "workflowType=machine_learning" in s.format()
    artifacts = {a.path for a in client.list_artifacts(s.parent_run_id)}
    artifacts |= {a.path for a in client.list_artifacts(s.parent_run_id, "plots")}
    assert {"results.csv", "best_config.yaml", "plots/optimisation_history.png"} <= artifacts
    assert "plots/val_MAE_margin_weight.png" in artifacts
    csv_text = Path(client.download_artifacts(s.parent_run_id, "results.csv")).read_text()
    assert len(csv_text.strip().splitlines()) == 1 + len(s.rows)
    # The best model is registered (trials log none): models:/<search name>@champion.
    assert s.registered_model == "models:/asha-test@champion"
    assert parent.data.tags["quakeray.registered_model"] == s.registered_model
    version = client.get_model_version_by_alias("asha-test", "champion")
    assert version.run_id == s.best.run_id  # type: ignore[union-attr]
    from quakeray.predict.model import load_predictor

    assert load_predictor(s.registered_model, tracking_uri=searched.uri).tile_size == 32


def test_report_table_of_the_finished_search(
    searched: Searched, capsys: pytest.CaptureFixture[str]
) -> None:
    report = build_report("asha-test", tracking_uri=searched.uri)
    (row,) = report.rows
    assert row.backbone == "test_resnet"
    assert row.mse is not None and row.mse.n == 1 and row.mse.rank_weight == 0.0
    # Stopped trials are not results: the best joint loss is the paper's (completed) point.
    assert row.joint is not None and (row.joint.margin, row.joint.rank_weight) == (0.02, 1.0)
    expected = 100 * (row.mse.mean - row.joint.mean) / row.mse.mean
    assert row.improvement_pct == pytest.approx(expected)
    assert row.constant is not None and row.constant > 0  # beside it, the constant predictor

    assert (
        main(["report", "asha-test", "--tracking-uri", searched.uri, "--format", "markdown"]) == 0
    )
    out = capsys.readouterr().out
    assert f"| test_resnet | best_val_MAE | {row.constant:.4f} |" in out
    assert f"{expected:+.1f}%" in out


def test_a_failing_trial_is_recorded_and_the_search_goes_on(
    ray_local: None, tiny_h5: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            *_base(tmp_path, tiny_h5, uri, "fail-test"),
            "optim.epochs=1",
            "search.sampler=grid",
            "search.reference_points=false",
            "search.asha=false",
            "search.evaluate_best=false",
            "search.num_samples=2",
            "search.space={model.backbone: {kind: choice, choices: [no_such_model, test_resnet]}}",
        ],
    )
    summary = run_search(cfg)
    by_status = {r.status: r for r in summary.rows}
    assert sorted(by_status) == ["completed", "failed"]
    assert by_status["failed"].params["model.backbone"] == "no_such_model"
    run = MlflowClient(tracking_uri=uri).get_run(by_status["failed"].run_id)
    assert run.info.status == "FAILED"
    assert "no_such_model" in run.data.tags["quakeray.error"]
    assert summary.best is not None and summary.best.params["model.backbone"] == "test_resnet"
    parent = MlflowClient(tracking_uri=uri).get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 1


def test_a_grid_over_variants_runs_each_bundle_and_ranks_checkpoints_its_way(
    ray_local: None, tiny_h5: Path, tmp_path: Path
) -> None:
    # The shape of experiments/paper/faithful_vs_improved.yaml, shrunk: the paper's
    # switches against ours. Only "ours" normalises: the driver computes the statistics
    # once anyway. Each trial's checkpoint is the best by its own run.checkpoint_metric.
    from quakeray.checkpoint import find_checkpoints, read_history

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tmp_path / "q.h5"
    data.write_bytes(tiny_h5.read_bytes())  # its statistics are written beside it
    cfg = load_config(
        None,
        [
            *_base(tmp_path, data, uri, "variants-test"),
            "optim.epochs=3",
            "optim.lr=1e-2",
            "data.normalize=false",
            "search.sampler=grid",
            "search.reference_points=false",
            "search.asha=false",
            "search.evaluate_best=false",
            "search.num_samples=2",
            "search.variants={paper: {model.clamp_in_forward: true, model.standardize_target: "
            "false, loss.pairing: halves, run.checkpoint_metric: val_loss}, "
            "ours: {data.normalize: true}}",
            "search.space={variant: {kind: choice, choices: [paper, ours]}}",
        ],
    )
    summary = run_search(cfg)
    assert sorted(r.status for r in summary.rows) == ["completed", "completed"]
    client = MlflowClient(tracking_uri=uri)
    for row in summary.rows:
        variant = row.params["variant"]
        run = client.get_run(row.run_id)
        assert run.data.params["trial.variant"] == variant
        paper = variant == "paper"
        assert run.data.params["loss.pairing"] == ("halves" if paper else "all")
        assert run.data.params["data.normalize"] == str(not paper)
        metric = "val_loss" if paper else "val_MAE"
        history = read_history(find_checkpoints(Path(row.checkpoint).parent)[-1])
        best = min(history, key=lambda m: m[metric])
        assert Path(row.checkpoint).name == f"checkpoint_epoch_{int(best['epoch']):04d}", variant
    rows = build_report("variants-test", tracking_uri=uri).rows
    assert [r.backbone for r in rows] == ["test_resnet (ours)", "test_resnet (paper)"]
