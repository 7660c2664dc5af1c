"""On-call cancellation through a real Airflow: scheduler, triggerer, dag-processor and api-server on loopback.

``dag.test()`` never calls ``on_kill``, so these tests start the real processes (LocalExecutor, PostgreSQL or
SQLite, a fresh ``AIRFLOW_HOME``), run the submit operator against the in-process emulator with every batch stuck
``in_progress``, act on the task as an on-call engineer would through the REST API, and check that the
emulator's batch was cancelled:

* clearing a deferred task (the trigger's ``on_kill``, Airflow 3.3+);
* marking a task failed while it polls on the worker (the operator's ``on_kill``);
* marking a deferred task failed (the trigger's ``on_kill``).
"""

from __future__ import annotations

import airflow
import pytest
from packaging.version import Version

from .harness import (
    CANCELLED,
    batches_of_run,
    cancel_calls,
    emulator_report,
    finish_run,
    polls,
    wait_for_batch,
    wait_for_cancel,
    wait_for_polling,
    wait_until,
)

if Version(Version(airflow.__version__).base_version) < Version("3.3"):
    pytest.skip(
        f"Airflow {airflow.__version__} < 3.3: triggers get on_kill() (cancel on clear / mark failed) only from 3.3",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.scheduler, pytest.mark.timeout(300)]

DEFERRED_DAG = "kluster_on_call_deferred"
WORKER_DAG = "kluster_on_call_worker"
TASK = "submit_and_wait"


# -- scenarios -------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_triggerer(cluster):
    """Restart the triggerers so a scenario does not depend on the previous one's trigger bookkeeping.

    With SQLite, trigger ids are reused as soon as the newest trigger row is deleted; a triggerer that still
    tracks a cancelled trigger under that id can skip the new trigger that got it (seen with Airflow 3.3.2).
    PostgreSQL never reuses ids.
    """
    if cluster.db_kind == "sqlite":
        for name in ("triggerer", "triggerer-2"):
            cluster.restart(name)
    return cluster


def test_clearing_a_deferred_task_cancels_its_batch(cluster, emulator_server):
    api = cluster.api
    run_id = api.trigger_run(DEFERRED_DAG)
    try:
        with cluster.report_on_failure(dag_id=DEFERRED_DAG, extra=lambda: emulator_report(emulator_server)):
            api.wait_for_ti_state(DEFERRED_DAG, run_id, TASK, "deferred", timeout=120)
            batch_id = wait_for_batch(emulator_server, run_id)
            wait_for_polling(emulator_server, polls(emulator_server, batch_id), batch_id=batch_id)
            calls_before = cancel_calls(emulator_server)

            api.clear_ti(DEFERRED_DAG, run_id, TASK)

            assert wait_for_cancel(emulator_server, batch_id, cluster=cluster) in CANCELLED
            assert cancel_calls(emulator_server) > calls_before, emulator_server.emulator.counters
            # Cancelled by the cleared try's trigger (its log: attempt=1) — or, when the re-run was quick enough to
            # be deferred again before that trigger read the state (then "deferred": the triggerer cannot tell that
            # from a hand-over), by the re-run, which never reattaches to a batch submitted before the clear.
            attempt_logs = (
                cluster.home / "logs" / f"dag_id={DEFERRED_DAG}" / f"run_id={run_id}" / f"task_id={TASK}"
            )

            def who_cancelled() -> str:
                first = "".join(p.read_text(errors="replace") for p in attempt_logs.glob("attempt=1.log*"))
                second = "".join(p.read_text(errors="replace") for p in attempt_logs.glob("attempt=2.log*"))
                if f"Cancelling batch {batch_id} because the task was cleared" in first:
                    return "the cleared try"
                if "NOT cancelled: the task is still deferred" in first and (
                    f"Cancelling batch {batch_id} because its task was cleared after it was submitted"
                    in second
                ):
                    return "the re-run"
                return ""

            wait_until(who_cancelled, 60, what=f"a log saying who cancelled {batch_id} after the clear")
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

            assert wait_for_cancel(emulator_server, batch_id, cluster=cluster) in CANCELLED
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
            batch_id = wait_for_batch(emulator_server, run_id)
            wait_for_polling(emulator_server, polls(emulator_server, batch_id), batch_id=batch_id)
            calls_before = cancel_calls(emulator_server)

            api.set_ti_state(DEFERRED_DAG, run_id, TASK, "failed")

            assert wait_for_cancel(emulator_server, batch_id, cluster=cluster) in CANCELLED
            assert cancel_calls(emulator_server) > calls_before, emulator_server.emulator.counters
            assert api.ti_state(DEFERRED_DAG, run_id, TASK) == "failed"
            assert [b["id"] for b in batches_of_run(emulator_server, run_id)] == [batch_id]
    finally:
        finish_run(cluster, emulator_server, DEFERRED_DAG, run_id)
