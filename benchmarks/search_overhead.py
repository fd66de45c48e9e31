"""Search overhead: the fixed cost of a trial, and the trial-epochs ASHA saves.

(a) Fixed cost per trial, in paired rounds (the machine's load drifts, so each search is
compared with baselines measured right before it). Each round measures four things:

1. **bare start**: a 2-worker ``TorchTrainer`` whose loop only reports once, started from
   the driver (Ray's own worker-group start and teardown);
2. **bare Tune trial**: a sequential Tune search whose trial function builds that same bare
   trainer with Train's ``TuneReportCallback`` (Ray Tune's own per-trial work on top of 1:
   the trial actor, its report queue, the controller's Tune imports; no quakeray code);
3. **bare Tune trial + worker imports**: 2., with each worker first importing what a
   quakeray worker imports (timm, which pulls in torchvision and ``torch._dynamo``, and
   our modules): what the model library costs inside a trial, where both workers import
   at once while Ray starts its per-trial processes;
4. **quakeray trial**: a sequential ``quakeray.search.run_search`` of 2-worker trials on
   generated data.

Every trial is clocked the same way, by a Tune callback in the driver: its span (Tune
starts its actor, to Tune's completion callbacks, the driver's MLflow finalisation
included) minus its epochs (epochs x the median interval between its results), plus the
gap before it (from the previous trial's end: Tune's scheduling, the trial actor's
start, the driver's suggestion, where quakeray opens the MLflow run). That fixed cost
minus 2. is what quakeray adds (target <= 2 s), of which 3. - 2. is the worker imports
and 4. - 3. the rest of our code; minus 1. it is what quakeray and Ray Tune add together.
The parts are timed on their own: imports a fresh worker does beyond a bare one (timm
and quakeray; cold, in a subprocess), opening the data (datasets + statistics + a first
batch), the trial's model check, and the driver's MLflow work per trial (child run,
params, config, epoch metrics, finalisation from a real checkpoint, close).

(b) ASHA. The same 6-trial search (same seed, so the same reference points and TPE
proposals until results differ) with and without ASHA: trial-epochs run, best val_MAE,
wall time.

Prints a table and writes ``benchmarks/results/search_overhead.json``.

    .venv/bin/python benchmarks/search_overhead.py               # ~17 min on 2 cores
    .venv/bin/python benchmarks/search_overhead.py --smoke-test  # ~3 min
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

import math

import ray
import ray.train
import ray.train.torch
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution as optuna_uniform
from ray import tune
from ray.tune import Callback

from quakeray.config import ExperimentConfig, load_config
from quakeray.metrics import EPOCH_METRICS
from quakeray.search import SearchSummary, run_search
from quakeray.search.runs import close_trial_run, open_trial_run

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "search_overhead.json"

_BASE_IMPORTS = "import ray, torch, ray.train.torch"  # a bare TorchTrainer worker has these
WORKER_MODULES = (  # what a quakeray worker imports beyond a bare one
    "timm",
    "quakeray.train",
    "quakeray.models",
    "quakeray.losses",
    "quakeray.metrics",
    "quakeray.optim",
    "quakeray.tracking",
    "quakeray.data.quakeset",
    "quakeray.data.transforms",
)
_IMPORTS = "import " + ", ".join(WORKER_MODULES)


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray reads it where fit() is called
RAY_DEFAULT_POLL_S = 2.0


def _noop_loop(config: dict[str, Any]) -> None:
    ray.train.report({"ok": 1.0})


def _importing_loop(config: dict[str, Any]) -> None:
    """The bare loop after a quakeray worker's imports: the model library's cost alone."""
    import importlib

    for module in WORKER_MODULES:
        importlib.import_module(module)
    ray.train.report({"ok": 1.0})


def _bare_trainer(name: str, storage: str, callbacks: list[Any], imports: bool = False) -> Any:
    return ray.train.torch.TorchTrainer(
        _importing_loop if imports else _noop_loop,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, callbacks=callbacks),
    )


def bare_start(storage: str, poll_s: float) -> float:
    """Wall seconds of a 2-worker TorchTrainer whose loop only reports once."""
    os.environ[POLL_ENV] = str(poll_s)
    trainer = _bare_trainer("bare", storage, [])
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


class TrialClock(Callback):  # type: ignore[misc]
    """Driver-side clock of every trial: start, result and completion times."""

    def __init__(self) -> None:
        self.trials: dict[str, dict[str, Any]] = {}

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.trials[trial.trial_id] = {"start": time.time(), "results": [], "end": None}

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "epoch" in result:
            self.trials[trial.trial_id]["results"].append(time.time())

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.trials[trial.trial_id]["end"] = time.time()

    def costs(self) -> list[dict[str, float]]:
        """Per trial (start order): span, epochs, epoch time, gap before it, fixed cost."""
        out: list[dict[str, float]] = []
        previous_end = None
        for t in sorted(self.trials.values(), key=lambda t: t["start"]):
            stamps = t["results"]
            epoch_s = (
                statistics.median(b - a for a, b in itertools.pairwise(stamps))
                if len(stamps) > 1
                else 0.0
            )
            span = t["end"] - t["start"]
            gap = t["start"] - previous_end if previous_end is not None else math.nan
            out.append(
                {
                    "span_s": span,
                    "epochs": len(stamps),
                    "epoch_s": epoch_s,
                    "gap_before_s": gap,
                    "fixed_s": span - len(stamps) * epoch_s + (0.0 if math.isnan(gap) else gap),
                }
            )
            previous_end = t["end"]
        return out[1:]  # the first trial has no gap before it (the search's own start)


def _bare_tune_trial(config: dict[str, Any]) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ[POLL_ENV] = str(config["poll_s"])
    name = f"bare-{tune.get_context().get_trial_id()}"
    trainer = _bare_trainer(name, config["storage"], [TuneReportCallback()], config["imports"])
    trainer.fit()


def bare_tune_trials(
    storage: str, n: int, poll_s: float, *, imports: bool = False
) -> list[dict[str, float]]:
    """Fixed costs of ``n`` sequential Tune trials, each a bare 2-worker TorchTrainer.

    The same Tune machinery as a quakeray search: a searcher behind a concurrency
    limiter of 1, and 1 logical CPU per trial actor (``search.trial_cpus``). With
    ``imports``, each worker first imports what a quakeray worker imports (timm and our
    modules), so the difference to a quakeray trial is the rest of our code.
    """
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    clock = TrialClock()
    searcher = OptunaSearch(space={"x": optuna_uniform(0.0, 1.0)}, metric="ok", mode="max")
    tuner = tune.Tuner(
        tune.with_resources(_bare_tune_trial, {"cpu": 1.0}),
        param_space={"storage": storage, "poll_s": poll_s, "imports": imports},
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=1), num_samples=n
        ),
        run_config=tune.RunConfig(
            name="bare-tune", storage_path=storage, callbacks=[clock], verbose=0
        ),
    )
    tuner.fit()
    return clock.costs()


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
    from quakeray.data.prepare import PreparedData
    from quakeray.preflight import check_model

    t0 = time.perf_counter()
    check_model(cfg, PreparedData(data_path, stats_path))
    return time.perf_counter() - t0


def mlflow_seconds(summary: SearchSummary, cfg: ExperimentConfig, epochs: int) -> float:
    """The driver's MLflow work for one trial, replayed on the same store."""
    from quakeray.tracking import RunLogger, log_config
    from quakeray.tracking.outputs import finalize_run

    ckpt = summary.best_checkpoint
    assert ckpt, "the search left no checkpoint"
    uri = summary.tracking_uri
    t0 = time.perf_counter()
    run_id = open_trial_run(
        uri, summary.experiment_id, summary.parent_run_id, "bench-replay", run_name="bench-replay"
    )
    logger = RunLogger(uri, run_id)
    logger.log_params({"trial.loss.margin": 0.1})
    log_config(uri, run_id, cfg)
    logger.logged_steps("epoch")
    for epoch in range(epochs):
        logger.log_metrics({name: 1.0 for name in EPOCH_METRICS} | {"epoch": epoch}, step=epoch)
    finalize_run(uri, run_id, cfg, ckpt)
    close_trial_run(uri, run_id, "completed")
    seconds = time.perf_counter() - t0
    MlflowClient(tracking_uri=uri).delete_run(run_id)
    return seconds


