"""Search overhead: the fixed cost of a trial, and the trial-epochs ASHA saves.

(a) Fixed cost per trial, in paired rounds (the machine's load drifts, so each trial is
compared with a bare start measured right before it). Each round: a bare 2-worker
``TorchTrainer`` whose loop only reports once, started from the driver (Ray's own
worker-group start), then a real one-trial search (``quakeray.search.run_search``, a
2-worker trial on generated data). The trial's fixed cost is its wall time (its MLflow
run, opened first and closed last by the trial) minus the time of its epochs (epochs x
the median interval between its per-epoch MLflow points); minus the bare start it is
what quakeray adds (target <= 2 s). The fixed cost is broken down by timing the pieces
on their own: imports a fresh worker does beyond what the bare trainer's workers import
(timm and quakeray on top of torch and ray.train.torch; cold, in a subprocess), opening
the data (datasets + statistics + a first batch), the trial's model check, and MLflow
(child run, params, config, finalisation from the trial's checkpoint, close).

(b) ASHA. The same 6-trial search (same seed, so the same reference points and TPE
proposals until results differ) with and without ASHA: trial-epochs run, best val_MAE,
wall time.

Prints a table and writes ``benchmarks/results/search_overhead.json``.

    .venv/bin/python benchmarks/search_overhead.py               # ~8-10 min on 2 cores
    .venv/bin/python benchmarks/search_overhead.py --smoke-test  # ~2 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray
import ray.train
import ray.train.torch
from mlflow.tracking import MlflowClient

from quakeray.config import ExperimentConfig, load_config
from quakeray.search import SearchSummary, run_search
from quakeray.search_tracking import child_runs, close_trial_run, open_trial_run

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "search_overhead.json"

_BASE_IMPORTS = "import ray, torch, ray.train.torch"  # a bare TorchTrainer worker has these
_IMPORTS = (
    "import timm; import quakeray.train, quakeray.models, quakeray.losses, quakeray.metrics, "
    "quakeray.data.quakeset, quakeray.data.transforms"
)


def _noop_loop(config: dict[str, Any]) -> None:
    ray.train.report({"done": 1.0})


def bare_start(storage: str, repeats: int) -> list[float]:
    """Wall seconds of a 2-worker TorchTrainer whose loop only reports once."""
    times = []
    for i in range(repeats):
        trainer = ray.train.torch.TorchTrainer(
            _noop_loop,
            scaling_config=ray.train.ScalingConfig(
                num_workers=2, resources_per_worker={"CPU": 0.5}
            ),
            run_config=ray.train.RunConfig(name=f"bare-{i}", storage_path=storage),
        )
        t0 = time.perf_counter()
        trainer.fit()
        times.append(time.perf_counter() - t0)
    return times


def import_seconds() -> float:
    """What a fresh worker imports for our loop beyond a bare one (subprocess, cold)."""
    timed = f"t = time.perf_counter(); {_IMPORTS}; print(time.perf_counter() - t)"
    code = f"import time; {_BASE_IMPORTS}; {timed}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def data_open_seconds(cfg: ExperimentConfig, data_path: str, stats_path: str | None) -> float:
    """Open both datasets and the statistics, read a first batch (what each worker does)."""
    from quakeray.data.quakeset import QuakeSetDataset
    from quakeray.data.transforms import ChannelStats

    t0 = time.perf_counter()
    train = QuakeSetDataset(data_path, "train")
    QuakeSetDataset(data_path, "val")
    if stats_path:
        ChannelStats.load(stats_path)
    for i in range(min(len(train), cfg.optim.batch_size // 2)):
        train[i]
    return time.perf_counter() - t0


def check_model_seconds(cfg: ExperimentConfig, data_path: str, stats_path: str | None) -> float:
    from quakeray.train import PreparedData, check_model

    t0 = time.perf_counter()
    check_model(cfg, PreparedData(data_path, stats_path))
    return time.perf_counter() - t0


def mlflow_seconds(summary: SearchSummary, cfg: ExperimentConfig) -> float:
    """A trial's own MLflow calls, replayed on the same store with a real checkpoint."""
    from quakeray.tracking import RunLogger, log_config
    from quakeray.train import finalize_run

    ckpt = summary.best_checkpoint
    assert ckpt, "the search left no checkpoint"
    uri = summary.tracking_uri
    t0 = time.perf_counter()
    run_id = open_trial_run(
        uri, summary.experiment_id, summary.parent_run_id, "bench-replay", run_name="bench-replay"
    )
    RunLogger(uri, run_id).log_params({"trial.loss.margin": 0.1})
    log_config(uri, run_id, cfg)
    finalize_run(uri, run_id, cfg, ckpt)
    close_trial_run(uri, run_id, "completed")
    seconds = time.perf_counter() - t0
    MlflowClient(tracking_uri=uri).delete_run(run_id)
    return seconds


def trial_costs(summary: SearchSummary) -> list[dict[str, float]]:
    """Per trial: wall (MLflow run), epoch time (epochs x median interval), fixed = rest."""
    client = MlflowClient(tracking_uri=summary.tracking_uri)
    out = []
    for run in child_runs(summary.tracking_uri, summary.experiment_id, summary.parent_run_id):
        history = sorted(client.get_metric_history(run.info.run_id, "epoch"), key=lambda m: m.step)
        stamps = [m.timestamp / 1000 for m in history]
        if len(stamps) < 2 or run.info.end_time is None:
            continue
        epoch_s = statistics.median(b - a for a, b in itertools.pairwise(stamps))
        wall = (run.info.end_time - run.info.start_time) / 1000
        out.append(
            {
                "wall_s": wall,
                "epochs": len(stamps),
                "epoch_s": epoch_s,
                "fixed_s": wall - len(stamps) * epoch_s,
            }
        )
    return out


