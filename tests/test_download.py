"""Downloads end to end against a real HTTP server on 127.0.0.1 serving copies of the real files."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import shutil
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mnistlab import data as mdata
from mnistlab import download as mdownload
from mnistlab.catalog import MNIST
from mnistlab.data import download, load_mnist
from mnistlab.download import default_mirrors, download_file, verify_file
from mnistlab.errors import DownloadError
from mnistlab.fileio import new_file_mode


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files from the mirror folder; /short/ sends half a file, /garbage/ is not HTTP."""

    requests: list[str]

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/short/"):
            body = (Path(self.directory) / "good" / self.path.removeprefix("/short/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        if self.path.startswith("/garbage/"):
            self.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            self.close_connection = True
            return
        super().do_GET()


def _corrupt(data: bytes) -> bytes:
    """Flip a run of bytes in the middle of the compressed stream."""
    out = bytearray(data)
    mid = len(out) // 2
    for i in range(mid, mid + 16):
        out[i] ^= 0xFF
    return bytes(out)


def _tampered(data: bytes) -> bytes:
    """A perfectly valid gzip file whose content differs from MNIST's in one byte."""
    content = bytearray(gzip.decompress(data))
    content[-1] ^= 0x01
    return gzip.compress(bytes(content), compresslevel=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, raw_files):
    """Base URL of a local server with mirrors: good, recompressed, corrupt, tampered, missing."""
    site = tmp_path_factory.mktemp("site")
    variants = {
        "good": lambda b: b,
        "recompressed": lambda b: gzip.compress(gzip.decompress(b), compresslevel=1, mtime=1),
        "corrupt": _corrupt,
        "tampered": _tampered,
    }
    for folder, make in variants.items():
        (site / folder).mkdir()
        for name, path in raw_files.items():
            (site / folder / f"{name}.gz").write_bytes(make(path.read_bytes()))
    (site / "missing").mkdir()
    requests: list[str] = []
    handler = type("H", (Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(site))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield SimpleNamespace(url=base, site=site, requests=requests)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dead_mirror() -> str:
    """A URL on a local port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


@pytest.fixture(autouse=True)
def _fresh_cache_short_timeout(monkeypatch):
    monkeypatch.setattr(mdata, "_memory_cache", {})
    monkeypatch.setattr(mdownload, "TIMEOUT_S", 5.0)


def _raw(root: Path) -> Path:
    return root / "MNIST" / "raw"


def _listing(root: Path) -> list[str]:
    folder = _raw(root)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


ALL_GZ = sorted(f"{name}.gz" for name in MNIST.files)


def _assert_verified(root: Path) -> None:
    assert _listing(root) == ALL_GZ  # nothing else: no .part, no probe
    for name in MNIST.files:
        assert verify_file(_raw(root) / f"{name}.gz", MNIST.sha256[name])


def test_cli_download_end_to_end(server, tmp_path, run_cli, raw_files):
    root = tmp_path / "root"
    done = run_cli("data", "download", "--root", root, "--mirror", f"{server.url}/good/")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("verified ") == 4
    _assert_verified(root)
    for name, path in raw_files.items():
        assert (_raw(root) / f"{name}.gz").read_bytes() == path.read_bytes()
        mode = (_raw(root) / f"{name}.gz").stat().st_mode & 0o777
        assert mode == new_file_mode(), oct(mode)  # not mkstemp's 0600

    info = run_cli("data", "info", "--json", "--root", root)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["verified"] is True
    assert report["root"] == str(root)
    assert report["train"]["count"] == 60000 and report["test"]["count"] == 10000

    # A second download finds everything verified and fetches nothing.
    before = len(server.requests)
    download(root, mirrors=[f"{server.url}/good/"])
    assert len(server.requests) == before
    _assert_verified(root)


def test_first_mirror_404_then_second(server, tmp_path):
    root = tmp_path / "root"
    server.requests.clear()
    download(root, mirrors=[f"{server.url}/missing/", f"{server.url}/good/"])
    _assert_verified(root)
    for name in MNIST.files:
        assert f"/missing/{name}.gz" in server.requests
        assert f"/good/{name}.gz" in server.requests


def test_corrupted_copy_rejected_next_mirror_used(server, tmp_path, raw_files):
    root = tmp_path / "root"
    server.requests.clear()
    download(
        root, mirrors=[f"{server.url}/corrupt/", f"{server.url}/tampered/", server.url + "/good"]
    )
    _assert_verified(root)
    for name, path in raw_files.items():
        assert f"/corrupt/{name}.gz" in server.requests
        assert f"/tampered/{name}.gz" in server.requests
        assert (_raw(root) / f"{name}.gz").read_bytes() == path.read_bytes()


def test_recompressed_copy_is_accepted(server, tmp_path, raw_files):
    root = tmp_path / "root"
    download(root, mirrors=[f"{server.url}/recompressed/"])
    _assert_verified(root)
    for name, path in raw_files.items():
        got = (_raw(root) / f"{name}.gz").read_bytes()
        assert got != path.read_bytes()  # a different archive ...
        assert gzip.decompress(got) == gzip.decompress(path.read_bytes())  # ... of the same bytes
    images, labels = load_mnist(root, "test")
    assert images.shape == (10000, 28, 28) and int(labels[0]) == 7


def test_half_sent_file_and_non_http_server_are_skipped(server, tmp_path):
    root = tmp_path / "root"
    download(
        root, mirrors=[f"{server.url}/short/", f"{server.url}/garbage/", f"{server.url}/good/"]
    )
    _assert_verified(root)


def test_all_mirrors_bad_cli(server, tmp_path, run_cli, dead_mirror):
    root = tmp_path / "root"
    mirrors = [
        f"{server.url}/missing/",
        f"{server.url}/corrupt/",
        f"{server.url}/tampered/",
        f"{server.url}/garbage/",
        dead_mirror,
    ]
    args = [a for m in mirrors for a in ("--mirror", m)]
    done = run_cli("data", "download", "--root", root, *args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("mnistlab: error: could not download train-images-idx3-ubyte.gz")
    for mirror in mirrors:
        assert mirror.rstrip("/") + "/train-images-idx3-ubyte.gz" in line
    assert "HTTP 404" in line and "checksum mismatch" in line
    assert "by hand" in line and str(_raw(root)) in line
    # Nothing a later run could trust, and no leftovers at all.
    assert _listing(root) == []


def test_all_mirrors_bad_in_process_leaves_nothing(server, tmp_path, dead_mirror):
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(DownloadError) as err:
        download_file(
            "t10k-labels-idx1-ubyte",
            raw,
            MNIST.sha256["t10k-labels-idx1-ubyte"],
            [f"{server.url}/tampered/", dead_mirror],
        )
    assert "checksum mismatch" in str(err.value)
    assert "Connection refused" in str(err.value)
    assert list(raw.iterdir()) == []


def test_timeout_is_a_mirror_failure(tmp_path, monkeypatch):
    # A server that accepts the connection and never answers.
    monkeypatch.setattr(mdownload, "TIMEOUT_S", 0.5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        with pytest.raises(DownloadError, match="timed out"):
            name = "t10k-labels-idx1-ubyte"
            download_file(name, tmp_path, MNIST.sha256[name], [url])
    assert list(tmp_path.iterdir()) == []


def test_mirrors_env_var(server, tmp_path, monkeypatch, dead_mirror):
    monkeypatch.setenv("MNISTLAB_MIRRORS", f" {dead_mirror} , {server.url}/good/ ,")
    assert default_mirrors() == [dead_mirror, f"{server.url}/good/"]
    root = tmp_path / "root"
    download(root)
    _assert_verified(root)
    monkeypatch.delenv("MNISTLAB_MIRRORS")
    assert default_mirrors() == list(MNIST.mirrors)


def test_mirror_option_overrides_env(server, tmp_path, monkeypatch, dead_mirror):
    monkeypatch.setenv("MNISTLAB_MIRRORS", dead_mirror)
    root = tmp_path / "root"
    download(root, mirrors=[f"{server.url}/good/"])
    _assert_verified(root)


def test_present_but_corrupt_file_is_replaced(server, tmp_path, raw_files):
    root = tmp_path / "root"
    raw = _raw(root)
    raw.mkdir(parents=True)
    for name, path in raw_files.items():
        shutil.copyfile(path, raw / f"{name}.gz")
    # a damaged .gz, and an uncompressed file with the wrong content that would shadow its .gz
    good_train_labels = raw_files["train-labels-idx1-ubyte"].read_bytes()
    good_test_labels = raw_files["t10k-labels-idx1-ubyte"].read_bytes()
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(_corrupt(good_train_labels))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(_tampered(good_test_labels)))
    server.requests.clear()
    paths = download(root, mirrors=[f"{server.url}/good/"])
    # only the two bad files were fetched
    assert sorted(server.requests) == [
        "/good/t10k-labels-idx1-ubyte.gz",
        "/good/train-labels-idx1-ubyte.gz",
    ]
    _assert_verified(root)
    assert paths["t10k-labels-idx1-ubyte"] == raw / "t10k-labels-idx1-ubyte.gz"
    _, labels = load_mnist(root, "train")
    assert torch.bincount(labels).tolist()[:2] == [5923, 6742]


def test_load_mnist_download_fetches_missing(server, tmp_path, monkeypatch, raw_files):
    monkeypatch.setenv("MNISTLAB_MIRRORS", f"{server.url}/good/")
    root = tmp_path / "root"
    # one file already there: it is kept, the other three are fetched
    _raw(root).mkdir(parents=True)
    shutil.copyfile(raw_files["t10k-labels-idx1-ubyte"], _raw(root) / "t10k-labels-idx1-ubyte.gz")
    server.requests.clear()
    images, labels = load_mnist(root, "test", download=True)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert "/good/t10k-labels-idx1-ubyte.gz" not in server.requests
    assert "/good/t10k-images-idx3-ubyte.gz" in server.requests
    _assert_verified(root)


def test_load_without_download_does_not_fetch(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MNISTLAB_MIRRORS", f"{server.url}/good/")
    server.requests.clear()
    with pytest.raises(mdata.DataError, match="not found"):
        load_mnist(tmp_path, "test")
    assert server.requests == []
    assert not (tmp_path / "MNIST").exists()


def test_unwritable_root(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(mdata.DataError, match="cannot write to data root"):
        download(blocker / "sub", mirrors=["http://127.0.0.1:9/"])
    assert blocker.read_text() == "not a folder"


def test_complete_read_only_root_needs_no_write(tmp_path, raw_files, monkeypatch):
    """`data download` on a complete, verified root checks it without writing into it."""
    root = tmp_path / "root"
    _raw(root).mkdir(parents=True)
    for name, path in raw_files.items():
        shutil.copyfile(path, _raw(root) / f"{name}.gz")
    os.chmod(_raw(root), 0o555)  # root ignores this, so also watch the folder's mtime
    os.utime(_raw(root), ns=(10**18, 10**18))
    before = _raw(root).stat().st_mtime_ns
    try:
        paths = download(root, mirrors=["http://127.0.0.1:9/"])
    finally:
        os.chmod(_raw(root), 0o755)
    assert sorted(p.name for p in paths.values()) == ALL_GZ
    assert _raw(root).stat().st_mtime_ns == before
