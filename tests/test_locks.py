"""Folder locks: one holder at a time, a named holder in the refusal, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from quakeray.errors import BusyError
from quakeray.locks import LOCK_FILE, claimed, held


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with held(tmp_path / "run", what="run folder", instead="choose another run.name"):
        with (
            pytest.raises(BusyError) as err,
            held(tmp_path / "run", what="run folder", instead="choose another run.name"),
        ):
            pass
        message = str(err.value)
        assert "run folder" in message and "is in use by pid" in message
        assert "choose another run.name" in message and "\n" not in message
    with held(tmp_path / "run", what="run folder", instead="x"):  # free again after
        (tmp_path / "run" / "checkpoint_epoch_0000").mkdir()
    assert (tmp_path / "run" / "checkpoint_epoch_0000").is_dir()  # a used folder stays


def test_a_folder_made_for_a_refused_run_is_removed_again(tmp_path: Path) -> None:
    folder = str(tmp_path / "runs" / "train-x")
    with pytest.raises(RuntimeError), claimed(folder, what="run folder", instead="x"):
        assert (tmp_path / "runs" / "train-x" / LOCK_FILE).is_file()
        raise RuntimeError("a later check refused the run")
    assert not (tmp_path / "runs").exists()
    with claimed("s3://bucket/runs/train-x", what="run folder", instead="x"):
        pass  # nothing to lock on an object store
