"""A real PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` in a temp dir on a free loopback port.

Debian's ``postgresql`` package (15) puts its binaries under /usr/lib/postgresql/15/bin. The server
refuses to run as root, so as root we run it as the ``postgres`` user (or ``nobody``) in a temp dir
that user owns. Missing binaries FAIL the test (CI installs them: .ci/run) — they are never a skip.

Fixtures (import them into a test module or a conftest):

* ``postgres_server`` (session): one server per test process (each xdist worker has its own);
* ``pg_url`` (module): a fresh, empty database on it for each test module, as a URL
  ``postgresql://USER@127.0.0.1:PORT/DB``.

``PostgresServer.restart()`` (and ``stop()``/``start()``) is the fault the registry tests inject:
the same port and data dir, so a writer that reconnects finds what it committed.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers.broker import free_port


def pg_bindir() -> str:
    """The directory holding initdb/pg_ctl, or fail loudly (apt-get install -y postgresql)."""
    cands = [os.environ.get("EDGEFLEET_PG_BINDIR", "")]
    cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    which = shutil.which("initdb")
    if which:
        cands.append(os.path.dirname(which))
    for d in cands:
        if d and os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install -y postgresql "
                "(the registry tests run against a real server; .ci/run installs it)")


def _run_as() -> str | None:
    """The user to run the server as: None when we are not root, else ``postgres`` or ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.fail("running as root and there is neither a `postgres` nor a `nobody` user to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster in its own temp dir, listening on 127.0.0.1:``port`` only."""

    def __init__(self, port: int | None = None) -> None:
        self.bindir = pg_bindir()
        self.user = _run_as()
        self.superuser = self.user or pwd.getpwuid(os.geteuid()).pw_name
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = port or free_port()
        self._started = port is not None
        if self.user:
            self.root.chmod(0o755)
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._cmd("mkdir", "-p", str(self.sock))
        self._cmd(os.path.join(self.bindir, "initdb"), "-D", str(self.data), "-U", self.superuser,
                  "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        # test settings: fast, small, no fsync (a process crash keeps what the kernel has: enough for
        # the restart faults; synchronous_commit stays on so "committed" means what it says)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.sock}'\n"
                    "fsync = off\nfull_page_writes = off\nshared_buffers = 32MB\nmax_connections = 60\n"
                    "logging_collector = off\n")

    def _cmd(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = ["runuser", "-u", self.user, "--", *args] if self.user else list(args)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}\n"
                               f"{self.log.read_text() if self.log.exists() else ''}")
        return res

    @property
    def dsn_base(self) -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}"

    def url(self, dbname: str = "postgres") -> str:
        return f"{self.dsn_base}/{dbname}"

    def start(self) -> "PostgresServer":
        # a free port can be taken by another test process before the server binds it: on the first
        # start pick another; a restart keeps its port (clients reconnect to the same address)
        for attempt in range(5):
            res = self._cmd(os.path.join(self.bindir, "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                            "-w", "-t", "60", "-o", f"-p {self.port}", "start", check=False)
            if res.returncode == 0:
                self._started = True
                return self
            if self._started or attempt == 4:
                raise RuntimeError(f"pg_ctl start failed on port {self.port}: {res.stderr.strip()}\n"
                                   f"{self.log.read_text() if self.log.exists() else ''}")
            self.port = free_port()
        return self

    def stop(self, mode: str = "fast") -> None:
        self._cmd(os.path.join(self.bindir, "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60",
                  "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """Stop (``fast``: clients are disconnected; ``immediate``: a crash) and start again, same port."""
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._cmd(os.path.join(self.bindir, "pg_ctl"), "-D", str(self.data), "status",
                         check=False).returncode == 0

    def create_database(self, prefix: str = "t") -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}".lower()
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as c:
                    c.execute(f'CREATE DATABASE "{name}"')
                return self.url(name)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL for this test process (FAILS, never skips, when it is not installed)."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def pg_url(postgres_server: PostgresServer, request) -> str:
    """A fresh database per test module on the session's server."""
    mod = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "")[:20]
    return postgres_server.create_database("".join(ch if ch.isalnum() else "_" for ch in mod) or "t")


@pytest.fixture(params=["sqlite", "postgres"])
def registry_url(request, tmp_path) -> str:
    """One store test, both backends: an SQLite file in the test's tmp dir, or a fresh PostgreSQL
    database on the session's server (started only when a test asks for this variant)."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database("reg")
