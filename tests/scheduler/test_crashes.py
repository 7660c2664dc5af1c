"""Crashes through a real Airflow: retries never pay twice, a triggerer restart loses nothing.

The same processes as ``test_on_call_cancel.py`` (scheduler with the LocalExecutor, triggerer, dag-processor,
api-server; PostgreSQL, or SQLite with KLUSTER_TEST_DB=sqlite; the emulator in-process with every batch stuck ``in_progress``), and:

* ``kill -9`` of the task process while it polls its batch on the worker: the supervisor reports the try failed,
  the scheduler retries it, and the retry REATTACHES to the batch the first try created (one upload, one batch
  for the whole run), which then completes;
* the triggerer restarted while the task is deferred, once gracefully (SIGTERM) and once by ``kill -9`` (the
  cluster's second triggerer paused meanwhile, so the restarted one is the only one): the new triggerer process
  takes the trigger over, keeps polling the same batch, never cancels it, and the task
  succeeds once the batch completes;
* the triggerer killed while a task with a ``timeout`` is deferred: the wait still ends at the original deadline
  (batch creation + timeout), not a fresh one counted from the restart, and the batch is cancelled once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from typing import Any

import airflow
import pytest
from packaging.version import Version

from .harness import (
    AirflowCluster,
    batch_status,
    batches_of_run,
    cancel_calls,
    emulator_report,
    finish_run,
    polls,
    process_cmdline,
    released,
    wait_for_batch,
    wait_for_cancel,
    wait_for_polling,
    wait_until,
)

if Version(Version(airflow.__version__).base_version) < Version("3.3"):
    pytest.skip(
        f"Airflow {airflow.__version__} < 3.3: the shared cluster fixture serves the on-call tests, "
        "which need trigger on_kill() (3.3+)",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.scheduler, pytest.mark.timeout(300)]

WORKER_DAG = "kluster_crash_worker"
TRIGGERER_DAG = "kluster_crash_triggerer"
DEADLINE_DAG = "kluster_crash_deadline"
DEADLINE_SECONDS = 30  # the deadline DAG's timeout (dags/kluster_crashes.py)
TASK = "submit_and_wait"


# -- helpers -------------------------------------------------------------------------------------------
def task_log(cluster: AirflowCluster, dag_id: str, run_id: str, attempt: int) -> str:
    """The text of one try's task log ('' while it does not exist)."""
    root = cluster.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={TASK}"
    path = root / f"attempt={attempt}.log"
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def trigger_log_events(cluster: AirflowCluster, dag_id: str, run_id: str) -> list[tuple[str, dict]]:
    """Every JSON line of the run's trigger logs (one file per triggerer job), as (file name, line)."""
    root = cluster.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={TASK}"
    events = []
    for path in sorted(root.glob("attempt=1.log.trigger.*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                events.append((path.name, json.loads(line)))
            except ValueError:
                continue
    return events


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def counter(server: Any, key: str) -> int:
    return server.emulator.counters.get(key, 0)


def wait_for_try(
    api: Any, dag_id: str, run_id: str, try_number: int, state: str, timeout: float = 90
) -> dict:
    """Wait until the TI's ``try_number``-th try is in ``state``; fail at once if the TI ends ``failed``."""
    seen: list[tuple[int, str | None]] = []

    def check() -> dict | None:
        ti = api.ti(dag_id, run_id, TASK)
        now = (ti.get("try_number"), ti.get("state"))
        if not seen or seen[-1] != now:
            seen.append(now)
        if now == (try_number, state):
            return ti
        if now[1] in ("failed", "success", "upstream_failed", "skipped"):
            raise AssertionError(f"{dag_id}.{TASK} ({run_id}) ended {now[1]!r}; (try, state) seen: {seen}")
        return None

    return wait_until(
        check,
        timeout,
        what=f"try {try_number} of {dag_id}.{TASK} ({run_id}) to be {state!r}",
        on_timeout=lambda: f"(try, state) seen: {seen}",
    )


def wait_for_run_state(api: Any, dag_id: str, run_id: str, state: str, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (run := api.dag_run(dag_id, run_id))["state"] == state and run,
        timeout,
        what=f"run {run_id} of {dag_id} to be {state!r}",
        on_timeout=lambda: f"It is {api.dag_run(dag_id, run_id)['state']!r}.",
    )


def pid_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (gone, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- scenarios -------------------------------------------------------------------------------------------
@pytest.fixture
def revive_triggerer(cluster):
    """One triggerer for the scenario: the second is paused (SIGSTOP) throughout, so the trigger runs on the first,
    which the scenario restarts and kills; afterwards both run again (a failed scenario may leave one killed)."""
    cluster.pause("triggerer-2")
    try:
        yield cluster
    finally:
        cluster.resume("triggerer-2")
        if not cluster.is_running("triggerer"):
            started = time.time()
            cluster.stop_component("triggerer")  # forget a dead process, if any
            cluster.start_component("triggerer")
            cluster.wait_healthy(120, components=["triggerer"], heartbeat_after=started)


def test_kill_9_of_the_task_process_mid_wait_reattaches_on_retry(cluster, emulator_server):
    api = cluster.api
    server = emulator_server
    uploads_before = counter(server, "files_uploaded")
    created_before = counter(server, "batches_created")
    cancels_before = cancel_calls(server)
    run_id = api.trigger_run(WORKER_DAG)
    try:
        with cluster.report_on_failure(dag_id=WORKER_DAG, extra=lambda: emulator_report(server)):
            first = wait_for_try(api, WORKER_DAG, run_id, 1, "running", timeout=120)
            batch_id = wait_for_batch(server, run_id)
            wait_for_polling(
                server, polls(server, batch_id), batch_id=batch_id
            )  # the operator is in its wait loop

            pid = wait_until(
                lambda: cluster.task_process(first["id"]),
                30,
                what=f"the process running task instance {first['id']}",
                on_timeout=lambda: "\n".join(
                    f"{p}: {process_cmdline(p)}" for p in cluster.descendants("scheduler")
                ),
            )
            scheduler_pid = cluster.pid("scheduler")
            assert pid != scheduler_pid
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: pid_gone(pid), 10, what=f"task process {pid} to die")
            assert cluster.is_running("scheduler")
            assert cluster.pid("scheduler") == scheduler_pid

            # The supervisor reports the try failed (-9); the scheduler runs try 2, which must reattach.
            second = wait_for_try(api, WORKER_DAG, run_id, 2, "running", timeout=120)
            assert second["id"] != first["id"]
            reattach_line = wait_until(
                lambda: next(
                    (
                        line
                        for line in task_log(cluster, WORKER_DAG, run_id, 2).splitlines()
                        if "REATTACHING" in line
                    ),
                    None,
                ),
                60,
                what="try 2's log to say REATTACHING",
                on_timeout=lambda: f"try 2's log:\n{task_log(cluster, WORKER_DAG, run_id, 2)[-4000:]}",
            )
            assert batch_id in reattach_line, reattach_line
            first_log = task_log(cluster, WORKER_DAG, run_id, 1)
            assert "REATTACHING" not in first_log
            assert "terminated by signal" in first_log, first_log[-4000:]  # the supervisor saw the kill
            wait_for_polling(server, polls(server, batch_id), batch_id=batch_id)  # try 2 polls the same batch

            assert [b["id"] for b in batches_of_run(server, run_id)] == [batch_id]
            assert batch_status(server, batch_id) == "in_progress"
            assert counter(server, "batches_created") == created_before + 1, server.emulator.counters
            assert counter(server, "files_uploaded") == uploads_before + 1, server.emulator.counters
            assert cancel_calls(server) == cancels_before, server.emulator.counters

            with released(server, batch_id):
                done = api.wait_for_ti_state(WORKER_DAG, run_id, TASK, "success", timeout=60)
            assert done["try_number"] == 2
            wait_for_run_state(api, WORKER_DAG, run_id, "success")

            batches = batches_of_run(server, run_id)
            assert [(b["id"], b["status"]) for b in batches] == [(batch_id, "completed")]
            assert batches[0]["metadata"]["airflow_try"] == "1"  # created by the killed try
            assert api.xcom(WORKER_DAG, run_id, TASK) == batch_id
            assert counter(server, "batches_created") == created_before + 1, server.emulator.counters
            assert counter(server, "files_uploaded") == uploads_before + 1, server.emulator.counters
            assert cancel_calls(server) == cancels_before, server.emulator.counters
    finally:
        finish_run(cluster, server, WORKER_DAG, run_id)


def test_triggerer_restarts_mid_wait_keep_the_same_batch(revive_triggerer, emulator_server):
    cluster = revive_triggerer
    api = cluster.api
    server = emulator_server
    created_before = counter(server, "batches_created")
    cancels_before = cancel_calls(server)
    run_id = api.trigger_run(TRIGGERER_DAG)
    try:
        with cluster.report_on_failure(dag_id=TRIGGERER_DAG, extra=lambda: emulator_report(server)):
            api.wait_for_ti_state(TRIGGERER_DAG, run_id, TASK, "deferred", timeout=120)
            batch_id = wait_for_batch(server, run_id)
            wait_for_polling(server, polls(server, batch_id), batch_id=batch_id)  # the trigger runs

            # A graceful restart (SIGTERM, as a deploy does): the trigger is stopped, never killed.
            cluster.restart("triggerer")
            wait_for_polling(server, polls(server, batch_id), batch_id=batch_id)  # the new triggerer has it
            assert api.ti_state(TRIGGERER_DAG, run_id, TASK) == "deferred"
            assert batch_status(server, batch_id) == "in_progress"
            assert cancel_calls(server) == cancels_before, server.emulator.counters

            # A crash: kill -9 of the triggerer's whole process group, then a new triggerer. It takes the trigger
            # over once the dead one's heartbeat is older than triggerer_health_check_threshold.
            cluster.kill("triggerer")
            polled = polls(server, batch_id)
            time.sleep(2.5)
            assert polls(server, batch_id) == polled, (
                "the batch was still polled after the triggerer was killed"
            )
            started = time.time()
            cluster.start_component("triggerer")
            cluster.wait_healthy(60, components=["triggerer"], heartbeat_after=started)
            wait_for_polling(server, polled, timeout=90, batch_id=batch_id)
            assert api.ti_state(TRIGGERER_DAG, run_id, TASK) == "deferred"
            assert batch_status(server, batch_id) == "in_progress"
            assert cancel_calls(server) == cancels_before, server.emulator.counters

            with released(server, batch_id):
                done = api.wait_for_ti_state(TRIGGERER_DAG, run_id, TASK, "success", timeout=60)
            assert done["try_number"] == 1
            wait_for_run_state(api, TRIGGERER_DAG, run_id, "success")

            assert [(b["id"], b["status"]) for b in batches_of_run(server, run_id)] == [
                (batch_id, "completed")
            ]
            assert api.xcom(TRIGGERER_DAG, run_id, TASK) == batch_id
            assert counter(server, "batches_created") == created_before + 1, server.emulator.counters
            assert cancel_calls(server) == cancels_before, server.emulator.counters
    finally:
        finish_run(cluster, server, TRIGGERER_DAG, run_id)


def test_a_deadline_survives_a_triggerer_crash(revive_triggerer, emulator_server):
    cluster = revive_triggerer
    api = cluster.api
    server = emulator_server
    created_before = counter(server, "batches_created")
    cancels_before = cancel_calls(server)
    run_id = api.trigger_run(DEADLINE_DAG)
    try:
        with cluster.report_on_failure(dag_id=DEADLINE_DAG, extra=lambda: emulator_report(server)):
            api.wait_for_ti_state(DEADLINE_DAG, run_id, TASK, "deferred", timeout=120)
            batch_id = wait_for_batch(server, run_id)
            wait_for_polling(server, polls(server, batch_id), batch_id=batch_id)
            deadline = float(server.emulator.get_batch(batch_id).created_at) + DEADLINE_SECONDS

            cluster.kill("triggerer")
            cluster.start_component("triggerer")
            done = api.wait_for_ti_state(DEADLINE_DAG, run_id, TASK, "failed", timeout=120)

            events = trigger_log_events(cluster, DEADLINE_DAG, run_id)
            fired = [(name, e) for name, e in events if e.get("event") == "Trigger fired event"]
            assert len(fired) == 1, events
            fired_in, fired_event = fired[0]
            fired_at = epoch(fired_event["timestamp"])
            assert "'status': 'timeout'" in fired_event["result"], fired_event
            started_at = max(
                epoch(e["timestamp"])
                for name, e in events
                if name == fired_in
                and str(e.get("event", "")).startswith("trigger ")
                and str(e.get("event", "")).endswith(" starting")
            )
            first_file = min(name for name, _ in events)
            assert fired_in != first_file, "the timeout was fired by the triggerer that was killed"
            # The original deadline (the API's created_at is whole seconds): not before it, and not a full timeout
            # after the new triggerer started, as a deadline counted from the restart would be.
            assert fired_at >= deadline - 1.5, (fired_at, deadline)
            assert fired_at <= max(deadline, started_at) + 5, (fired_at, deadline, started_at)

            assert done["try_number"] == 1
            assert wait_for_cancel(server, batch_id, cluster=cluster) in ("cancelling", "cancelled")
            assert "KlusterBatchTimeoutError" in task_log(cluster, DEADLINE_DAG, run_id, 1)
            assert [b["id"] for b in batches_of_run(server, run_id)] == [batch_id]
            assert counter(server, "batches_created") == created_before + 1, server.emulator.counters
            # One cancel: the deadline's (execute_complete on the worker); none from the crash or the restart.
            assert cancel_calls(server) == cancels_before + 1, server.emulator.counters
    finally:
        finish_run(cluster, server, DEADLINE_DAG, run_id)
