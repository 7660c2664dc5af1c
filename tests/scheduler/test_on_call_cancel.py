"""On-call cancellation through a real Airflow: scheduler, triggerer, dag-processor and api-server on loopback.

``dag.test()`` never calls ``on_kill``, so these tests start the real processes (LocalExecutor, SQLite, a fresh
``AIRFLOW_HOME``), run the submit operator against the in-process emulator with every batch stuck
``in_progress``, act on the task as an on-call engineer would through the REST API, and check that the
emulator's batch was cancelled:

* clearing a deferred task (the trigger's ``on_kill``, Airflow 3.3+);
* marking a task failed while it polls on the worker (the operator's ``on_kill``);
* marking a deferred task failed (the trigger's ``on_kill``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import airflow
import pytest
from packaging.version import Version

from airflow_provider_kluster.emulator.server import EmulatorServer

from .harness import AirflowCluster, wait_until

if Version(Version(airflow.__version__).base_version) < Version("3.3"):
    pytest.skip(
        f"Airflow {airflow.__version__} < 3.3: triggers get on_kill() (cancel on clear / mark failed) only from 3.3",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.scheduler, pytest.mark.timeout(300)]

DAGS = Path(__file__).parent / "dags"
DEFERRED_DAG = "kluster_on_call_deferred"
WORKER_DAG = "kluster_on_call_worker"
TASK = "submit_and_wait"
API_KEY = "kl-scheduler-test-key"
CANCEL_ROUTE = "POST /v1/batches/{id}/cancel"
POLL_ROUTE = "GET /v1/batches/{id}"
CANCELLED = {"cancelling", "cancelled"}


@pytest.fixture(scope="module")
def emulator_server():
    """The emulator on a free loopback port; every batch stays ``in_progress`` until cancelled."""
    server = EmulatorServer(
        api_key=API_KEY,
        requests_per_second=1000.0,
        pre_schedule_delay=0.05,
        cancel_delay=2.0,
    ).start()
    server.emulator.faults.stick_batch("*", "in_progress")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, emulator_server):
    """Airflow's processes, started once for the module, with both test DAGs parsed and unpaused."""
    root = tmp_path_factory.mktemp("scheduler")
    dags = root / "dags"
    shutil.copytree(DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    conn = {
        "conn_type": "kluster",
        "host": emulator_server.base_url,
        "password": API_KEY,
        "extra": {"max_retries": 2, "timeout": 10},
    }
    cluster = AirflowCluster(
        home=root / "airflow", dags_folder=dags, env={"AIRFLOW_CONN_KLUSTER_DEFAULT": json.dumps(conn)}
    )
    cluster.start()
    try:
        with cluster.report_on_failure():
            for dag_id in (DEFERRED_DAG, WORKER_DAG):
                cluster.api.wait_for_dag(dag_id, timeout=120)
                cluster.api.unpause(dag_id)
        yield cluster
    finally:
        cluster.stop()


# -- helpers -------------------------------------------------------------------------------------------
def batches_of_run(server: EmulatorServer, run_id: str) -> list[dict[str, Any]]:
    """The emulator's batches submitted by ``run_id``, oldest first."""
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


def wait_for_cancel(server: EmulatorServer, batch_id: str, timeout: float = 60) -> str:
    """Wait until the batch is ``cancelling`` or ``cancelled``; return the status."""
    return wait_until(
        lambda: (s := batch_status(server, batch_id)) in CANCELLED and s,
        timeout,
        interval=0.25,
        what=f"batch {batch_id} to be cancelling/cancelled",
        on_timeout=lambda: (
            f"It is {server.emulator.get_batch_raw(batch_id)}; counters {server.emulator.counters}"
        ),
    )


def cancel_calls(server: EmulatorServer) -> int:
    return server.emulator.counters.get(CANCEL_ROUTE, 0)


def emulator_report(server: EmulatorServer) -> str:
    batches = [server.emulator.get_batch_raw(i) for i in server.emulator.list_batch_ids()]
    summary = [(b["id"], b["status"], (b.get("metadata") or {})) for b in batches]
    return f"emulator batches: {json.dumps(summary, indent=1)}\nemulator counters: {server.emulator.counters}"


def polls(server: EmulatorServer) -> int:
    return server.emulator.counters.get(POLL_ROUTE, 0)


def wait_for_polling(server: EmulatorServer, since: int, timeout: float = 60) -> None:
    """Wait until the batch was polled again after ``since`` polls (the trigger is really running)."""
    wait_until(
        lambda: polls(server) > since,
        timeout,
        interval=0.25,
        what="the trigger to poll the batch",
        on_timeout=lambda: f"counters {server.emulator.counters}",
    )


def finish_run(cluster: AirflowCluster, server: EmulatorServer, dag_id: str, run_id: str) -> None:
    """Best effort: fail the run and wait for its still-running batches to be cancelled, so no cancel of this
    test lands in the next test's counters."""
    try:
        run = cluster.api.dag_run(dag_id, run_id)
        if run["state"] not in ("success", "failed"):
            cluster.api.set_run_state(dag_id, run_id, "failed")
        wait_until(
            lambda: all(
                b["status"] not in ("in_progress", "validating", "pre_schedule")
                for b in batches_of_run(server, run_id)
            ),
            30,
            what=f"batches of {run_id} to stop",
        )
    except Exception as exc:  # cleanup must not mask the test's outcome
        print(f"cleanup of {dag_id} {run_id}: {exc!r}")


# -- scenarios -------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_triggerer(cluster):
    """Restart the triggerer so a scenario does not depend on the previous one's trigger bookkeeping.

    With SQLite, trigger ids are reused as soon as the newest trigger row is deleted; a triggerer that still
    tracks a cancelled trigger under that id can skip the new trigger that got it (seen with Airflow 3.3.2).
    """
    cluster.restart("triggerer")
    return cluster


def test_clearing_a_deferred_task_cancels_its_batch(cluster, emulator_server):
    api = cluster.api
    run_id = api.trigger_run(DEFERRED_DAG)
    try:
        with cluster.report_on_failure(dag_id=DEFERRED_DAG, extra=lambda: emulator_report(emulator_server)):
            api.wait_for_ti_state(DEFERRED_DAG, run_id, TASK, "deferred", timeout=120)
            polled = polls(emulator_server)
            batch_id = wait_for_batch(emulator_server, run_id)
            wait_for_polling(emulator_server, polled)
            calls_before = cancel_calls(emulator_server)

            api.clear_ti(DEFERRED_DAG, run_id, TASK)

            assert wait_for_cancel(emulator_server, batch_id) in CANCELLED
            assert cancel_calls(emulator_server) > calls_before, emulator_server.emulator.counters
    finally:
        finish_run(cluster, emulator_server, DEFERRED_DAG, run_id)


def test_marking_a_running_task_failed_cancels_its_batch(cluster, emulator_server):
    api = cluster.api
    run_id = api.trigger_run(WORKER_DAG)
    try:
        with cluster.report_on_failure(dag_id=WORKER_DAG, extra=lambda: emulator_report(emulator_server)):
            api.wait_for_ti_state(WORKER_DAG, run_id, TASK, "running", timeout=120)
            batch_id = wait_for_batch(emulator_server, run_id)
            assert api.ti_state(WORKER_DAG, run_id, TASK) == "running"
            calls_before = cancel_calls(emulator_server)

            api.set_ti_state(WORKER_DAG, run_id, TASK, "failed")

            assert wait_for_cancel(emulator_server, batch_id) in CANCELLED
            assert cancel_calls(emulator_server) > calls_before, emulator_server.emulator.counters
            assert api.ti_state(WORKER_DAG, run_id, TASK) == "failed"
            assert [b["id"] for b in batches_of_run(emulator_server, run_id)] == [batch_id]
    finally:
        finish_run(cluster, emulator_server, WORKER_DAG, run_id)


def test_marking_a_deferred_task_failed_cancels_its_batch(fresh_triggerer, emulator_server):
    cluster = fresh_triggerer
    api = cluster.api
    run_id = api.trigger_run(DEFERRED_DAG)
    try:
        with cluster.report_on_failure(dag_id=DEFERRED_DAG, extra=lambda: emulator_report(emulator_server)):
            api.wait_for_ti_state(DEFERRED_DAG, run_id, TASK, "deferred", timeout=120)
            polled = polls(emulator_server)
            batch_id = wait_for_batch(emulator_server, run_id)
            wait_for_polling(emulator_server, polled)
            calls_before = cancel_calls(emulator_server)

            api.set_ti_state(DEFERRED_DAG, run_id, TASK, "failed")

            assert wait_for_cancel(emulator_server, batch_id) in CANCELLED
            assert cancel_calls(emulator_server) > calls_before, emulator_server.emulator.counters
            assert api.ti_state(DEFERRED_DAG, run_id, TASK) == "failed"
            assert [b["id"] for b in batches_of_run(emulator_server, run_id)] == [batch_id]
    finally:
        finish_run(cluster, emulator_server, DEFERRED_DAG, run_id)
