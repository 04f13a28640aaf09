"""Montgomery download over real HTTP (a server on 127.0.0.1): what is accepted, fall-through, cache zip, overrides."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selora.data import DataError
from selora.data.montgomery import SHA256, SHA256_ENV, ZIP_NAME, download_montgomery, main, scan
from selora.data.phantom import make_phantom_set

HTML = b"<!DOCTYPE html><html><head><title>Moved</title></head><body>This page has moved.</body></html>\n"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A phantom set zipped in the exact NLM layout (12 cases)."""
    root = tmp_path_factory.mktemp("mont-dl")
    make_phantom_set(root, n_cases=12, n_normal=6, seed=2, size=(32, 40), zip_archive=True)
    return root / ZIP_NAME


@pytest.fixture(scope="module")
def other_zip(tmp_path_factory) -> Path:
    """A valid zip that is not the Montgomery set."""
    path = tmp_path_factory.mktemp("other") / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Shenzhen/CXR_png/CHNCXR_0001_0.png", b"x" * 100)
    return path


def _sha(path: Path | bytes) -> str:
    return hashlib.sha256(path if isinstance(path, bytes) else path.read_bytes()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.log.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        ctype, body, declared = route
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(declared or len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1: ``server.routes[path] = (content type, body, declared length or None)``."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.log = {}, []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_port}{path}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def paper(monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    monkeypatch.delenv(SHA256_ENV, raising=False)


def _no_network(url):
    raise AssertionError(f"no download expected, but {url} was opened")


def test_html_with_200_falls_through_to_the_mirror(server, archive, tmp_path):
    server.routes["/moved.zip"] = ("text/html; charset=utf-8", HTML, None)
    server.routes["/mirror.zip"] = ("application/zip", archive.read_bytes(), None)
    urls = (server.url("/moved.zip"), server.url("/mirror.zip"))
    top = download_montgomery(tmp_path, sha256=_sha(archive), urls=urls)
    assert server.log == ["/moved.zip", "/mirror.zip"], "the second URL must be tried"
    assert len(scan(top.parent)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MontgomerySet"], "no leftovers"


def test_html_everywhere_never_suggests_accepting_it(server, tmp_path):
    server.routes["/a.zip"] = ("text/html", HTML, None)  # /b.zip: 404
    urls = (server.url("/a.zip"), server.url("/b.zip"))
    with pytest.raises(DataError) as err:
        download_montgomery(tmp_path, urls=urls)
    msg = str(err.value)
    assert "\n" not in msg and server.log == ["/a.zip", "/b.zip"]
    assert "HTML" in msg and "404" in msg and urls[0] in msg and urls[1] in msg
    assert _sha(HTML) not in msg and "accept" not in msg.lower(), "must not offer to accept an HTML page"
    # the manual route, with the exact place to put a browser download
    assert str(tmp_path / ZIP_NAME) in msg and "--from-zip" in msg
    assert not any(tmp_path.iterdir())


def test_truncated_download_falls_through(server, archive, tmp_path):
    data = archive.read_bytes()
    server.routes["/short.zip"] = ("application/zip", data[: len(data) // 2], len(data))
    server.routes["/full.zip"] = ("application/zip", data, None)
    urls = (server.url("/short.zip"), server.url("/full.zip"))
    download_montgomery(tmp_path, sha256=_sha(archive), urls=urls)
    assert server.log == ["/short.zip", "/full.zip"] and len(scan(tmp_path)) == 12


def test_zip_of_the_wrong_layout_is_not_offered_for_acceptance(server, other_zip, tmp_path):
    server.routes["/a.zip"] = ("application/zip", other_zip.read_bytes(), None)
    with pytest.raises(DataError) as err:
        download_montgomery(tmp_path, urls=(server.url("/a.zip"),))
    msg = str(err.value)
    assert "MontgomerySet/CXR_png" in msg and "not the Montgomery" in msg
    assert _sha(other_zip) not in msg and "accept" not in msg.lower()


def test_repacked_archive_stops_with_expected_got_and_the_override(server, archive, tmp_path, monkeypatch):
    server.routes["/a.zip"] = ("application/zip", archive.read_bytes(), None)
    urls = (server.url("/a.zip"), server.url("/gone.zip"))
    with pytest.raises(DataError) as err:
        download_montgomery(tmp_path, urls=urls)  # pinned checksum = the real archive's
    msg, got = str(err.value), _sha(archive)
    assert "\n" not in msg and server.log == ["/a.zip", "/gone.zip"]
    assert f"expected {SHA256}" in msg and f"got {got}" in msg
    assert f"{SHA256_ENV}={got}" in msg and f"--accept-sha256 {got}" in msg
    assert f"{archive.stat().st_size:,} bytes" in msg and "616,853,875" in msg
    assert not any(tmp_path.iterdir()), "an unverified download is deleted"
    monkeypatch.setenv(SHA256_ENV, got)  # the deliberate way
    with pytest.warns(UserWarning, match=f"{got} accepted .*not the pinned"):
        download_montgomery(tmp_path, urls=urls)
    assert len(scan(tmp_path)) == 12


def test_zip_in_the_cache_folder_is_used_without_the_network(archive, tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "offline")  # no download allowed, none needed
    placed = tmp_path / ZIP_NAME
    placed.write_bytes(archive.read_bytes())
    download_montgomery(tmp_path, sha256=_sha(archive), opener=_no_network)
    assert len(scan(tmp_path)) == 12 and placed.is_file(), "the user's zip is kept"


def test_zip_in_the_cache_folder_with_another_checksum_stops(archive, tmp_path):
    placed = tmp_path / ZIP_NAME
    placed.write_bytes(archive.read_bytes())
    with pytest.raises(DataError) as err:
        download_montgomery(tmp_path, opener=_no_network)
    msg = str(err.value)
    assert str(placed) in msg and f"expected {SHA256}" in msg and f"--accept-sha256 {_sha(archive)}" in msg
    assert placed.is_file() and not (tmp_path / "MontgomerySet").exists()


def test_html_saved_as_the_zip_in_the_cache_folder(tmp_path):
    placed = tmp_path / ZIP_NAME
    placed.write_bytes(HTML)
    with pytest.raises(DataError, match="HTML") as err:
        download_montgomery(tmp_path, opener=_no_network)
    assert "accept" not in str(err.value).lower() and str(placed) in str(err.value)


def test_from_zip_is_checked_against_the_pinned_checksum(archive, tmp_path, capsys):
    with pytest.raises(DataError, match=f"expected {SHA256}"):
        download_montgomery(tmp_path / "a", source=archive)
    assert main(["--root", str(tmp_path / "b"), "--from-zip", str(archive)]) == 2
    assert f"--accept-sha256 {_sha(archive)}" in capsys.readouterr().err
    args = ["--root", str(tmp_path / "b"), "--from-zip", str(archive), "--accept-sha256", _sha(archive)]
    with pytest.warns(UserWarning, match="not the pinned"):
        assert main(args) == 0
    assert "cases: 12" in capsys.readouterr().out


def test_accepted_checksum_must_be_a_sha256(archive, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="64 hex"):
        download_montgomery(tmp_path, source=archive, sha256="yes")
    monkeypatch.setenv(SHA256_ENV, "abc")
    with pytest.raises(DataError, match=f"{SHA256_ENV}.*64 hex"):
        download_montgomery(tmp_path, source=archive)


def test_cli_download_uses_the_cache_zip(archive, tmp_path, capsys):
    (tmp_path / ZIP_NAME).write_bytes(archive.read_bytes())
    with pytest.warns(UserWarning, match="not the pinned"):
        assert main(["--root", str(tmp_path), "--download", "--accept-sha256", _sha(archive)]) == 0
    assert "cases: 12" in capsys.readouterr().out


def test_montgomery_root_paper_prepares_data_without_loading_a_model(archive, tmp_path):
    """The trainer can call montgomery_root() first: it needs no model library and, with the zip placed
    in the cache folder, no network."""
    folder = tmp_path / "data" / "montgomery"
    folder.mkdir(parents=True)
    (folder / ZIP_NAME).write_bytes(archive.read_bytes())
    env = {**os.environ, "SELORA_CACHE": str(tmp_path), "SELORA_PROFILE": "paper", SHA256_ENV: _sha(archive)}
    code = (
        "import sys, urllib.request\n"
        "urllib.request.urlopen = None  # any download attempt fails loudly\n"
        "from selora.data import montgomery_root\n"
        "root = montgomery_root()\n"
        "heavy = sorted(m for m in ('diffusers', 'transformers', 'huggingface_hub') if m in sys.modules)\n"
        "print(root, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(folder), "[]"]
    assert len(scan(folder)) == 12
