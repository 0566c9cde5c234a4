"""Shared fixtures: the real MNIST root (read-only), an isolated decode cache, CLI runners, one
thread for a test module."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    # The folder's own mtime catches a file created and deleted again (e.g. a write probe).
    out = {".": (folder.stat().st_mtime_ns, "mtime")}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            out[p.name] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[p.name] = (-1, "dir")
    return out


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide environment for this process and every subprocess it starts.

    MNISTLAB_CACHE: a private decode cache unless the caller chose one.
    MNISTLAB_MIRRORS: a closed local port unless the caller chose mirrors, so nothing in a test
    ever reaches the public mirrors; tests that download name their own mirrors.
    """
    defaults = {
        "MNISTLAB_CACHE": str(tmp_path_factory.mktemp("mnistlab-cache")),
        "MNISTLAB_MIRRORS": "http://127.0.0.1:9/",
    }
    added = [key for key in defaults if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    yield
    for key in added:
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real MNIST root ($MNISTLAB_DATA, else ../shared/datasets). Tests never write to it."""
    root = Path(os.environ.get("MNISTLAB_DATA") or DEFAULT_DATA)
    raw = root / "MNIST" / "raw"
    missing = [
        name
        for name in MNIST_FILES
        if not (raw / name).is_file() and not (raw / f"{name}.gz").is_file()
    ]
    if missing:
        pytest.fail(
            f"real MNIST files missing under {raw}: {', '.join(missing)}; "
            "set MNISTLAB_DATA to a root that holds MNIST/raw",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def raw_files(data_root: Path) -> dict[str, Path]:
    """name (without .gz) -> path of each real file."""
    raw = data_root / "MNIST" / "raw"
    return {
        name: (raw / name) if (raw / name).is_file() else (raw / f"{name}.gz")
        for name in MNIST_FILES
    }


@pytest.fixture(scope="session", autouse=True)
def _shared_data_untouched(request: pytest.FixtureRequest):
    """Fail the session if anything wrote into the real data root's raw folder."""
    root = Path(os.environ.get("MNISTLAB_DATA") or DEFAULT_DATA) / "MNIST" / "raw"
    if not root.is_dir():
        yield
        return
    before = _snapshot(root)
    yield
    after = _snapshot(root)
    assert after == before, f"tests modified the shared data folder {root}"


@pytest.fixture(scope="session")
def run_cli():
    """run_cli(*args, env=None, timeout=120) -> CompletedProcess of `python -m mnistlab ...`.

    `env` entries are added to (a copy of) the test process's environment; a value of None
    removes that variable.
    """

    def run(
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        timeout: float = 120,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        return subprocess.run(
            [sys.executable, "-m", "mnistlab", *map(str, args)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=cwd,
        )

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    deterministic reductions, and no fight over the shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys):
    """`mnistlab ARGS...` in this process (no start-up cost): returncode, stdout, stderr."""
    from mnistlab.cli import main

    def run(*args: object) -> SimpleNamespace:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return SimpleNamespace(
            returncode=code if isinstance(code, int) else int(bool(code)), stdout=out, stderr=err
        )

    return run


# ---- a real PostgreSQL server --------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries: Debian's /usr/lib/postgresql/N/bin, else PATH."""
    import shutil

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)  # fmt: skip
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A PostgreSQL server of our own in a temporary folder, on a free loopback port."""

    def __init__(self, bindir: Path) -> None:
        import pwd
        import socket
        import tempfile

        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="mnistlab-pg-"))  # /tmp: postgres can enter
        # The server refuses to run as root: as root, run it as the `postgres` user.
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.data = self.folder / "data"
        self.databases = 0

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=timeout)

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
                   "-c fsync=off -c max_connections=40")  # fmt: skip
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.folder / "server.log"), "-w", "-t", "30", "-o", options, "start")

    def stop(self) -> None:
        import shutil

        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                      "-t", "30", "stop")  # fmt: skip
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg2

        self.databases += 1
        name = f"mnistlab_{self.databases}"
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname="postgres", connect_timeout=10)  # fmt: skip
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return self.url(name)


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (Debian's `postgresql` package; `.ci/run`
    installs it), listening on 127.0.0.1 only, stopped and deleted afterwards."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.fail("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: "
                    "apt-get install postgresql", pytrace=False)  # fmt: skip
    server = PostgresServer(bindir)
    try:
        server.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log = server.folder / "server.log"
        detail = log.read_text()[-2000:] if log.is_file() else getattr(e, "stderr", b"")
        server.stop()
        pytest.fail(f"could not start PostgreSQL: {e}\n{detail}", pytrace=False)
    yield server
    server.stop()
