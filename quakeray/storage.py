"""Paths and URIs through one code path (``pyarrow.fs``): the only module that tells them apart.

A storage location is either a local path (``/data/ray_results``, ``~/x``) or a URI that
``pyarrow.fs.FileSystem.from_uri`` understands (``s3://bucket/prefix``, ``gs://...``,
``file:///abs/path``); Ray Train and Tune resolve ``storage_path`` the same way. Local
paths go through ``pyarrow``'s ``LocalFileSystem``, so the search folder code is the same
for both. Paths are joined with ``/`` (URIs and POSIX paths); a URI's query string
(``?region=...``) stays at the end.

Example:
    >>> join("s3://bucket/runs?region=eu-west-1", "search-1")
    's3://bucket/runs/search-1?region=eu-west-1'
    >>> name("file:///tmp/runs/search-1"), parent("file:///tmp/runs/search-1")
    ('search-1', 'file:///tmp/runs')
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

LOCAL_SCHEMES = frozenset({"", "file", "local"})
"""Schemes of locations on the disk of the machine that opens them."""


def scheme(path: str) -> str:
    r"""The URI scheme of ``path``, lower case; "" for a plain path.

    A Windows drive letter (``C:\\runs``) parses as a one-letter scheme: it is a path.
    """
    found = urlparse(path).scheme.lower()
    return "" if len(found) == 1 else found


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in path


def on_local_disk(path: str) -> bool:
    """Whether ``path`` names the local disk: a plain path or a ``file://`` URI."""
    return scheme(path) in LOCAL_SCHEMES


def local_path(path: str) -> Path:
    """The absolute local path of a plain path or a ``file://`` / ``local://`` URI."""
    raw = urlparse(path).path if scheme(path) in ("file", "local") else path
    return Path(raw).expanduser().resolve()


