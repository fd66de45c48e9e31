"""Training overhead of Ray Train: plain PyTorch in one process vs Ray Train workers.

Same data, model, loss, optimiser, schedule and epochs three ways:

- ``plain``: a bare PyTorch loop in this process (``QuakeSetDataset`` + DataLoader +
  ``BatchTransform`` + model + ``JointLoss`` + AdamW/OneCycle), no Ray, no MLflow;
- ``ray_1``: ``quakeray.train.build_trainer`` with one Ray Train worker of ``--threads``
  CPUs (the plain run gets as many torch threads);
- ``ray_2``: two such workers (DDP over gloo).

Training throughput is samples/s of the training phase of each epoch (validation and
checkpointing excluded: the same per-epoch figure the loop reports as ``samples_per_s``),
the median over epochs after the first (warm-up); plain and one-worker runs are repeated
and the best of each kind compared. End-to-end wall time, worker-group start included,
is reported beside it. Target: ``ray_1`` at most 10% slower than ``plain``.

Prints a table and writes ``benchmarks/results/train_overhead.json``.

    .venv/bin/python benchmarks/train_overhead.py               # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/train_overhead.py --smoke-test  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from quakeray.config import ExperimentConfig, load_config, replace
from quakeray.data.prepare import PreparedData, prepare_data
from quakeray.data.quakeset import QuakeSetDataset, collate
from quakeray.data.synthetic import write_synthetic
from quakeray.data.transforms import build_transform
from quakeray.losses import build_loss
from quakeray.models import build_model
from quakeray.optim import build_optimizer
from quakeray.train import build_trainer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_overhead.json"


def plain_pytorch(cfg: ExperimentConfig, data: PreparedData) -> dict[str, Any]:
    """The same training steps without Ray: samples/s per epoch."""
    from quakeray.data.transforms import ChannelStats

    start = time.perf_counter()
    opt = cfg.optim
    torch.manual_seed(opt.seed)
    stats = ChannelStats.load(data.stats_path) if data.stats_path else None
    dataset = QuakeSetDataset(data.path, "train")
    loader = DataLoader(
        dataset, batch_size=opt.batch_size, shuffle=True, collate_fn=collate, num_workers=0
    )
    transform = build_transform(replace(cfg.data, image_size=0), stats)
    model = build_model(cfg.model, in_chans=4, img_size=dataset.image_size[0])
    loss_fn = build_loss(cfg.loss)
    optimizer, scheduler = build_optimizer(model, opt, len(loader))
    per_epoch = []
    for _ in range(opt.epochs):
        model.train()
        transform.train()
        seen = 0
        t0 = time.perf_counter()
        for batch in loader:
            out = loss_fn(model(transform(batch["image"])), batch["magnitude"].float())
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
            scheduler.step()
            seen += batch["magnitude"].shape[0]
        per_epoch.append(seen / (time.perf_counter() - t0))
    return {"samples_per_s": per_epoch, "wall_s": time.perf_counter() - start}


def ray_train(cfg: ExperimentConfig, data: PreparedData, storage: str, name: str) -> dict[str, Any]:
    """Ray Train through quakeray's trainer (no MLflow): samples/s per epoch from results."""
    start = time.perf_counter()
    trainer = build_trainer(
        cfg, data=data, name=name, storage_path=storage, tracking_uri="", mlflow_run_id=None
    )
    result = trainer.fit()
    wall = time.perf_counter() - start
    frame = result.metrics_dataframe
    per_epoch = [float(v) for v in frame.sort_values("epoch")["samples_per_s"]]
    return {"samples_per_s": per_epoch, "wall_s": wall}


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Median samples/s after the first epoch per run; best of the repeats; ratios."""
    out: dict[str, Any] = {}
    for name, run in runs.items():
        steady = run["samples_per_s"][1:] or run["samples_per_s"]
        out[name] = {**run, "median_samples_per_s": statistics.median(steady)}
    best = {
        kind: max(v["median_samples_per_s"] for k, v in out.items() if k.startswith(kind))
        for kind in ("plain", "ray_1", "ray_2")
    }
    for name in out:
        out[name]["ratio_to_plain"] = out[name]["median_samples_per_s"] / best["plain"]
    return {
        "runs": out,
        "best_samples_per_s": best,
        "ray_1_vs_plain": best["ray_1"] / best["plain"],
        "ray_2_vs_plain": best["ray_2"] / best["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny model and data")
    parser.add_argument("--backbone", default="mobilenetv3")
    parser.add_argument("--size", type=int, default=128, help="patch side in pixels")
    parser.add_argument("--events", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the plain run = CPUs of each Ray worker (OMP_NUM_THREADS)",
    )
    args = parser.parse_args()
    if args.smoke_test:
        args.backbone, args.size, args.events, args.epochs = "test_resnet", 32, 12, 2

    import ray

    cpus = os.cpu_count() or 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="quakeray-train-overhead-"))
    path = write_synthetic(work / "q.h5", events=args.events, size=args.size, seed=0)
    base = [
        f"data.path={path}",
        f"model.backbone={args.backbone}",
        f"optim.epochs={args.epochs}",
        "optim.batch_size=16",
        "optim.lr=1e-3",
        f"run.storage_path={work / 'ray_results'}",
        "loss.pairing=all",
        f"run.checkpoints_to_keep={args.epochs}",  # Result's metrics come from kept checkpoints
    ]
    cfg = load_config(None, base)
    data = prepare_data(cfg)
    # One thread per process by default: on a shared, loaded machine multi-threaded
    # intra-op parallelism spins on contended cores and the figures turn to noise.
    torch.set_num_threads(args.threads)
    runs: dict[str, dict[str, Any]] = {}
    # Plain PyTorch before Ray starts and again after it stops, one Ray worker twice (Ray's
    # own processes and a shared machine must not tilt the comparison): best of each kind.
    runs["plain_before"] = plain_pytorch(cfg, data)
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, log_to_driver=False)
    time.sleep(5)  # let the dashboard and agents finish starting
    try:
        one = load_config(
            None, [*base, "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}"]
        )
        runs["ray_1"] = ray_train(one, data, str(work / "ray_results"), "one")
        two = load_config(
            None, [*base, "scaling.num_workers=2", f"scaling.cpus_per_worker={args.threads}"]
        )
        runs["ray_2"] = ray_train(two, data, str(work / "ray_results"), "two")
        runs["ray_1_again"] = ray_train(one, data, str(work / "ray_results"), "one-again")
    finally:
        ray.shutdown()
    runs["plain_after"] = plain_pytorch(cfg, data)
    result = {
        "setup": {
            "backbone": args.backbone,
            "size": args.size,
            "train_samples": len(QuakeSetDataset(path, "train")),
            "epochs": args.epochs,
            "batch_size": 16,
            "cpus": cpus,
            "threads_per_process": args.threads,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "machine": platform.platform(),
            "load_avg_at_end": os.getloadavg(),
        },
        **summarise(runs),
    }
    print(f"{'run':<12} {'samples/s':>10} {'ratio':>6} {'wall s':>7}  per epoch")
    for name, run in result["runs"].items():
        epochs = ", ".join(f"{v:.1f}" for v in run["samples_per_s"])
        print(
            f"{name:<12} {run['median_samples_per_s']:>10.1f} {run['ratio_to_plain']:>6.2f} "
            f"{run['wall_s']:>7.1f}  [{epochs}]"
        )
    print(
        f"best samples/s: {result['best_samples_per_s']}; Ray 1 worker / plain = "
        f"{result['ray_1_vs_plain']:.2f}, Ray 2 workers / plain = {result['ray_2_vs_plain']:.2f}"
    )
    if not args.smoke_test:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
