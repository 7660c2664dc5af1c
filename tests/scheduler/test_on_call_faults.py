"""On-call actions that used to go wrong, through a real Airflow on PostgreSQL with two triggerers.

The cluster of ``conftest.py`` (scheduler with the LocalExecutor, dag-processor, api-server, triggerers) and the
emulator in-process with every batch stuck ``in_progress``. Each scenario acts as on-call or as the machine room
would, and checks what happened to the batches:

* a slow (2 s+) or failing-then-succeeding cancel after mark-failed and after clear, deferred and on the worker:
  the cancel lands, and the task log says so;
* a triggerer paused past the HA hand-over (SIGSTOP), nobody acting: no batch cancelled, the tasks succeed;
* a worker-polling task through a scheduler restart: no cancel, the retry reattaches, the task succeeds;
* clear while the triggerers are delayed: the re-run never reattaches to the cleared try's batch, submits a
  new one and succeeds;
* mark success: the batch is left running (``cancel_on_mark_success=False``).

``KLUSTER_ON_CALL_REPEAT`` (default 1) repeats each scenario, for the closing figures of a change.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import airflow
import pytest
from packaging.version import Version

from .conftest import TRIGGERER_HEALTH_CHECK_THRESHOLD
from .harness import (
    CANCELLED,
    AirflowCluster,
    batch_status,
    batches_of_run,
    cancel_calls,
    emulator_report,
    finish_run,
    polls,
    released,
    wait_for_batch,
    wait_for_cancel,
    wait_for_polling,
    wait_until,
)

if Version(Version(airflow.__version__).base_version) < Version("3.3"):
    pytest.skip(
        f"Airflow {airflow.__version__} < 3.3: triggers get on_kill() only from 3.3", allow_module_level=True
    )

pytestmark = [pytest.mark.scheduler, pytest.mark.timeout(420)]

DEFERRED_DAG = "kluster_on_call_deferred"
WORKER_DAG = "kluster_on_call_worker"
RETRY_WORKER_DAG = "kluster_on_call_retry_worker"
TASK = "submit_and_wait"
CANCEL = "POST /v1/batches/{id}/cancel"
REPEAT = range(int(os.environ.get("KLUSTER_ON_CALL_REPEAT", "1")))
SLOW = {"latency": 2.5}
FAILING = {"status": 503, "times": 3}  # more than the connection's own 2 client retries


# -- helpers -------------------------------------------------------------------------------------------
def logs_of(cluster: AirflowCluster, dag_id: str, run_id: str, attempt: int | None = None) -> str:
    """Every log of the run's task (or of one try): each try's, each triggerer's part of it, and the logs of
    the detached processes that finish a worker's cancel (``logs/kluster-cancels/<batch>.log``) it names."""
    root = cluster.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={TASK}"
    pattern = "attempt=*.log*" if attempt is None else f"attempt={attempt}.log*"
    text = "\n".join(p.read_text(errors="replace") for p in sorted(root.glob(pattern)))
    detached = sorted(set(re.findall(r"its outcome goes to (\S+?\.log)", text)))
    return "\n".join([text, *(Path(p).read_text(errors="replace") for p in detached if Path(p).exists())])


def wait_for_log(cluster: AirflowCluster, dag_id: str, run_id: str, text: str, timeout: float = 60) -> str:
    return wait_until(
        lambda: text in (found := logs_of(cluster, dag_id, run_id)) and found,
        timeout,
        what=f"the task log of {run_id} to say {text!r}",
        on_timeout=lambda: f"Logs:\n{logs_of(cluster, dag_id, run_id)[-6000:]}",
    )


@pytest.fixture
def fault(emulator_server) -> Iterator[Any]:
    """Add emulator faults for one scenario; they are removed after it."""
    rules = []

    def add(route: str, **kwargs: Any) -> None:
        rules.append(emulator_server.emulator.faults.add(route, **kwargs))

    yield add
    for rule in rules:
        emulator_server.emulator.faults.remove(rule.id)


