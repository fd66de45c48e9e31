"""``quakeray.storage``: one code path for local folders and URIs (here ``file://``).

``file://`` goes through ``pyarrow.fs.FileSystem.from_uri`` exactly as ``s3://`` does, so
these tests cover the URI handling the search uses on a cluster, without a bucket.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from quakeray import storage


@pytest.fixture(params=["path", "uri"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path) if request.param == "path" else f"file://{tmp_path}"


def test_join_name_parent_keep_the_scheme_and_query() -> None:
    assert storage.join("s3://b/runs/", "s-1", "train") == "s3://b/runs/s-1/train"
    assert storage.join("s3://b/runs?region=eu", "s-1") == "s3://b/runs/s-1?region=eu"
    assert storage.name("s3://b/runs/s-1?region=eu") == "s-1"
    assert storage.parent("s3://b/runs/s-1?region=eu") == "s3://b/runs?region=eu"
    assert storage.parent("file:///tmp") == "file:///"
    assert storage.parent("/tmp/runs/s-1") == "/tmp/runs"
    with pytest.raises(ValueError, match="no parent"):
        storage.parent("s3://bucket")
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/x")
    assert storage.resolve("gs://b/x") == "gs://b/x"


def test_relative_local_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs") == str(tmp_path.resolve() / "runs")
    assert storage.parent("runs") == str(tmp_path.resolve())


def test_folders_and_files_round_trip(root: str, tmp_path: Path) -> None:
    folder = storage.join(root, "a", "b")
    assert not storage.exists(folder)
    storage.makedirs(folder)
    storage.makedirs(folder)  # exists already: fine
    assert storage.is_dir(folder) and not storage.is_file(folder)
    assert (tmp_path / "a" / "b").is_dir()  # the URI named the same place on disk

    state = storage.join(folder, "state.json")
    storage.write_text_atomic(state, '{"v": 1}')
    storage.write_text_atomic(state, '{"v": 2} é')  # replaced whole, UTF-8
    assert storage.is_file(state) and storage.exists(state)
    assert storage.read_text(state) == '{"v": 2} é'
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["state.json"]  # no .tmp


def test_remove_empty_dir_never_deletes_contents(root: str, tmp_path: Path) -> None:
    full = storage.join(root, "full")
    storage.makedirs(full)
    storage.write_text_atomic(storage.join(full, "keep.txt"), "data")
    assert storage.remove_empty_dir(full) is False
    assert (tmp_path / "full" / "keep.txt").read_text() == "data"

    empty = storage.join(root, "empty")
    storage.makedirs(empty)
    assert storage.remove_empty_dir(empty) is True
    assert not (tmp_path / "empty").exists()


def test_unknown_scheme_is_an_error() -> None:
    with pytest.raises((OSError, ValueError)):
        storage.exists("nosuchscheme://bucket/x")
