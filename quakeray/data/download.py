"""``quakeray data download``: the published QuakeSet file, verified, resumable.

The file (9.67 GB) is fetched from the Hugging Face hub at a pinned revision into
``DIR/earthquakes.h5.part``; an interrupted transfer resumes from where it stopped with an
HTTP ``Range`` request; the MD5 is checked before the file gets its final name, so
``DIR/earthquakes.h5`` is either absent or complete and verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import requests

from quakeray.errors import DownloadError

__all__ = ["CHUNK", "QUAKESET_MD5", "QUAKESET_REVISION", "QUAKESET_URL", "download", "md5sum"]

QUAKESET_REVISION = "bead1d25fb9979dbf703f9ede3e8b349f73b29f7"
QUAKESET_URL = (
    f"https://huggingface.co/datasets/DarthReca/quakeset/resolve/{QUAKESET_REVISION}/earthquakes.h5"
)
QUAKESET_MD5 = "76fc7c76b7ca56f4844d852e175e1560"
CHUNK = 1 << 16  # small: an interrupted read loses at most this much of the last chunk


def md5sum(path: str | Path, *, progress: bool = False) -> str:
    """Hex MD5 of a file, read in 4 MiB blocks."""
    from tqdm import tqdm

    p = Path(path)
    digest = hashlib.md5(usedforsecurity=False)
    with (
        p.open("rb") as fh,
        tqdm(
            total=p.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"md5 {p.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def download(
    directory: str | Path,
    *,
    url: str = QUAKESET_URL,
    md5: str = QUAKESET_MD5,
    filename: str = "earthquakes.h5",
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download (or resume) and verify the QuakeSet file.

    Args:
        directory: Where to put the file (created if needed).
        url: Source URL (default: the pinned revision on the Hugging Face hub).
        md5: Expected hex MD5.
        filename: Name of the file in ``directory``.
        progress: Show progress bars on stderr.
        timeout: Seconds to wait for the server to connect or send data.

    Returns:
        The verified file's path.

    Raises:
        DownloadError: Offline, an HTTP error, an interrupted transfer (re-run to resume), a
            checksum mismatch, or an existing file with the wrong checksum.
    """
    folder = Path(directory)
    dest = folder / filename
    part = folder / f"{filename}.part"
    help_manual = f"or fetch the file by other means and place it at {dest} (md5 {md5})"
    if dest.exists():
        if not dest.is_file():
            raise DownloadError(f"{dest} exists and is not a file; move it away and run again")
        actual = md5sum(dest, progress=progress)
        if actual == md5:
            return dest
        raise DownloadError(
            f"{dest} exists but its md5 is {actual}, expected {md5}; move it away and run "
            "again to download a fresh copy"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {folder}: {exc.strerror or exc}") from None

    _fetch(url, part, progress=progress, timeout=timeout, help_manual=help_manual)

    actual = md5sum(part, progress=progress)
    if actual != md5:
        # A corrupt partial file would fail the same way on every resume: start over.
        with contextlib.suppress(OSError):
            part.unlink()
        raise DownloadError(
            f"checksum mismatch for {url}: md5 {actual}, expected {md5}; the partial file was "
            f"removed, run again to retry {help_manual}"
        )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, *, progress: bool, timeout: float, help_manual: str) -> None:
    """Append the rest of ``url`` to ``part`` (resuming with HTTP Range when it exists)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise DownloadError(
            f"cannot reach {url} ({type(exc).__name__}); check the network and run again, "
            f"{help_manual}"
        ) from None
    with resp:
        if resp.status_code == 416 and have:
            # Nothing left to fetch: the partial file is already complete; md5 decides.
            return
        if resp.status_code not in (200, 206):
            raise DownloadError(
                f"{url} answered HTTP {resp.status_code} {resp.reason}; check the URL, "
                f"{help_manual}"
            )
        if resp.status_code == 200 and have:
            have = 0  # The server ignored the range: start from scratch.
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else None
        mode = "ab" if have else "wb"
        written = have
        try:
            with (
                part.open(mode) as fh,
                tqdm(
                    total=expected,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    desc=part.name.removesuffix(".part"),
                    disable=not progress,
                ) as bar,
            ):
                for block in resp.iter_content(CHUNK):
                    fh.write(block)
                    written += len(block)
                    bar.update(len(block))
        except requests.RequestException as exc:
            raise DownloadError(
                f"download of {url} interrupted after {written} bytes ({type(exc).__name__}); "
                f"the partial file {part} is kept: run again to resume"
            ) from None
        except OSError as exc:
            raise DownloadError(
                f"cannot write {part}: {exc.strerror or exc}; free disk space or pick another "
                "directory, then run again to resume"
            ) from None
    if expected is not None and written < expected:
        raise DownloadError(
            f"download of {url} interrupted after {written} of {expected} bytes; the partial "
            f"file {part} is kept: run again to resume"
        )
