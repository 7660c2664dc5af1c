"""Run a real Airflow (scheduler, triggerer, dag-processor, api-server) on loopback for end-to-end tests.

Everything is started by PID in its own process group, logs go to files under ``<home>/proc-logs``, and
:meth:`AirflowCluster.stop` always terminates every group it started (SIGTERM, then SIGKILL after a grace
period). The executor is the LocalExecutor. The metadata database is ``sql_alchemy_conn`` (the session fixture
passes a throwaway PostgreSQL server of :mod:`.postgres`); without one it is SQLite in the cluster's own
``AIRFLOW_HOME``, which needs no service outside this machine's Python environment.

A component may be started more than once under suffixed names: ``"triggerer-2"`` runs the same
``airflow triggerer`` as ``"triggerer"``, so a cluster can have two triggerers that take over each other's
triggers; :meth:`AirflowCluster.trigger_owner` tells which one runs a deferred task's trigger, and
:meth:`AirflowCluster.pause` / :meth:`AirflowCluster.resume` freeze and thaw one component's whole process group
(SIGSTOP / SIGCONT), a hung process rather than a dead one.

Typical use (a session- or module-scoped fixture)::

    cluster = AirflowCluster(
        home=tmp / "airflow",
        dags_folder=tmp / "dags",
        env={"AIRFLOW_CONN_X": "..."},
        sql_alchemy_conn=postgres.url,  # None: SQLite
        components=("api-server", "scheduler", "triggerer", "triggerer-2", "dag-processor"),
    )
    try:
        cluster.start()  # migrate, start the processes, wait until every component reports healthy
        run_id = cluster.api.trigger_run("my_dag")
        cluster.api.wait_for_ti_state("my_dag", run_id, "task", "deferred")
        cluster.restart("triggerer")
        ...
    finally:
        cluster.stop()

The REST helpers (:class:`AirflowAPI`, ``cluster.api``) talk to the api-server's public API v2; with
``simple_auth_manager_all_admins`` no token is needed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

if TYPE_CHECKING:
    from airflow_provider_kluster.emulator.server import EmulatorServer

#: Component kind -> ``airflow`` sub-command (the api-server gets its host and port appended). A component's name
#: is its kind, optionally with a ``-<n>`` suffix for a second process of the same kind (``triggerer-2``).
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
}
#: Component kind -> key in ``GET /api/v2/monitor/health`` (which reports only the latest heartbeat of a kind).
HEALTH_KEYS = {"scheduler": "scheduler", "triggerer": "triggerer", "dag-processor": "dag_processor"}
#: Component kind -> ``job.job_type`` of its rows in the metadata database.
JOB_TYPES = {"scheduler": "SchedulerJob", "triggerer": "TriggererJob", "dag-processor": "DagProcessorJob"}
#: The environment variable choosing the session cluster's metadata database: ``postgresql`` (default) or ``sqlite``.
DB_ENV = "KLUSTER_TEST_DB"
DB_KINDS = ("postgresql", "sqlite")

TERMINAL_TI_STATES = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})


def component_kind(name: str) -> str:
    """``"triggerer-2"`` -> ``"triggerer"``; a name without a ``-<n>`` suffix is its own kind.

    :raises ValueError: for a name of no known kind.
    """
    kind = re.sub(r"-\d+$", "", name)
    if kind not in COMPONENTS:
        raise ValueError(
            f"unknown component {name!r}; choose from {sorted(COMPONENTS)} (or e.g. 'triggerer-2')"
        )
    return kind


def requested_db_kind() -> str:
    """The metadata database asked for by ``$KLUSTER_TEST_DB``: ``"postgresql"`` (default) or ``"sqlite"``.

    Known at import time, so usable in ``skipif`` marks; a running cluster tells its own in ``cluster.db_kind``.
    """
    value = os.environ.get(DB_ENV, "").strip().lower() or "postgresql"
    value = {"postgres": "postgresql", "pg": "postgresql"}.get(value, value)
    if value not in DB_KINDS:
        raise ValueError(f"{DB_ENV}={os.environ[DB_ENV]!r}: choose one of {', '.join(DB_KINDS)}")
    return value


def db_kind_of(url: str) -> str:
    """``"postgresql+psycopg2://..."`` -> ``"postgresql"``, ``"sqlite:///..."`` -> ``"sqlite"``."""
    return url.split(":", 1)[0].split("+", 1)[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    *,
    interval: float = 0.5,
    what: str = "condition",
    on_timeout: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it.

    :raises TimeoutError: after ``timeout`` seconds, naming ``what`` and, if given, ``on_timeout()``'s details.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            details = on_timeout() if on_timeout else ""
            raise TimeoutError(f"Timed out after {timeout:.0f}s waiting for {what}. {details}".rstrip())
        time.sleep(interval)


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, errors="replace") as fh:
            return "".join(collections.deque(fh, maxlen=lines))
    except FileNotFoundError:
        return ""


class AirflowAPIError(RuntimeError):
    """A REST call to the api-server answered with an error status."""


class AirflowAPI:
    """Small client of the Airflow 3 REST API v2 (``/api/v2``) for tests.

    :param base_url: ``http://127.0.0.1:<port>`` of the api-server.
    :param token: a bearer token, if the auth manager needs one (not with ``simple_auth_manager_all_admins``).
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    # -- plumbing -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, ok: Iterable[int] = (200,), **kwargs: Any) -> Any:
        """Call ``/api/v2<path>``; return the decoded JSON (or ``None`` for an empty body).

        :raises AirflowAPIError: when the status is not in ``ok``.
        """
        response = self.client.request(method, f"/api/v2{path}", **kwargs)
        if response.status_code not in tuple(ok):
            raise AirflowAPIError(f"{method} {path} answered {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    @staticmethod
    def _q(value: str) -> str:
        return quote(value, safe="")

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any] | None:
        """``GET /api/v2/monitor/health``, or ``None`` while the api-server does not answer."""
        try:
            response = self.client.get("/api/v2/monitor/health", timeout=5)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return response.json()

    # -- DAGs -----------------------------------------------------------------------------------------
    def get_dag(self, dag_id: str) -> dict[str, Any] | None:
        """The DAG, or ``None`` while it is not parsed yet."""
        try:
            return self.request("GET", f"/dags/{self._q(dag_id)}")
        except AirflowAPIError as exc:
            if " answered 404" in str(exc):
                return None
            raise

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``."""
        return wait_until(lambda: self.get_dag(dag_id), timeout, what=f"DAG {dag_id} to be parsed")

    def set_paused(self, dag_id: str, paused: bool) -> dict[str, Any]:
        return self.request("PATCH", f"/dags/{self._q(dag_id)}", json={"is_paused": paused})

    def unpause(self, dag_id: str) -> dict[str, Any]:
        return self.set_paused(dag_id, False)

    # -- DAG runs ---------------------------------------------------------------------------------
    def trigger_run(
        self, dag_id: str, *, run_id: str | None = None, conf: Mapping[str, Any] | None = None
    ) -> str:
        """Trigger a manual run now; return its run id."""
        run_id = run_id or f"test__{int(time.time() * 1000)}_{secrets.token_hex(3)}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": dict(conf or {})}
        run = self.request("POST", f"/dags/{self._q(dag_id)}/dagRuns", json=body)
        return run["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}")

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> dict[str, Any]:
        """Mark a whole run ``success``/``failed``/``queued`` (what the UI's run buttons do)."""
        return self.request(
            "PATCH", f"/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}", json={"state": state}
        )

    # -- task instances ------------------------------------------------------------------------------
    def _ti_path(self, dag_id: str, run_id: str, task_id: str) -> str:
        return f"/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}/taskInstances/{self._q(task_id)}"

    def ti(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return self.request("GET", self._ti_path(dag_id, run_id, task_id))

    def ti_state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        return self.ti(dag_id, run_id, task_id).get("state")

    def wait_for_ti_state(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        states: str | Iterable[str],
        timeout: float = 120.0,
        *,
        fail_on_terminal: bool = True,
    ) -> dict[str, Any]:
        """Wait until the task instance is in one of ``states``; return it.

        :param fail_on_terminal: raise at once if the TI reaches a terminal state not asked for.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        seen: list[str | None] = []

        def check() -> dict[str, Any] | None:
            ti = self.ti(dag_id, run_id, task_id)
            state = ti.get("state")
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in wanted:
                return ti
            if fail_on_terminal and state in TERMINAL_TI_STATES:
                raise AssertionError(
                    f"{dag_id}.{task_id} ({run_id}) ended {state!r} while waiting for {sorted(wanted)}; "
                    f"states seen: {seen}"
                )
            return None

        return wait_until(
            check,
            timeout,
            what=f"{dag_id}.{task_id} ({run_id}) to be {sorted(wanted)}",
            on_timeout=lambda: f"States seen: {seen}.",
        )

    def set_ti_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> Any:
        """Mark one task instance (``failed``, ``success``, ``skipped``) as the UI does."""
        return self.request("PATCH", self._ti_path(dag_id, run_id, task_id), json={"new_state": state})

    def clear_ti(self, dag_id: str, run_id: str, task_ids: str | Iterable[str], **options: Any) -> Any:
        """Clear task instances of one run (as the UI's "Clear" does); they are scheduled again."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        body = {
            "dag_run_id": run_id,
            "task_ids": ids,
            "dry_run": False,
            "only_failed": False,
            "reset_dag_runs": True,
            **options,
        }
        return self.request("POST", f"/dags/{self._q(dag_id)}/clearTaskInstances", json=body)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """An XCom value of the task instance (``None`` if absent)."""
        try:
            entry = self.request(
                "GET",
                f"{self._ti_path(dag_id, run_id, task_id)}/xcomEntries/{self._q(key)}",
                params={"deserialize": "true", "stringify": "false"},
            )
        except AirflowAPIError as exc:
            if " answered 404" in str(exc):
                return None
            raise
        return entry.get("value")


class AirflowCluster:
    """Airflow's processes on loopback: api-server, scheduler, triggerer(s) and dag-processor.

    :param home: a fresh, empty ``AIRFLOW_HOME`` (created if missing; holds every log, and the SQLite DB).
    :param dags_folder: the DAGs the dag-processor parses.
    :param env: extra environment for every process (connections ``AIRFLOW_CONN_*``, config overrides).
        The test process's own ``AIRFLOW*`` and ``PYTEST*`` variables are never inherited.
    :param components: which processes :meth:`start` runs, by name: a kind of :data:`COMPONENTS`, optionally
        suffixed ``-<n>`` to run another process of that kind (``"triggerer-2"``).
    :param python: the interpreter whose ``airflow`` runs (``python -m airflow``).
    :param sql_alchemy_conn: the metadata database's SQLAlchemy URL (an empty database; :meth:`start` migrates
        it). ``None``: SQLite at ``<home>/airflow.db``.
    """

    def __init__(
        self,
        home: Path | str,
        dags_folder: Path | str,
        env: Mapping[str, str] | None = None,
        *,
        components: Iterable[str] = ("api-server", "scheduler", "triggerer", "dag-processor"),
        python: str = sys.executable,
        host: str = "127.0.0.1",
        port: int | None = None,
        sql_alchemy_conn: str | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.components = list(components)
        for name in self.components:
            component_kind(name)
        if len(set(self.components)) != len(self.components):
            raise ValueError(f"components named twice: {self.components}")
        self.sql_alchemy_conn = sql_alchemy_conn or f"sqlite:///{self.home / 'airflow.db'}"
        #: ``"postgresql"`` or ``"sqlite"``: the metadata database's kind, for tests whose expectations differ.
        self.db_kind = db_kind_of(self.sql_alchemy_conn)
        self.python = python
        self.host = host
        self.port = port or free_port(host)
        self.base_url = f"http://{host}:{self.port}"
        self.log_dir = self.home / "proc-logs"
        self.extra_env = dict(env or {})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_files: dict[str, Path] = {}
        self._starts: collections.Counter[str] = collections.Counter()
        self._paused: set[str] = set()
        self._start_log: list[tuple[float, str]] = []  # (epoch, name) of every start_component
        self._db_engine: Any = None
        self.api = AirflowAPI(self.base_url)

    # -- environment ------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment every Airflow process of this cluster gets."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTEST", "_AIRFLOW"))}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "8",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__HOST": self.host,
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                # One secret for every process: task tokens are signed by the scheduler, checked by the api-server.
                "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt"),
                "AIRFLOW__API__SECRET_KEY": self._secret("api"),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def _secret(self, name: str) -> str:
        attr = f"_secret_{name}"
        if not hasattr(self, attr):
            setattr(self, attr, secrets.token_hex(32))
        return getattr(self, attr)

    # -- CLI --------------------------------------------------------------------------------------
    def airflow(
        self, *args: str, timeout: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one ``airflow`` CLI command with the cluster's environment; return its result."""
        result = subprocess.run(
            [self.python, "-m", "airflow", *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> AirflowCluster:
        """Migrate the DB, start every component, wait until all are healthy. Stops everything on failure."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.airflow("db", "migrate")
            started = time.time()
            previous: dict[str, str] = {}
            for name in self.components:
                kind = component_kind(name)
                if kind in previous:
                    # The second of a kind starts once the first has its job row: jobs map to components by
                    # start time (see job_id), which two processes starting together would make ambiguous.
                    first = previous[kind]

                    def has_job(first: str = first) -> bool:
                        self.check_alive()
                        return self.job_id(first) is not None

                    wait_until(has_job, timeout, what=f"{first} to create its job", on_timeout=self.describe)
                previous[kind] = name
                self.start_component(name)
            # heartbeat_after: with two components of a kind, each must have its own job heartbeating.
            self.wait_healthy(timeout, heartbeat_after=started)
        except BaseException:
            print(self.describe(), file=sys.stderr)
            self.stop()
            raise
        return self

    def start_component(self, name: str) -> subprocess.Popen[bytes]:
        """Start one component (in its own process group), logging to ``proc-logs/<name>.<n>.log``."""
        kind = component_kind(name)
        if self.is_running(name):
            raise RuntimeError(f"{name} is already running (pid {self.procs[name].pid})")
        self._starts[name] += 1
        self._start_log.append((time.time(), name))
        log_path = self.log_dir / f"{name}.{self._starts[name]}.log"
        cmd = [self.python, "-m", "airflow", *COMPONENTS[kind]]
        if kind == "api-server":
            cmd += ["--host", self.host, "--port", str(self.port), "--workers", "1"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        self._log_files[name] = log_path
        self._paused.discard(name)
        return proc

    def stop_component(self, name: str, grace: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the component's whole process group, SIGKILL it after ``grace`` seconds; return its exit code.

        A paused component is resumed right after the signal, so that it can act on it.
        """
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        paused = name in self._paused
        self._paused.discard(name)
        return _terminate_group(proc, grace=grace, sig=sig, resume=paused)

    def pause(self, name: str) -> None:
        """Freeze a component's whole process group (SIGSTOP): a hung process, not a dead one.

        Every process of the group stops: the triggerer's trigger-runner child, the scheduler's executor workers
        and task supervisors. Its job's heartbeat stops too, so after the health-check threshold another
        component of the kind (a second triggerer) takes its work over. :meth:`resume` lets it go on.
        """
        _killpg(self._pgid(name), signal.SIGSTOP)
        self._paused.add(name)

    def resume(self, name: str) -> None:
        """Let a paused component's process group go on (SIGCONT), after :meth:`pause`."""
        _killpg(self._pgid(name), signal.SIGCONT)
        self._paused.discard(name)

    def is_paused(self, name: str) -> bool:
        return name in self._paused and self.is_running(name)

    def _pgid(self, name: str) -> int:
        pid = self.pid(name)
        try:
            return os.getpgid(pid)
        except ProcessLookupError:
            return pid  # started with start_new_session: the group id is the leader's pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Kill a component abruptly (default ``kill -9`` of its process group), as a crash would."""
        return self.stop_component(name, grace=5.0, sig=sig)

    def restart(self, name: str, *, grace: float = 15.0, wait: bool = True, timeout: float = 120.0) -> None:
        """Stop then start one component; with ``wait``, return once it reports healthy again."""
        self.stop_component(name, grace=grace)
        started = time.time()
        self.start_component(name)
        if wait:
            self.wait_healthy(timeout, components=[name], heartbeat_after=started)

    def stop(self, grace: float = 15.0) -> None:
        """Stop every component (SIGTERM, then SIGKILL after ``grace``); safe to call twice."""
        # Producers of work first, the api-server (which running tasks talk to) last.
        order = ["scheduler", "dag-processor", "triggerer", "api-server"]
        for name in sorted(self.procs, key=lambda n: order.index(component_kind(n))):
            try:
                self.stop_component(name, grace=grace)
            except Exception as exc:  # pragma: no cover - keep stopping the others
                print(f"could not stop {name}: {exc!r}", file=sys.stderr)
        self.api.close()
        if self._db_engine is not None:
            self._db_engine.dispose()
            self._db_engine = None

    def __enter__(self) -> AirflowCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state --------------------------------------------------------------------------------------
    def pid(self, name: str) -> int:
        """PID of a running component's main process."""
        proc = self.procs.get(name)
        if proc is None:
            raise KeyError(f"{name} is not running")
        return proc.pid

    def is_running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def descendants(self, name: str) -> list[int]:
        """PIDs of every live process below a component's main process (Linux ``/proc``)."""
        return descendants_of(self.pid(name))

    def task_process(self, ti_id: str) -> int | None:
        """PID of the process running task instance ``ti_id`` under the scheduler's LocalExecutor, if any.

        The executor's worker forks a supervisor, which forks the task runner; the runner retitles itself
        ``airflow worker -- <ti uuid>`` (setproctitle) once it has the task instance to run.
        """
        title = f"airflow worker -- {ti_id}"
        for pid in self.descendants("scheduler"):
            if process_cmdline(pid).startswith(title):
                return pid
        return None

    def check_alive(self) -> None:
        """Raise if a started component exited."""
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"Airflow components exited: {dead}\n{self.describe()}")

    def wait_healthy(
        self,
        timeout: float = 180.0,
        *,
        components: Iterable[str] | None = None,
        heartbeat_after: float | None = None,
    ) -> dict[str, Any]:
        """Wait until the api-server answers and each given component's job reports ``healthy``.

        :param heartbeat_after: epoch seconds; also require a heartbeat newer than this (after a restart, the
            previous process's last heartbeat can still count as healthy for a while). The health endpoint
            reports only the newest heartbeat of each kind, so when the cluster runs two components of a kind
            (``triggerer``, ``triggerer-2``) this also waits until each given one's own job (:meth:`job`)
            heartbeats after ``heartbeat_after``.
        """
        names = [n for n in (components or self.components) if component_kind(n) in HEALTH_KEYS]
        kinds = sorted({component_kind(n) for n in names})
        # Components whose kind has more than one process in this cluster: their own job rows are checked.
        shared = [
            n for n in names if sum(component_kind(o) == component_kind(n) for o in self.components) > 1
        ]

        def healthy() -> dict[str, Any] | None:
            self.check_alive()
            health = self.api.health()
            if not health or health.get("metadatabase", {}).get("status") != "healthy":
                return None
            for kind in kinds:
                entry = health.get(HEALTH_KEYS[kind]) or {}
                if entry.get("status") != "healthy":
                    return None
                if heartbeat_after is not None:
                    beat = _heartbeat_epoch(entry)
                    if beat is None or beat < heartbeat_after:
                        return None
            if heartbeat_after is not None:
                for name in shared:
                    job = self.job(name)
                    if job is None or (job["latest_heartbeat"] or 0) < heartbeat_after:
                        return None
            return health

        return wait_until(
            healthy,
            timeout,
            interval=1.0,
            what=f"Airflow components {names} to be healthy",
            on_timeout=lambda: f"Last health: {self.api.health()}\n{self.describe()}",
        )

    # -- the metadata database ------------------------------------------------------------------------
    def db_rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Rows of one read-only SQL query on the metadata database (SQLAlchemy ``text()``, ``:name`` params)."""
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._db_engine is None:
            self._db_engine = sqlalchemy.create_engine(self.sql_alchemy_conn, poolclass=NullPool)
        with self._db_engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sqlalchemy.text(sql), params)]

    def _jobs(self, kind: str) -> list[dict[str, Any]]:
        """The ``job`` rows of a component kind, oldest first, times as epoch seconds ([] if unreadable)."""
        try:
            rows = self.db_rows(
                "SELECT id, state, start_date, latest_heartbeat FROM job WHERE job_type = :job_type ORDER BY id",
                job_type=JOB_TYPES[component_kind(kind)],
            )
        except Exception as exc:  # the database being busy is "not yet", never a failure of a wait
            print(f"could not read the job table: {exc!r}", file=sys.stderr)
            return []
        return [
            {"id": i, "state": state, "start_date": _epoch(start), "latest_heartbeat": _epoch(beat)}
            for i, state, start, beat in rows
        ]

    def job(self, name: str) -> dict[str, Any] | None:
        """The ``job`` row of a running component's current process (``None`` until it made one).

        The table does not say which process a job belongs to, so jobs map to components by start time: the
        first job of the kind started after this process was, and before the next component of the kind was
        started. :meth:`start` staggers two components of a kind for that; start them one at a time likewise.
        """
        kind = component_kind(name)
        if kind not in JOB_TYPES or not self.is_running(name):
            return None
        starts = [(t, n) for t, n in self._start_log if component_kind(n) == kind]
        mine = max(i for i, (_, n) in enumerate(starts) if n == name)
        since = starts[mine][0]
        until = starts[mine + 1][0] if mine + 1 < len(starts) else float("inf")
        for job in self._jobs(kind):
            if job["start_date"] is not None and since <= job["start_date"] < until:
                return job
        return None

    def job_id(self, name: str) -> int | None:
        """Id of the running component's current job (what ``trigger.triggerer_id`` names), if it has one."""
        job = self.job(name)
        return None if job is None else job["id"]

    def component_of_job(self, job_id: int) -> str | None:
        """Which running component's current process has job ``job_id`` (``None``: an exited process's)."""
        for name in self.procs:
            if component_kind(name) in JOB_TYPES and self.job_id(name) == job_id:
                return name
        return None

    def trigger_owner(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str | None:
        """The triggerer (component name) running the deferred task's trigger now.

        ``None`` while the trigger is unassigned, or assigned to a triggerer process that is gone (a killed one
        keeps its triggers until its heartbeat is older than ``triggerer_health_check_threshold``).
        """
        rows = self.db_rows(
            "SELECT t.triggerer_id FROM task_instance ti JOIN trigger t ON t.id = ti.trigger_id"
            " WHERE ti.dag_id = :dag_id AND ti.run_id = :run_id AND ti.task_id = :task_id"
            " AND ti.map_index = :map_index",
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            map_index=map_index,
        )
        if not rows or rows[0][0] is None:
            return None
        return self.component_of_job(rows[0][0])

    # -- logs ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def report_on_failure(self, *, dag_id: str | None = None, extra: Callable[[], str] | None = None) -> Any:
        """On any exception inside the block, print the process and task log tails (and ``extra()``)."""
        try:
            yield self
        except BaseException:
            report = self.describe(dag_id=dag_id)
            if extra is not None:
                try:
                    report += f"\n===== extra =====\n{extra()}"
                except Exception as exc:  # pragma: no cover
                    report += f"\n(extra report failed: {exc!r})"
            print(report, file=sys.stderr)
            raise

    def log_path(self, name: str) -> Path:
        return self._log_files[name]

    def mentions(self, *needles: str, limit: int = 40) -> str:
        """Lines of every component's and task's log holding any of ``needles``, last ``limit``, for reports.

        Put first in a timeout's message, they survive where a CI log keeps only the head and tail of a
        failure: what each triggerer and task said about one batch (a cancel verdict, a state that could not be
        read, a hand-over).
        """
        found: list[str] = []
        for path in [*sorted(self._log_files.values()), *self.task_logs()]:
            try:
                with open(path, errors="replace") as fh:
                    name = path.name if path in self._log_files.values() else str(path.relative_to(self.home))
                    found.extend(
                        f"[{name}] {line.rstrip()[:400]}" for line in fh if any(n in line for n in needles)
                    )
            except FileNotFoundError:
                continue
        return "\n".join(found[-limit:]) or f"(no log line mentions {needles})"

    def task_logs(self, dag_id: str | None = None) -> list[Path]:
        """Task log files written under ``<home>/logs`` (optionally of one DAG)."""
        root = self.home / "logs"
        pattern = f"dag_id={dag_id}/**/*.log" if dag_id else "**/*.log"
        return sorted(root.glob(pattern)) if root.exists() else []

    def describe(self, lines: int = 60, *, dag_id: str | None = None) -> str:
        """Tails of every component's log (and of task logs), for failure reports."""
        parts = []
        for name, path in sorted(self._log_files.items()):
            proc = self.procs.get(name)
            state = (
                "not running"
                if proc is None
                else (f"exited {proc.returncode}" if proc.poll() is not None else f"pid {proc.pid}")
            )
            if proc is not None and name in self._paused:
                state += ", paused"
            parts.append(f"===== {name} ({state}) {path} =====\n{tail(path, lines)}")
        for path in self.task_logs(dag_id)[-6:]:
            parts.append(f"===== task log {path.relative_to(self.home)} =====\n{tail(path, lines)}")
        return "\n".join(parts)


def _heartbeat_epoch(entry: Mapping[str, Any]) -> float | None:
    for key in ("latest_scheduler_heartbeat", "latest_triggerer_heartbeat", "latest_dag_processor_heartbeat"):
        value = entry.get(key)
        if value:
            return _epoch(value)
    return None


def _epoch(value: Any) -> float | None:
    """Epoch seconds of a datetime or ISO string (a naive one is UTC, as Airflow stores it in SQLite)."""
    from datetime import datetime, timezone

    if value is None:
        return None
    if not isinstance(value, datetime):
        try:
            value = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _terminate_group(
    proc: subprocess.Popen[bytes], *, grace: float, sig: int, resume: bool = False
) -> int | None:
    """Send ``sig`` to the process group led by ``proc``; SIGKILL the group if it outlives ``grace``.

    :param resume: also send SIGCONT after ``sig`` (the group was stopped with SIGSTOP).
    """
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid  # the leader is gone (maybe reaped already); its group may still have members
    if proc.poll() is None or sig == signal.SIGKILL:
        _killpg(pgid, sig)
    if resume:
        _killpg(pgid, signal.SIGCONT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Children that outlived their leader (task runners, gunicorn/uvicorn workers) share its group.
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        _killpg(pgid, signal.SIGKILL)
    return proc.returncode


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


# -- processes (Linux /proc) ---------------------------------------------------------------------------------
def process_cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ('' once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1])


def descendants_of(root: int) -> list[int]:
    """PIDs of every live process below ``root`` (children, grandchildren, ...), in no particular order."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                parent = _parent_pid(int(entry.name))
                if parent is not None:
                    children[parent].append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# -- the kluster emulator (in-process EmulatorServer) ------------------------------------------------------
CANCEL_ROUTE = "POST /v1/batches/{id}/cancel"
POLL_ROUTE = "GET /v1/batches/{id}"
CANCELLED = frozenset({"cancelling", "cancelled"})
RUNNING_BATCH_STATES = frozenset({"pre_schedule", "validating", "in_progress", "finalizing"})


def batches_of_run(server: EmulatorServer, run_id: str) -> list[dict[str, Any]]:
    """The emulator's batches whose metadata names ``airflow_run_id=run_id``, oldest first."""
    found = []
    for batch_id in server.emulator.list_batch_ids():
        try:
            raw = server.emulator.get_batch_raw(batch_id)
        except KeyError:
            continue
        if (raw.get("metadata") or {}).get("airflow_run_id") == run_id:
            found.append(raw)
    return list(reversed(found))


def wait_for_batch(server: EmulatorServer, run_id: str, *, attempt: int = 1, timeout: float = 60) -> str:
    """Wait until the run's ``attempt``-th batch exists and is ``in_progress``; return its id."""

    def check() -> str | None:
        batches = batches_of_run(server, run_id)
        if len(batches) >= attempt and batches[attempt - 1]["status"] == "in_progress":
            return batches[attempt - 1]["id"]
        return None

    return wait_until(
        check,
        timeout,
        what=f"batch #{attempt} of run {run_id} to be in_progress",
        on_timeout=lambda: f"Batches of the run: {batches_of_run(server, run_id)}",
    )


def batch_status(server: EmulatorServer, batch_id: str) -> str:
    return server.emulator.get_batch_raw(batch_id)["status"]


#: What the trigger and the operator log about a kill, for :func:`wait_for_cancel`'s report.
KILL_LOG_NEEDLES = ("NOT cancelled", "Reading the task instance", "Traceback")


def wait_for_cancel(
    server: EmulatorServer, batch_id: str, timeout: float = 60, *, cluster: AirflowCluster | None = None
) -> str:
    """Wait until the batch is ``cancelling`` or ``cancelled``; return the status.

    With ``cluster``, a timeout's message starts with what the logs say about the batch and about kills.
    """

    def report() -> str:
        said = f"Logs: {cluster.mentions(batch_id, *KILL_LOG_NEEDLES)}\n" if cluster is not None else ""
        return f"{said}It is {server.emulator.get_batch_raw(batch_id)}; counters {server.emulator.counters}"

    return wait_until(
        lambda: (s := batch_status(server, batch_id)) in CANCELLED and s,
        timeout,
        interval=0.25,
        what=f"batch {batch_id} to be cancelling/cancelled",
        on_timeout=report,
    )


def cancel_calls(server: EmulatorServer) -> int:
    return server.emulator.counters.get(CANCEL_ROUTE, 0)


def polls(server: EmulatorServer, batch_id: str | None = None) -> int:
    """Polls (``GET /v1/batches/{id}``) so far: of ``batch_id``, or of every batch together."""
    if batch_id is not None:
        return server.emulator.polls_of(batch_id)
    return server.emulator.counters.get(POLL_ROUTE, 0)


def wait_for_polling(
    server: EmulatorServer, since: int, timeout: float = 60, *, batch_id: str | None = None
) -> None:
    """Wait for a poll after ``since`` polls: of ``batch_id`` (its waiter is really running), or of any batch.

    Prefer ``batch_id``: another test's leftovers (a cancel confirming its batch, a re-run) poll too, and a poll
    of theirs taken for this waiter's lets a test act before this trigger even runs.
    """
    wait_until(
        lambda: polls(server, batch_id) > since,
        timeout,
        interval=0.25,
        what=f"batch {batch_id} to be polled" if batch_id else "a batch to be polled",
        on_timeout=lambda: f"counters {server.emulator.counters}",
    )


def emulator_report(server: EmulatorServer) -> str:
    batches = [server.emulator.get_batch_raw(i) for i in server.emulator.list_batch_ids()]
    summary = [(b["id"], b["status"], (b.get("metadata") or {})) for b in batches]
    return (
        f"emulator batches: {json.dumps(summary, indent=1)}\n"
        f"emulator faults: {server.emulator.faults.to_dict()}\n"
        f"emulator counters: {server.emulator.counters}"
    )


@contextlib.contextmanager
def released(server: EmulatorServer, batch_id: str, status: str = "in_progress") -> Any:
    """Let one batch leave ``status`` while every other batch stays stuck; re-stick ``"*"`` on exit.

    ``stick_batch("*", ...)`` is a wildcard entry that holds every batch, so releasing one batch means: stick
    every other unfinished batch by id first, then drop the wildcard.
    """
    faults = server.emulator.faults
    for other in server.emulator.list_batch_ids():
        if other == batch_id:
            continue
        try:
            if server.emulator.get_batch_raw(other)["status"] in RUNNING_BATCH_STATES:
                faults.stick_batch(other, status)
        except KeyError:
            continue
    faults.unstick_batch(batch_id)
    faults.unstick_batch("*")
    try:
        yield
    finally:
        faults.stick_batch("*", status)


def finish_run(cluster: AirflowCluster, server: EmulatorServer, dag_id: str, run_id: str) -> None:
    """Best effort: fail the run (unless it ended) and wait for its still-running batches to stop, so nothing
    of this test lands in the next test's counters."""

    def running() -> list[str]:
        return [b["id"] for b in batches_of_run(server, run_id) if b["status"] in RUNNING_BATCH_STATES]

    try:
        run = cluster.api.dag_run(dag_id, run_id)
        if run["state"] not in ("success", "failed"):
            cluster.api.set_run_state(dag_id, run_id, "failed")
        wait_until(lambda: not running(), 30, what=f"batches of {run_id} to stop")
    except Exception as exc:  # cleanup must not mask the test's outcome
        print(f"cleanup of {dag_id} {run_id}: {exc!r}")
        # Nobody is left to cancel them (e.g. the run ended while its task waited for a retry).
        for batch_id in running():
            with contextlib.suppress(Exception):
                server.emulator.set_batch_status(batch_id, "cancelled")