def start_waiting(cluster: AirflowCluster, server: Any, dag_id: str) -> tuple[str, str]:
    """Trigger a run; return it and its batch once the task waits (deferred or polling) on it."""
    state = "deferred" if dag_id == DEFERRED_DAG else "running"
    run_id = cluster.api.trigger_run(dag_id)
    cluster.api.wait_for_ti_state(dag_id, run_id, TASK, state, timeout=120)
    batch_id = wait_for_batch(server, run_id)
    wait_for_polling(server, polls(server, batch_id), batch_id=batch_id)
    return run_id, batch_id


# -- a slow or failing cancel lands ---------------------------------------------------------------------
@pytest.mark.parametrize("rep", REPEAT)
@pytest.mark.parametrize(
    ("dag_id", "action", "faults"),
    [
        (DEFERRED_DAG, "mark-failed", SLOW),
        (DEFERRED_DAG, "mark-failed", FAILING),
        (DEFERRED_DAG, "clear", SLOW),
        (DEFERRED_DAG, "clear", FAILING),
        (WORKER_DAG, "mark-failed", {"latency": 2.0}),
        (WORKER_DAG, "mark-failed", FAILING),
        (WORKER_DAG, "clear", {"latency": 2.0}),
        (WORKER_DAG, "clear", FAILING),
    ],
    ids=[
        "deferred-mark-failed-slow",
        "deferred-mark-failed-503s",
        "deferred-clear-slow",
        "deferred-clear-503s",
        "worker-mark-failed-slow",
        "worker-mark-failed-503s",
        "worker-clear-slow",
        "worker-clear-503s",
    ],
)
def test_a_slow_or_failing_cancel_lands(cluster, emulator_server, fault, dag_id, action, faults, rep):
    api, server = cluster.api, emulator_server
    run_id = None
    try:
        with cluster.report_on_failure(dag_id=dag_id, extra=lambda: emulator_report(server)):
            run_id, batch_id = start_waiting(cluster, server, dag_id)
            fault(CANCEL, **faults)
            if action == "clear":
                api.clear_ti(dag_id, run_id, TASK)
            else:
                api.set_ti_state(dag_id, run_id, TASK, "failed")

            assert wait_for_cancel(server, batch_id, timeout=90, cluster=cluster) in CANCELLED
            wait_for_log(cluster, dag_id, run_id, "kluster confirmed the cancel")
            if action == "clear":
                # The cleared try's own kill cancelled it, not the re-run's _give_up ("cleared after it was
                # submitted"), which would cancel it even without on_kill.
                # (A deferred task's re-run deferred again before the old trigger read the state: then the old
                # trigger sees "deferred", cannot tell it from a hand-over, and the re-run cancels the batch.)
                def who_cancelled() -> bool:
                    first = logs_of(cluster, dag_id, run_id, attempt=1)
                    if f"Cancelling batch {batch_id} because the task was cleared" in first:
                        return True
                    return "NOT cancelled: the task is still deferred" in first and (
                        f"Cancelling batch {batch_id} because its task was cleared after it was submitted"
                        in logs_of(cluster, dag_id, run_id, attempt=2)
                    )

                wait_until(
                    who_cancelled,
                    60,
                    what=f"a log saying who cancelled {batch_id} after the clear",
                    on_timeout=lambda: logs_of(cluster, dag_id, run_id)[-6000:],
                )
                # The re-run submits a new batch (never the cancelled one) and waits on it.
                new_batch = wait_for_batch(server, run_id, attempt=2, timeout=120)
                assert new_batch != batch_id
            else:
                assert api.ti_state(dag_id, run_id, TASK) == "failed"
                assert [b["id"] for b in batches_of_run(server, run_id)] == [batch_id]
            assert "Could NOT cancel" not in logs_of(cluster, dag_id, run_id)
    finally:
        if run_id:
            finish_run(cluster, server, dag_id, run_id)