def resolve(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI as it is."""
    return path if is_remote(path) else os.path.realpath(os.path.expanduser(path))


def with_scheme_of(path: str, location: str) -> str:
    """``path`` as Ray reports it (no scheme) in the scheme of the ``location`` it is in.

    Ray Train reports a checkpoint on ``s3://bucket/runs`` as ``bucket/runs/...``.
    """
    if is_remote(location) and not is_remote(path):
        return f"{location.split('://', 1)[0]}://{path}"
    return path


@contextmanager
def replaced_atomically(out: Path) -> Iterator[Path]:
    """A temporary path beside the local file ``out`` to write; it becomes ``out`` at the end.

    Readers see the old file or the new one, never a part: the block writes the temporary
    file, which is renamed over ``out`` when the block ends and removed when it raises.
    """
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """A local folder with the files of the folder ``path`` (downloaded when a URI)."""
    if not is_remote(path):
        yield Path(path)
        return
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as folder:
        yield Path(folder)


def download_file(path: str, target: Path) -> Path:
    """Copy the file at the URI ``path`` to the local ``target``, streamed, not held in memory."""
    import shutil

    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)
    return target


def _split_query(path: str) -> tuple[str, str]:
    if is_remote(path) and "?" in path:
        base, query = path.split("?", 1)
        return base, f"?{query}"
    return path, ""


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (the URI's query string kept at the end)."""
    path, query = _split_query(base)
    for part in parts:
        path = f"{path.rstrip('/')}/{part.strip('/')}"
    return path + query


def name(path: str) -> str:
    """The last component of a path or URI."""
    return _split_query(path)[0].rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    """The folder holding ``path`` (a URI stays a URI, with its query string)."""
    if not is_remote(path):
        return os.path.dirname(resolve(path))
    base, query = _split_query(path)
    head = base.rstrip("/").rsplit("/", 1)[0]
    if "://" not in head:  # s3://bucket: the bucket is the top
        raise ValueError(f"{path} has no parent folder")
    return (head + "/" if head.endswith("://") else head) + query


def filesystem(path: str) -> tuple[FileSystem, str]:
    """The ``pyarrow`` filesystem of ``path`` and the path inside it."""
    from pyarrow.fs import FileSystem, LocalFileSystem

    if is_remote(path):
        fs, inner = FileSystem.from_uri(path)
        return fs, inner
    return LocalFileSystem(), resolve(path)


def _type(path: str) -> str:
    from pyarrow.fs import FileType

    fs, inner = filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == FileType.Directory:
        return "dir"
    return "file" if kind == FileType.File else "none"


def exists(path: str) -> bool:
    """Whether a file or folder exists at ``path``."""
    return _type(path) != "none"


def is_dir(path: str) -> bool:
    """Whether ``path`` is a folder (on object stores: a prefix holding objects)."""
    return _type(path) == "dir"


def is_file(path: str) -> bool:
    """Whether ``path`` is a file (an object)."""
    return _type(path) == "file"


def makedirs(path: str) -> None:
    """Create the folder and its parents (no error when it exists)."""
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


def remove_empty_dir(path: str) -> bool:
    """Remove the folder only when it holds nothing; whether it was removed."""
    from pyarrow.fs import FileSelector

    fs, inner = filesystem(path)
    if fs.get_file_info(FileSelector(inner, allow_not_found=True)):
        return False  # never delete what someone wrote
    fs.delete_dir(inner)
    return True


def upload_dir(local: Path, path: str, *, last: str = "") -> None:
    """Copy a local folder's files to the folder ``path`` (created, or replaced on a disk).

    What Ray Train does for a checkpoint, for a loop that runs outside a worker group. On
    a local disk the copy is renamed into place, so readers see the whole folder or none.
    On a bucket each object appears once it is complete, one after the other, the file
    named ``last`` last: a reader that waits for that one never sees a part (objects of
    an earlier upload that the new folder lacks are left).
    """
    import shutil

    from pyarrow.fs import LocalFileSystem, copy_files

    fs, inner = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        target = Path(inner)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        aside = staging.with_suffix(".old")
        try:
            shutil.copytree(local, staging)
            if target.exists():
                os.replace(target, aside)  # never a moment without the folder's old or new
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(aside, ignore_errors=True)
        return
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    for file in sorted(files, key=lambda p: p.name == last):  # stable: `last` goes last
        copy_files(
            str(file),
            f"{inner}/{file.relative_to(local).as_posix()}",
            source_filesystem=LocalFileSystem(),
            destination_filesystem=fs,
        )


def remove_dir(path: str) -> None:
    """Delete a folder and everything in it (no error when it does not exist)."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type.name != "NotFound":
        fs.delete_dir(inner)


def list_dir(path: str) -> list[str]:
    """Names of the folders directly in ``path``, sorted ([] when it does not exist)."""
    from pyarrow.fs import FileSelector, FileType

    fs, inner = filesystem(path)
    infos = fs.get_file_info(FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == FileType.Directory)


def read_text(path: str) -> str:
    """The file's text (UTF-8)."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as fh:
        return bytes(fh.read()).decode("utf-8")


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file so that readers see the old or the new text, never a part.

    On a local filesystem: a temporary file in the same folder, then a rename. On object
    stores (S3, GCS) an object appears only once its upload completes, so it is written
    in place (their "rename" is a copy, not atomic).
    """
    from pyarrow.fs import LocalFileSystem

    fs, inner = filesystem(path)
    data = text.encode("utf-8")
    if not isinstance(fs, LocalFileSystem):
        with fs.open_output_stream(inner) as fh:
            fh.write(data)
        return
    tmp = f"{inner}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
        fs.move(tmp, inner)
    except BaseException:
        if fs.get_file_info(tmp).type.name != "NotFound":
            fs.delete_file(tmp)
        raise


__all__ = [
    "LOCAL_SCHEMES",
    "download_file",
    "exists",
    "filesystem",
    "is_dir",
    "is_file",
    "is_remote",
    "join",
    "list_dir",
    "local_copy",
    "local_path",
    "makedirs",
    "name",
    "on_local_disk",
    "parent",
    "read_text",
    "remove_dir",
    "remove_empty_dir",
    "replaced_atomically",
    "resolve",
    "scheme",
    "upload_dir",
    "with_scheme_of",
    "write_text_atomic",
]
