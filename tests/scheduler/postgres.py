"""A throwaway PostgreSQL server on loopback, for the real-Airflow tests' metadata database.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary folder (trust authentication, UTF8, no fsync),
starts ``postgres`` by PID in its own process group on ``127.0.0.1`` and a free port, waits until it accepts
connections, creates the ``airflow`` database, and :meth:`PostgresServer.stop` shuts it down by PID (SIGINT, the
fast shutdown; SIGKILL of its group if it lingers) and deletes the folder. Durability is switched off: the data
lives only as long as the test session.

The binaries are the ones on ``PATH`` (``initdb``, ``postgres``), else the newest ``/usr/lib/postgresql/*/bin``
(where Debian's ``postgresql`` package puts them). PostgreSQL refuses to run as root, so as root ``initdb`` and
``postgres`` run as the ``postgres`` user (created as a system user if missing). :func:`available` says why
PostgreSQL cannot be used here, or ``None``.

Typical use (a session fixture)::

    server = PostgresServer().start()
    try:
        cluster = AirflowCluster(..., sql_alchemy_conn=server.url)
        ...
    finally:
        server.stop()
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from .harness import _group_alive, _killpg, free_port, tail

#: Searched after ``PATH``, newest version first.
DISTRO_BIN_GLOB = "/usr/lib/postgresql/*/bin"
#: The user ``initdb`` and ``postgres`` run as when the tests run as root (created if missing).
SERVICE_USER = "postgres"
FALLBACK_SERVICE_USER = "kluster-pg"
SUPERUSER = "postgres"
DATABASE = "airflow"
#: Airflow 3 supports PostgreSQL 13 and newer.
MIN_VERSION = 13


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: ``PATH`` first, else the newest distro folder."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        # initdb finds postgres next to its own (symlink-resolved) path, so use that folder.
        real = Path(initdb).resolve().parent
        return real if (real / "postgres").exists() else Path(initdb).parent

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name)) or (0,)

    for folder in sorted(glob.glob(DISTRO_BIN_GLOB), key=version, reverse=True):
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(Path(folder) / "postgres", os.X_OK):
            return Path(folder)
    return None


def server_version(bindir: Path) -> int | None:
    """The major version of ``bindir/postgres`` (``postgres (PostgreSQL) 15.14`` -> 15)."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(found.group(1)) if found else None


def available() -> str | None:
    """Why PostgreSQL cannot be used for the tests here (``None`` when it can)."""
    bindir = find_bindir()
    if bindir is None:
        return (
            f"no PostgreSQL server binaries: initdb and postgres are neither on PATH nor in {DISTRO_BIN_GLOB} "
            "(Debian: apt-get install postgresql)"
        )
    version = server_version(bindir)
    if version is None or version < MIN_VERSION:
        return f"{bindir / 'postgres'} is version {version}; Airflow needs PostgreSQL {MIN_VERSION} or newer"
    # Airflow's sync engine uses psycopg2; its async engine (3.x) turns postgresql:// into postgresql+asyncpg://.
    for module, package in (("psycopg2", "psycopg2-binary"), ("asyncpg", "asyncpg")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {package}; it is in the `test` extra)"
    return None


def _service_user() -> pwd.struct_passwd:
    """The account ``postgres`` runs as when we are root: ``postgres``, else a system user made for it."""
    for name in (SERVICE_USER, FALLBACK_SERVICE_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"]
        + [FALLBACK_SERVICE_USER],
        check=True,
        capture_output=True,
        text=True,
    )
    return pwd.getpwnam(FALLBACK_SERVICE_USER)