def start_local_ray() -> None:
    """The Ray both search benchmarks run on: 4 logical CPUs on this 2-core machine."""
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
    )


def search_cfg(root: Path, data: str, name: str, extra: list[str]) -> ExperimentConfig:
    """A search on ``data`` with ``test_resnet``, stored under ``root``; ``extra`` overrides."""
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
    from quakeray.data.prepare import prepare_data
    from quakeray.data.synthetic import write_synthetic

    root = Path(tempfile.mkdtemp(prefix="qr-search-bench-"))
    data = str(write_synthetic(root / "q.h5", events=12 if smoke else 48, size=32, seed=0))
    load_before = os.getloadavg()
    start_local_ray()
    figures: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count()}

    # (a) fixed cost per trial: bare start, bare Tune trials, quakeray trials, paired rounds
    epochs = 2 if smoke else 3
    trials = 2 if smoke else 4  # sequential; the first one's gap is the search's own start
    rounds = []
    summary_a: SearchSummary | None = None
    poll = ExperimentConfig().scaling.poll_interval_s  # what quakeray sets
    bare_start(str(root / "bare-warm-up"), RAY_DEFAULT_POLL_S)  # Ray's one-time actors
    for i in range(1 if smoke else 3):
        bare_default = bare_start(str(root / f"bare-default-{i}"), RAY_DEFAULT_POLL_S)
        bare = bare_start(str(root / f"bare-{i}"), poll)
        bare_tune = bare_tune_trials(str(root / f"bare-tune-{i}"), trials, poll)
        import_tune = bare_tune_trials(str(root / f"import-{i}"), trials, poll, imports=True)
        cfg_a = search_cfg(
            root,
            data,
            f"overhead-{i}",
            [
                f"optim.epochs={epochs}",
                "scaling.num_workers=2",
                "scaling.cpus_per_worker=0.5",
                f"search.num_samples={trials}",
                "search.max_concurrent=1",
                "search.asha=false",
            ],
        )
        clock = TrialClock()
        summary_a = run_search(cfg_a, callbacks=[clock])
        ours = clock.costs()
        tune_fixed = statistics.median(c["fixed_s"] for c in bare_tune)
        import_fixed = statistics.median(c["fixed_s"] for c in import_tune)
        our_fixed = statistics.median(c["fixed_s"] for c in ours)
        rounds.append(
            {
                "bare_start_ray_default_poll_s": bare_default,
                "bare_start_s": bare,
                "bare_tune_trials": bare_tune,
                "import_tune_trials": import_tune,
                "quakeray_trials": ours,
                "bare_tune_fixed_s": tune_fixed,
                "import_tune_fixed_s": import_fixed,
                "quakeray_fixed_s": our_fixed,
                "poll_saving_s": bare_default - bare,
                "added_by_ray_tune_s": tune_fixed - bare,
                "added_by_quakeray_s": our_fixed - tune_fixed,
                "worker_imports_in_trial_s": import_fixed - tune_fixed,
                "added_by_quakeray_beyond_imports_s": our_fixed - import_fixed,
                "added_over_bare_start_ray_defaults_s": our_fixed - bare_default,
            }
        )
    assert summary_a is not None
    prepared = prepare_data(cfg_a)
    parts = {
        "imports_s (worker: timm + quakeray, beyond a bare worker)": import_seconds(),
        "data_open_s (worker: datasets, statistics, first batch)": data_open_seconds(
            cfg_a, prepared.path, prepared.stats_path
        ),
        "model_check_s (build + one forward, as the driver checks)": check_model_seconds(
            cfg_a, prepared.path, prepared.stats_path
        ),
        "mlflow_s (driver: run, params, config, epochs, finalize, close)": mlflow_seconds(
            summary_a, cfg_a, epochs
        ),
    }

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    figures["a_fixed_cost"] = {
        "poll_interval_s": poll,
        "rounds": rounds,
        "median_bare_start_ray_default_poll_s": median("bare_start_ray_default_poll_s"),
        "median_bare_start_s": median("bare_start_s"),
        "median_bare_tune_fixed_s": median("bare_tune_fixed_s"),
        "median_import_tune_fixed_s": median("import_tune_fixed_s"),
        "median_quakeray_fixed_s": median("quakeray_fixed_s"),
        "median_epoch_s": statistics.median(
            c["epoch_s"] for r in rounds for c in r["quakeray_trials"]
        ),
        "breakdown_parts": parts,
        "added_by_quakeray_median_s": median("added_by_quakeray_s"),
        "worker_imports_in_trial_median_s": median("worker_imports_in_trial_s"),
        "added_by_quakeray_beyond_imports_median_s": median("added_by_quakeray_beyond_imports_s"),
        "added_by_ray_tune_median_s": median("added_by_ray_tune_s"),
        "poll_saving_median_s": median("poll_saving_s"),
        "added_over_bare_start_ray_defaults_median_s": median(
            "added_over_bare_start_ray_defaults_s"
        ),
        "target_added_by_quakeray_s": 2.0,
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
    print(
        "\n(a) fixed cost per trial (2 workers), seconds: span - epochs + gap before it;"
        f" controller poll interval {poll} s unless said"
    )
    for i, r in enumerate(rounds):
        print(
            f"  round {i}: bare start {r['bare_start_s']:5.1f} "
            f"({r['bare_start_ray_default_poll_s']:.1f} at Ray's default poll of 2 s)"
        )
        kinds = (
            ("bare Tune trial", "bare_tune_trials"),
            ("+ worker imports", "import_tune_trials"),
            ("quakeray trial", "quakeray_trials"),
        )
        for label, key in kinds:
            for c in r[key]:
                print(
                    f"    {label:<16} span {c['span_s']:5.1f} - {c['epochs']} epochs x "
                    f"{c['epoch_s']:.2f} + gap {c['gap_before_s']:4.1f} = fixed {c['fixed_s']:5.1f}"
                )
        print(
            f"    added by quakeray {r['added_by_quakeray_s']:+5.1f} (worker imports "
            f"{r['worker_imports_in_trial_s']:+.1f}, the rest "
            f"{r['added_by_quakeray_beyond_imports_s']:+.1f}) | by Ray Tune "
            f"{r['added_by_ray_tune_s']:+5.1f} | quakeray trial vs bare start at Ray's "
            f"defaults {r['added_over_bare_start_ray_defaults_s']:+5.1f}"
        )
    print(
        f"  medians: added by quakeray {a['added_by_quakeray_median_s']:+.1f} (target <= 2.0; "
        f"worker imports {a['worker_imports_in_trial_median_s']:+.1f}, the rest "
        f"{a['added_by_quakeray_beyond_imports_median_s']:+.1f}), "
        f"by Ray Tune {a['added_by_ray_tune_median_s']:+.1f}; poll interval saves "
        f"{a['poll_saving_median_s']:.1f}; quakeray trial vs bare start at Ray's defaults "
        f"{a['added_over_bare_start_ray_defaults_median_s']:+.1f}"
    )
    for key, value in parts.items():
        print(f"    {key:<62} {value:6.2f}")
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