# -- a stalled triggerer hands its triggers over without cancelling -----------------------------------------
@pytest.mark.parametrize("rep", REPEAT)
def test_a_stalled_triggerer_hands_over_without_cancelling(cluster, emulator_server, rep):
    api, server = cluster.api, emulator_server
    cancels_before = cancel_calls(server)
    runs: list[tuple[str, str]] = []
    try:
        with cluster.report_on_failure(dag_id=DEFERRED_DAG, extra=lambda: emulator_report(server)):
            # Every trigger on the first triggerer: the second is stopped while the tasks defer.
            cluster.pause("triggerer-2")
            try:
                for _ in range(3):
                    runs.append(start_waiting(cluster, server, DEFERRED_DAG))
            finally:
                cluster.resume("triggerer-2")

            # The first triggerer stalls past triggerer_health_check_threshold: the second takes its triggers.
            cluster.pause("triggerer")
            try:
                time.sleep(TRIGGERER_HEALTH_CHECK_THRESHOLD + 5)
                wait_for_polling(server, polls(server), timeout=60)  # the second triggerer polls them now
                polled = polls(server)
                time.sleep(3)
                assert polls(server) > polled
            finally:
                cluster.resume("triggerer")
            # Back, it finds its triggers gone and Airflow calls their on_kill "by user action".
            for run_id, _ in runs:
                wait_for_log(cluster, DEFERRED_DAG, run_id, "moved to another triggerer", timeout=90)

            assert cancel_calls(server) == cancels_before, server.emulator.counters
            for run_id, batch_id in runs:
                assert api.ti_state(DEFERRED_DAG, run_id, TASK) == "deferred"
                assert batch_status(server, batch_id) == "in_progress"
            for run_id, batch_id in runs:
                with released(server, batch_id):
                    api.wait_for_ti_state(DEFERRED_DAG, run_id, TASK, "success", timeout=90)
                assert [(b["id"], b["status"]) for b in batches_of_run(server, run_id)] == [
                    (batch_id, "completed")
                ]
            assert cancel_calls(server) == cancels_before, server.emulator.counters
    finally:
        for name in ("triggerer", "triggerer-2"):
            cluster.resume(name)
        for run_id, _ in runs:
            finish_run(cluster, server, DEFERRED_DAG, run_id)


# -- a scheduler restart is not a person -------------------------------------------------------------------
@pytest.mark.parametrize("rep", REPEAT)
def test_a_scheduler_restart_leaves_a_worker_wait_to_reattach(cluster, emulator_server, rep):
    api, server = cluster.api, emulator_server
    cancels_before = cancel_calls(server)
    run_id = None
    try:
        with cluster.report_on_failure(dag_id=RETRY_WORKER_DAG, extra=lambda: emulator_report(server)):
            run_id, batch_id = start_waiting(cluster, server, RETRY_WORKER_DAG)
            ti = api.ti(RETRY_WORKER_DAG, run_id, TASK)
            pid = cluster.task_process(ti["id"])
            assert pid is not None

            # SIGTERM to the scheduler: its LocalExecutor workers stop, and the task gets SIGTERM (on_kill).
            cluster.stop_component("scheduler", grace=30, sig=signal.SIGTERM)
            started = time.time()
            cluster.start_component("scheduler")
            cluster.wait_healthy(120, components=["scheduler"], heartbeat_after=started)

            assert cancel_calls(server) == cancels_before, server.emulator.counters
            assert batch_status(server, batch_id) == "in_progress"
            # Whichever way the stopped try ended, the task gets to poll the same batch again.
            wait_until(
                lambda: (
                    api.ti_state(RETRY_WORKER_DAG, run_id, TASK) == "running"
                    and api.ti(RETRY_WORKER_DAG, run_id, TASK)["id"] != ti["id"]
                ),
                180,
                what="a new try to poll the batch",
                on_timeout=lambda: f"TI: {api.ti(RETRY_WORKER_DAG, run_id, TASK)}",
            )
            wait_for_log(cluster, RETRY_WORKER_DAG, run_id, "REATTACHING", timeout=90)
            with released(server, batch_id):
                api.wait_for_ti_state(RETRY_WORKER_DAG, run_id, TASK, "success", timeout=90)
            assert [(b["id"], b["status"]) for b in batches_of_run(server, run_id)] == [
                (batch_id, "completed")
            ]
            assert cancel_calls(server) == cancels_before, server.emulator.counters
            text = logs_of(cluster, RETRY_WORKER_DAG, run_id)
            if (
                "NOT cancelled" not in text
            ):  # the try's on_kill ran only if Airflow sent SIGTERM before it died
                print("note: the stopped try logged no on_kill verdict (it was not sent SIGTERM)")
    finally:
        if run_id:
            finish_run(cluster, server, RETRY_WORKER_DAG, run_id)