def search_cfg(root: Path, data: str, name: str, extra: list[str]) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"data.path={data}",
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "model.backbone=test_resnet",
            "optim.batch_size=8",
            "optim.lr=3e-3",
            "tracking.log_model=false",
            "search.evaluate_best=false",
            f"search.name={name}",
            *extra,
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="fewer trials and epochs")
    args = parser.parse_args()
    smoke = args.smoke_test
    from quakeray.data.synthetic import write_synthetic
    from quakeray.train import prepare_data

    root = Path(tempfile.mkdtemp(prefix="qr-search-bench-"))
    data = str(write_synthetic(root / "q.h5", events=12 if smoke else 48, size=32, seed=0))
    load_before = os.getloadavg()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
    )
    figures: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count()}

    # (a) fixed cost per trial vs a bare worker-group start, in paired rounds
    epochs = 2 if smoke else 3
    rounds = []
    summary_a: SearchSummary | None = None
    for i in range(1 if smoke else 3):
        bare = bare_start(str(root / f"bare-{i}"), repeats=1)[0]
        cfg_a = search_cfg(
            root,
            data,
            f"overhead-{i}",
            [
                f"optim.epochs={epochs}",
                "scaling.num_workers=2",
                "scaling.cpus_per_worker=0.5",
                "search.num_samples=1",
                "search.max_concurrent=1",
                "search.asha=false",
            ],
        )
        summary_a = run_search(cfg_a)
        (cost,) = trial_costs(summary_a)
        rounds.append({"bare_start_s": bare, **cost, "added_s": cost["fixed_s"] - bare})
    assert summary_a is not None
    prepared = prepare_data(cfg_a)
    parts = {
        "imports_s (timm + quakeray, beyond a bare worker)": import_seconds(),
        "data_open_s (datasets, statistics, first batch)": data_open_seconds(
            cfg_a, prepared.path, prepared.stats_path
        ),
        "model_check_s (trial builds the model once)": check_model_seconds(
            cfg_a, prepared.path, prepared.stats_path
        ),
        "mlflow_s (child run, params, config, finalize, close)": mlflow_seconds(summary_a, cfg_a),
    }
    added = [r["added_s"] for r in rounds]
    figures["a_fixed_cost"] = {
        "rounds": rounds,
        "median_bare_start_s": statistics.median(r["bare_start_s"] for r in rounds),
        "median_trial_fixed_s": statistics.median(r["fixed_s"] for r in rounds),
        "median_trial_wall_s": statistics.median(r["wall_s"] for r in rounds),
        "median_epoch_s": statistics.median(r["epoch_s"] for r in rounds),
        "breakdown_of_added": parts,
        "added_sum_of_parts_s": sum(parts.values()),
        "added_over_bare_median_s": statistics.median(added),
        "added_over_bare_min_s": min(added),
        "target_added_s": 2.0,
    }

    # (b) ASHA vs no early stopping, same trials and seed
    b_runs = {}
    for asha in (True, False):
        cfg_b = search_cfg(
            root,
            data,
            f"asha-{str(asha).lower()}",
            [
                f"optim.epochs={2 if smoke else 4}",
                "scaling.num_workers=1",
                "scaling.cpus_per_worker=0.5",
                f"search.num_samples={2 if smoke else 6}",
                "search.max_concurrent=2",
                f"search.asha={str(asha).lower()}",
                "search.grace_period=1",
                "search.reduction_factor=2",
            ],
        )
        t0 = time.perf_counter()
        summary = run_search(cfg_b)
        b_runs["asha" if asha else "no_early_stopping"] = {
            "wall_s": time.perf_counter() - t0,
            "trials": len(summary.rows),
            "trial_epochs": sum(r.epochs for r in summary.rows),
            "stopped": sum(r.status == "stopped" for r in summary.rows),
            "best_val_MAE": summary.best.value if summary.best else None,
        }
    figures["b_asha"] = b_runs
    figures["loadavg_before"] = load_before
    figures["loadavg_after"] = os.getloadavg()
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)  # data, checkpoints, MLflow store of the runs

    a = figures["a_fixed_cost"]
    print("\n(a) fixed cost per trial (2 workers), seconds, paired rounds")
    for r in rounds:
        print(
            f"  bare start {r['bare_start_s']:5.1f} | trial wall {r['wall_s']:5.1f} - "
            f"{r['epochs']} epochs x {r['epoch_s']:.2f} = fixed {r['fixed_s']:5.1f} | "
            f"added {r['added_s']:+5.1f}"
        )
    print(
        f"  added by quakeray: median {a['added_over_bare_median_s']:+.1f}, "
        f"min {a['added_over_bare_min_s']:+.1f} (target <= 2.0); "
        f"sum of the parts below {a['added_sum_of_parts_s']:.1f}"
    )
    for key, value in parts.items():
        print(f"    {key:<58} {value:6.2f}")
    print("\n(b) ASHA vs no early stopping")
    for key, value in b_runs.items():
        print(
            f"  {key:<18} trials {value['trials']}  trial-epochs {value['trial_epochs']:>3}  "
            f"stopped {value['stopped']}  best val_MAE {value['best_val_MAE']:.4f}  "
            f"wall {value['wall_s']:.0f} s"
        )
    if not smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=1))
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
