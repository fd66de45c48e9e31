"""The worker loop's pieces in this process, without Ray: prepared data and a stub session.

``prepared`` is the shared 32 px file made ready as the driver makes it
(:func:`~quakeray.data.prepare.prepare_data`: statistics beside a copy of it);
:func:`tiny_config` is a config that trains ``test_resnet`` on it in well under a
second per epoch; :class:`StubSession` is a :class:`~quakeray.train.session.LoopSession`
of world size 1 that records every report.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from quakeray.checkpoint import checkpoint_dir_name
from quakeray.config import ExperimentConfig, load_config
from quakeray.data.prepare import PreparedData, prepare_data


def tiny_config(prepared: PreparedData | Path, *overrides: str) -> ExperimentConfig:
    """test_resnet on the 32 px file: 2 epochs in batches of 8, a learning rate that moves."""
    path = prepared.path if isinstance(prepared, PreparedData) else prepared
    return load_config(
        None,
        [
            f"data.path={path}",
            "model.backbone=test_resnet",
            "scaling.num_workers=0",
            "optim.epochs=2",
            "optim.batch_size=8",
            "optim.lr=1e-2",
            *overrides,
        ],
    )


@pytest.fixture(scope="package")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_h5: Path) -> PreparedData:
    """The session's 32 px file (52 train, 19 val samples) prepared with its statistics."""
    path = tmp_path_factory.mktemp("loop_data") / "q.h5"
    shutil.copyfile(tiny_h5, path)  # the statistics are written beside the file
    return prepare_data(tiny_config(path))


class Interrupted(Exception):
    """Raised by a :class:`StubSession` report: the process stops there, as if killed."""


@dataclass(frozen=True)
class Report:
    """One report of the loop, and what its checkpoint folder held at that moment."""

    metrics: dict[str, float]
    folder: Path  # the reported checkpoint: a copy of the staged one, or the persisted one
    files: frozenset[str]  # the folder's files when the report was made
    staged: bool  # handed over for the runner to persist (a worker group's way)
    persisted: str  # the folder the loop persisted itself ("" when it did not)


@dataclass
class StubSession:
    """A world-size-1 :class:`~quakeray.train.session.LoopSession` on the CPU, no Ray.

    Staged checkpoints are copied under ``keep_staged`` when reported, as Ray persists
    them (the loop deletes its staging folder after the report).
    """

    keep_staged: Path | None = None
    restored: str | None = None  # what ``restored_checkpoint`` gives: the runner's own latest
    stop_after: int | None = None  # raise Interrupted on this report (1-based)
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reports: list[Report] = field(default_factory=list)
    prepared_models: int = 0

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.prepared_models += 1
        return model.to(self.device)

    @contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        yield self.restored

    def report(self, metrics: dict[str, float], *, staged: Path | None, persisted: str) -> None:
        if staged is not None:
            assert self.keep_staged is not None, "a staged checkpoint and nowhere to keep it"
            folder = self.keep_staged / checkpoint_dir_name(int(metrics["epoch"]))
            shutil.copytree(staged, folder)
        else:
            folder = Path(persisted)
        held = bool(staged or persisted) and folder.is_dir()
        files = frozenset(p.name for p in folder.iterdir()) if held else frozenset()
        self.reports.append(Report(dict(metrics), folder, files, staged is not None, persisted))
        if self.stop_after is not None and len(self.reports) >= self.stop_after:
            raise Interrupted(f"stopped after report {len(self.reports)}")

    @property
    def epochs(self) -> list[int]:
        """The epochs reported, in order."""
        return [int(r.metrics["epoch"]) for r in self.reports]