# -- clear means a new batch, however late the old cancel lands ------------------------------------------------
@pytest.mark.parametrize("rep", REPEAT)
def test_clear_with_a_delayed_triggerer_gets_a_new_batch(cluster, emulator_server, rep):
    api, server = cluster.api, emulator_server
    run_id = None
    try:
        with cluster.report_on_failure(dag_id=DEFERRED_DAG, extra=lambda: emulator_report(server)):
            run_id, batch_id = start_waiting(cluster, server, DEFERRED_DAG)
            # Both triggerers delayed: the cleared trigger's on_kill comes late.
            cluster.pause("triggerer")
            cluster.pause("triggerer-2")
            try:
                cleared_at = time.monotonic()
                api.clear_ti(DEFERRED_DAG, run_id, TASK)
                # The re-run gives the cleared try's batch up and submits a new one, triggerers still stopped.
                new_batch = wait_for_batch(server, run_id, attempt=2, timeout=120)
                assert wait_for_cancel(server, batch_id, cluster=cluster) in CANCELLED
                time.sleep(max(0.0, cleared_at + 10 - time.monotonic()))  # delayed 10 s at least
            finally:
                cluster.resume("triggerer")
                cluster.resume("triggerer-2")
            assert new_batch != batch_id
            api.wait_for_ti_state(DEFERRED_DAG, run_id, TASK, "deferred", timeout=120)
            wait_for_log(cluster, DEFERRED_DAG, run_id, "cleared since")
            with released(server, new_batch):
                done = api.wait_for_ti_state(DEFERRED_DAG, run_id, TASK, "success", timeout=120)
            assert done["try_number"] == 2
            assert api.xcom(DEFERRED_DAG, run_id, TASK) == new_batch
            statuses = {b["id"]: b["status"] for b in batches_of_run(server, run_id)}
            assert statuses[new_batch] == "completed"
            assert statuses[batch_id] in CANCELLED
            assert len(statuses) == 2
    finally:
        for name in ("triggerer", "triggerer-2"):
            cluster.resume(name)
        if run_id:
            finish_run(cluster, server, DEFERRED_DAG, run_id)


# -- mark success keeps the batch ---------------------------------------------------------------------------
@pytest.mark.parametrize("dag_id", [DEFERRED_DAG, WORKER_DAG], ids=["deferred", "worker"])
def test_mark_success_leaves_the_batch_running(cluster, emulator_server, dag_id):
    api, server = cluster.api, emulator_server
    cancels_before = cancel_calls(server)
    run_id = batch_id = None
    try:
        with cluster.report_on_failure(dag_id=dag_id, extra=lambda: emulator_report(server)):
            run_id, batch_id = start_waiting(cluster, server, dag_id)
            api.set_ti_state(dag_id, run_id, TASK, "success")
            wait_for_log(cluster, dag_id, run_id, "marked success")
            assert cancel_calls(server) == cancels_before, server.emulator.counters
            assert batch_status(server, batch_id) == "in_progress"
            assert api.ti_state(dag_id, run_id, TASK) == "success"
    finally:
        if batch_id:
            server.emulator.set_batch_status(batch_id, "cancelled")  # nobody else will end it
        if run_id:
            finish_run(cluster, server, dag_id, run_id)


# -- run-level actions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dag_id", [DEFERRED_DAG, WORKER_DAG], ids=["deferred", "worker"])
def test_marking_the_run_failed_cancels(cluster, emulator_server, dag_id):
    api, server = cluster.api, emulator_server
    run_id = None
    try:
        with cluster.report_on_failure(dag_id=dag_id, extra=lambda: emulator_report(server)):
            run_id, batch_id = start_waiting(cluster, server, dag_id)
            api.set_run_state(dag_id, run_id, "failed")
            assert wait_for_cancel(server, batch_id, timeout=90, cluster=cluster) in CANCELLED
            wait_for_log(cluster, dag_id, run_id, "kluster confirmed the cancel")
            assert [b["id"] for b in batches_of_run(server, run_id)] == [batch_id]
    finally:
        if run_id:
            finish_run(cluster, server, dag_id, run_id)