class PostgresServer:
    """One PostgreSQL server on ``127.0.0.1`` for the test session (see the module docstring).

    :param base_dir: where the temporary folder (data, socket, log) is made; ``None``: the system's temp dir.
        As root it must be reachable by the service user, which pytest's ``tmp_path`` (mode 0700) is not.
    :param keep: leave the folder behind after :meth:`stop` (to read the log).
    """

    def __init__(self, base_dir: Path | str | None = None, *, keep: bool = False, timeout: float = 60.0):
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.keep = keep
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.bindir: Path | None = None
        self.version: int | None = None
        self._account: pwd.struct_passwd | None = None

    # -- paths -----------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self._root / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root / "socket"

    @property
    def log_path(self) -> Path:
        return self._root / "postgres.log"

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise RuntimeError("the server was not started")
        return self.root

    def url_for(self, database: str = DATABASE, driver: str = "psycopg2") -> str:
        """SQLAlchemy URL of ``database`` on this server (no password: trust authentication)."""
        if self.port is None:
            raise RuntimeError("the server was not started")
        return f"postgresql+{driver}://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """``postgresql+psycopg2://postgres@127.0.0.1:<port>/airflow``."""
        return self.url_for(DATABASE)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> PostgresServer:
        """initdb, start, wait until it answers, create the ``airflow`` database. Stops everything on failure."""
        reason = available()
        if reason:
            raise RuntimeError(f"cannot start PostgreSQL: {reason}")
        self.bindir = find_bindir()
        assert self.bindir is not None
        self.version = server_version(self.bindir)
        self.root = Path(tempfile.mkdtemp(prefix="kluster-pg-", dir=self.base_dir))
        try:
            self._prepare_dirs()
            self._initdb()
            for attempt in range(3):  # the free port may be taken by someone else before postgres binds it
                self.port = free_port(self.host)
                logged = self.log_path.stat().st_size
                self._spawn()
                if self._wait_ready():
                    break
                with open(self.log_path, "rb") as fh:
                    fh.seek(logged)
                    port_taken = b"could not bind" in fh.read()
                if attempt == 2 or not port_taken:
                    raise RuntimeError(
                        f"PostgreSQL exited {self.proc and self.proc.returncode}: {self.details()}"
                    )
            self.create_database(DATABASE)
        except BaseException:
            self.stop()
            raise
        return self

    def _popen(self, cmd: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own process group, as the service user when we are root, logging to ``log``."""
        account = self._account
        return subprocess.Popen(
            cmd,
            env=self._env(),
            cwd=self._root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=None if account is None else account.pw_uid,
            group=None if account is None else account.pw_gid,
            extra_groups=None if account is None else [],
        )

    def _env(self) -> dict[str, str]:
        # No PG* of the caller's (PGDATA, PGPORT, ...) and a locale that always exists.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.startswith("LC_")}
        env["LANG"] = "C"
        return env

    def _prepare_dirs(self) -> None:
        self.socket_dir.mkdir(mode=0o700)
        self.log_path.touch(mode=0o600)
        if os.geteuid() == 0:
            self._account = _service_user()
            for path in (self._root, self.socket_dir, self.log_path):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _initdb(self) -> None:
        assert self.bindir is not None
        cmd = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER]
        cmd += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        with open(self.log_path, "ab") as log:
            proc = self._popen(cmd, log)
        try:
            returncode = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise TimeoutError(
                f"initdb did not finish within {self.timeout:.0f}s: {self.details()}"
            ) from None
        if returncode != 0:
            raise RuntimeError(f"initdb exited {returncode}: {self.details()}")

    def _spawn(self) -> None:
        assert self.bindir is not None
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-h", self.host, "-p", str(self.port)]
        cmd += ["-k", str(self.socket_dir)]
        for setting in (
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=200",
        ):
            cmd += ["-c", setting]
        with open(self.log_path, "ab") as log:
            self.proc = self._popen(cmd, log)

    def _wait_ready(self) -> bool:
        """Wait until the server accepts connections: ``True``; ``False`` if it exited first.

        :raises TimeoutError: when it neither answers nor exits within ``timeout``.
        """
        import psycopg2  # type: ignore[import-untyped]

        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                psycopg2.connect(self._dsn("postgres"), connect_timeout=5).close()
                return True
            except psycopg2.OperationalError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(
            f"PostgreSQL did not accept connections on {self.host}:{self.port} within {self.timeout:.0f}s "
            f"(last error: {last}): {self.details()}"
        )

    def _dsn(self, database: str) -> str:
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its SQLAlchemy URL."""
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(self._dsn("postgres"), connect_timeout=10)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.url_for(name)

    def stop(self, grace: float = 30.0) -> None:
        """Fast shutdown by PID (SIGINT), SIGKILL of its process group after ``grace``; delete the folder."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)  # the postmaster's "fast" shutdown: backends end at once
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # Backends and helpers share its group; none should outlive the postmaster.
            deadline = time.monotonic() + 5
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_alive(proc.pid):
                _killpg(proc.pid, signal.SIGKILL)
        if self.root is not None and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def details(self, lines: int = 40) -> str:
        """The tail of the server's log, for error messages."""
        return f"\n===== {self.log_path} =====\n{tail(self.log_path, lines)}"

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
