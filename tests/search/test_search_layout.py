"""Where a search lives: every path of a search folder comes from its ``SearchRef``."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from quakeray.errors import SearchError
from quakeray.search.layout import (
    CONFIRM_SUBDIR,
    STATE_FILE,
    TRAIN_SUBDIR,
    SearchRef,
    new_search_dir,
)


@pytest.mark.parametrize("folder", ["/runs/demo-20261202-101010", "s3://bucket/runs/demo-1"])
def test_a_search_refs_paths_keep_its_folders_scheme(folder: str) -> None:
    ref = SearchRef(folder, "sqlite:////tmp/mlflow.db", "1", "parent")
    assert ref.state_file == f"{folder}/{STATE_FILE}"
    assert ref.train_root == f"{folder}/{TRAIN_SUBDIR}"
    assert ref.train_dir("abc12") == f"{folder}/{TRAIN_SUBDIR}/train-abc12"
    assert ref.train_name("abc12") == "train-abc12"  # Train's run name: stable on restart
    assert ref.confirm_folder == f"{folder}/{CONFIRM_SUBDIR}"
    assert pickle.loads(pickle.dumps(ref)) == ref  # shipped to trials and writers


def test_two_searches_started_in_the_same_second_get_two_folders(tmp_path: Path) -> None:
    first, second = (new_search_dir(str(tmp_path), "demo") for _ in range(2))
    assert first != second
    assert re.fullmatch(r"demo-\d{8}-\d{6}", Path(first).name)
    assert Path(second).name.startswith(Path(first).name) and Path(second).is_dir()


def test_a_search_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SearchError, match=r"run.storage_path .*cannot create the search folder"):
        new_search_dir(str(blocker), "demo")
