"""Download against a real local HTTP server: Range resume, checksum, offline errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from quakeray.data.download import QUAKESET_MD5, QUAKESET_URL, download
from quakeray.errors import DownloadError
from tests.conftest import free_port

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, not a multiple of the chunk size
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    requests_seen: list[tuple[str, str | None]]
    cut_after: int | None  # close the connection after this many body bytes, once


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.server.requests_seen.append((self.path, rng))
        if self.path != "/earthquakes.h5":
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.cut_after
        if cut is not None:
            self.server.cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", free_port()), _Handler)
    srv.requests_seen = []
    srv.cut_after = None
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _url(srv: _Server, name: str = "earthquakes.h5") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{name}"


def test_pinned_constants() -> None:
    assert QUAKESET_URL.startswith("https://huggingface.co/datasets/DarthReca/quakeset/resolve/")
    assert "bead1d25fb9979dbf703f9ede3e8b349f73b29f7" in QUAKESET_URL
    assert QUAKESET_MD5 == "76fc7c76b7ca56f4844d852e175e1560"


def test_download_verify_and_skip(server: _Server, tmp_path: Path) -> None:
    path = download(tmp_path / "d", url=_url(server), md5=MD5, progress=False)
    assert path == tmp_path / "d" / "earthquakes.h5" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "d" / "earthquakes.h5.part").exists()
    seen = len(server.requests_seen)
    again = download(tmp_path / "d", url=_url(server), md5=MD5, progress=False)
    assert again == path and len(server.requests_seen) == seen  # present and verified: no request


def test_interrupted_transfer_resumes_with_range(server: _Server, tmp_path: Path) -> None:
    server.cut_after = 300_000
    with pytest.raises(DownloadError, match=r"interrupted.*run again to resume"):
        download(tmp_path, url=_url(server), md5=MD5, progress=False)
    part = tmp_path / "earthquakes.h5.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)
    assert not (tmp_path / "earthquakes.h5").exists()  # never a final name for a partial file
    have = part.stat().st_size
    path = download(tmp_path, url=_url(server), md5=MD5, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests_seen[-1] == ("/earthquakes.h5", f"bytes={have}-")


def test_complete_part_file_is_finished_without_refetch(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "earthquakes.h5.part").write_bytes(PAYLOAD)  # 416: nothing left to fetch
    path = download(tmp_path, url=_url(server), md5=MD5, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        download(tmp_path, url=_url(server), md5="0" * 32, progress=False)
    assert _url(server) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "earthquakes.h5").exists()
    assert not (tmp_path / "earthquakes.h5.part").exists()


def test_existing_file_with_wrong_checksum_is_kept(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "earthquakes.h5").write_bytes(b"someone's file")
    with pytest.raises(DownloadError, match="exists but its md5"):
        download(tmp_path, url=_url(server), md5=MD5, progress=False)
    assert (tmp_path / "earthquakes.h5").read_bytes() == b"someone's file"
    assert server.requests_seen == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "earthquakes.h5").mkdir()
    with pytest.raises(DownloadError, match="is not a file"):
        download(tmp_path / "other", url=_url(server), md5=MD5, progress=False)


def test_http_error_and_offline(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download(tmp_path, url=_url(server, "missing.h5"), md5=MD5, progress=False)
    assert "place it at" in str(info.value)
    dead = f"http://127.0.0.1:{free_port()}/earthquakes.h5"
    with pytest.raises(DownloadError, match="cannot reach") as info:
        download(tmp_path, url=dead, md5=MD5, progress=False, timeout=5)
    message = str(info.value)
    assert dead in message and str(tmp_path / "earthquakes.h5") in message


def test_cli_offline_and_mismatch(server: _Server, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/earthquakes.h5"
    base = [sys.executable, "-m", "quakeray", "data", "download", str(tmp_path)]
    for url, fragment in ((dead, "cannot reach"), (_url(server), "checksum mismatch")):
        proc = subprocess.run([*base, "--url", url], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr
        assert (
            lines[-1].startswith("quakeray: error:") and fragment in lines[-1] and url in lines[-1]
        )
