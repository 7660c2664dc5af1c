"""On-call cancellation, short of a real scheduler: who may cancel, and a cancel that completes.

The emulator answers every kluster call over real HTTP, with the faults a slow or failing cancel needs (latency,
503s). What only Airflow can answer — the task instance's state, read back after a kill — comes from the
``airflow_says`` fixture. On Airflow 3.3+, the trigger is driven by Airflow's own ``TriggerRunner.run_trigger``
and cancelled the way the triggerer does it: with its user-action message, re-sent while the trigger lives.
The same scenarios run against a real scheduler, triggerers and PostgreSQL in ``tests/scheduler``.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import uuid

import airflow
import pytest
from packaging.version import Version

from airflow_provider_kluster.cancelling import (
    UNKNOWN_STATE,
    WORKER_CANCEL_BUDGET,
    CancelAttempts,
    KillCause,
    judge_kill,
    state_in,
)
from airflow_provider_kluster.exceptions import KlusterAPIError, KlusterConfigError
from airflow_provider_kluster.operators.kluster import (
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
)
from airflow_provider_kluster.reattach import STATE_BATCH_KEY
from airflow_provider_kluster.triggers import kluster as trigger_module
from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import MODEL, FakeTI, make_context, request_lines, wait_for, write_jsonl

AIRFLOW_33 = Version(Version(airflow.__version__).base_version) >= Version("3.3")
CANCEL = "POST /v1/batches/{id}/cancel"
PROMPTS = ["What is 2+2?", "Name a colour."]


@pytest.fixture
def hook(kluster_conn):
    from airflow_provider_kluster.hooks.kluster import KlusterHook

    return KlusterHook(kluster_conn)


def cancels(emulator) -> int:
    return emulator.emulator.counters.get(CANCEL, 0)


def logged(caplog, capsys) -> str:
    """Everything logged: the operators' task loggers print through structlog, the rest reaches ``caplog``."""
    return caplog.text + capsys.readouterr().out


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[error" in line or line.startswith("ERROR")]


def status(emulator, batch_id: str) -> str:
    return emulator.emulator.get_batch_raw(batch_id)["status"]


# -- who may cancel ----------------------------------------------------------------------------------------
SAME, NEXT, UNREAD = (1, 1), (1, 2), (1, None)  # (the stopped try, the try Airflow says the task is on)


@pytest.mark.parametrize(
    ("state", "where", "tries", "cancel", "cause"),
    [
        ("failed", "triggerer", UNREAD, True, KillCause.ENDED),
        ("failed", "worker", UNREAD, True, KillCause.ENDED),
        ("skipped", "triggerer", UNREAD, True, KillCause.ENDED),
        ("removed", "worker", UNREAD, True, KillCause.ENDED),
        (None, "triggerer", UNREAD, True, KillCause.CLEARED),
        (None, "worker", UNREAD, True, KillCause.CLEARED),
        ("restarting", "worker", UNREAD, True, KillCause.CLEARED),
        # Scheduled, queued, running, deferred: a clear only when the try moved past the stopped one.
        ("scheduled", "triggerer", NEXT, True, KillCause.CLEARED),
        ("queued", "triggerer", NEXT, True, KillCause.CLEARED),
        ("running", "triggerer", NEXT, True, KillCause.CLEARED),
        ("deferred", "triggerer", NEXT, True, KillCause.CLEARED),  # cleared and deferred again
        (
            "scheduled",
            "triggerer",
            SAME,
            False,
            KillCause.NOT_A_PERSON,
        ),  # another triggerer's event resumed it
        ("queued", "triggerer", SAME, False, KillCause.NOT_A_PERSON),
        ("running", "triggerer", SAME, False, KillCause.NOT_A_PERSON),
        ("deferred", "triggerer", SAME, False, KillCause.NOT_A_PERSON),  # handed to another triggerer
        # The try unread (the triggerer cannot ask it; Airflow 3.1): judged by the state alone.
        ("scheduled", "triggerer", UNREAD, True, KillCause.CLEARED),
        ("queued", "triggerer", UNREAD, True, KillCause.CLEARED),
        ("running", "triggerer", UNREAD, True, KillCause.CLEARED),
        ("running", "triggerer", (None, 2), True, KillCause.CLEARED),
        ("deferred", "triggerer", UNREAD, False, KillCause.NOT_A_PERSON),  # handed to another triggerer
        ("scheduled", "worker", UNREAD, True, KillCause.CLEARED),
        ("running", "worker", SAME, False, KillCause.NOT_A_PERSON),  # scheduler / worker restart
        ("running", "worker", UNREAD, False, KillCause.NOT_A_PERSON),
        ("running", "worker", NEXT, True, KillCause.CLEARED),
        ("up_for_retry", "worker", UNREAD, False, KillCause.NOT_A_PERSON),  # missed heartbeats
        ("up_for_retry", "triggerer", NEXT, False, KillCause.NOT_A_PERSON),
        ("success", "triggerer", UNREAD, False, KillCause.MARKED_SUCCESS),
        ("success", "worker", UNREAD, False, KillCause.MARKED_SUCCESS),
        (UNKNOWN_STATE, "triggerer", NEXT, False, KillCause.UNKNOWN),
        (UNKNOWN_STATE, "worker", UNREAD, False, KillCause.UNKNOWN),
        ("up_for_reschedule", "worker", UNREAD, False, KillCause.UNKNOWN),
    ],
)
def test_who_may_cancel(state, where, tries, cancel, cause):
    own_try, current_try = tries
    verdict = judge_kill(state, where=where, own_try=own_try, current_try=current_try)
    assert (verdict.cancel, verdict.cause) == (cancel, cause)
    assert verdict.reason


@pytest.mark.parametrize("state", ["failed", "skipped", "upstream_failed", "removed"])
def test_an_ended_task_is_not_said_to_be_a_persons_doing(state):
    """Airflow fails, skips or removes task instances itself (dagrun_timeout, lost heartbeats, a deploy)."""
    reason = judge_kill(state, where="worker").reason
    assert f"now {state}" in reason
    assert "a person marked it, or Airflow ended the run" in reason
    assert "marked failed" not in reason


def test_an_unread_try_is_judged_by_the_state_alone():
    verdict = judge_kill("queued", where="triggerer", own_try=3)
    assert verdict.cancel
    assert "its try could not be read" in verdict.reason
    assert not judge_kill("deferred", where="triggerer", own_try=3).cancel
    assert not judge_kill("running", where="worker", own_try=3).cancel


def test_the_state_is_picked_out_of_airflows_answer():
    answer = {"run": {"submit": "failed", "submit_3": "deferred", "other": None}}
    assert state_in(answer, "run", "submit", -1) == "failed"
    assert state_in(answer, "run", "submit", 3) == "deferred"  # a mapped task's key
    assert state_in(answer, "run", "other", -1) is None  # cleared
    assert state_in(answer, "run", "submit", 4) == UNKNOWN_STATE
    assert state_in(answer, "another run", "submit", -1) == UNKNOWN_STATE
    assert state_in({}, "run", "submit", -1) == UNKNOWN_STATE


def test_mark_success_cancels_only_when_asked():
    assert judge_kill("success", where="worker", cancel_on_mark_success=True).cancel
    assert "cancel_on_mark_success" in judge_kill("success", where="worker").reason


def test_an_execution_timeout_cancels_whatever_the_state():
    verdict = judge_kill(UNKNOWN_STATE, where="worker", execution_timeout=True)
    assert verdict.cancel
    assert verdict.cause is KillCause.TIMEOUT


def test_cancel_retries_are_bounded():
    attempts = CancelAttempts(started=0.0, budget=10.0)
    busy = KlusterAPIError("busy", call="cancel batch", status_code=503)
    assert attempts.after_failure(busy, 0.0) == 1.0
    assert attempts.after_failure(busy, 1.0) == 2.0
    assert attempts.after_failure(busy, 9.5) == 0.5  # never past the budget
    assert attempts.after_failure(busy, 10.0) is None
    refused = KlusterAPIError("bad", call="cancel batch", status_code=400)
    assert CancelAttempts(started=0.0).after_failure(refused, 0.0) is None


# -- the worker --------------------------------------------------------------------------------------------
HAS_PREVIOUS_TI = hasattr(importlib.import_module("airflow.sdk.execution_time.comms"), "GetPreviousTI")
needs_previous_ti = pytest.mark.skipif(not HAS_PREVIOUS_TI, reason="GetPreviousTI (the current try) is 3.2+")


def submit_op(**kwargs) -> KlusterSubmitBatchOperator:
    kwargs.setdefault("requests", PROMPTS)
    kwargs.setdefault("model", MODEL)
    return KlusterSubmitBatchOperator(task_id="submit", **kwargs)


@pytest.fixture
def airflow_tries(monkeypatch):
    """What Airflow answers when asked for the task instance's current try (``GetPreviousTI`` over the comms).

    Set ``answer["try"]`` (``None``: Airflow knows no such task instance) and ``answer["run_id"]`` (the run the
    answer is about); ``answer["calls"]`` records each question.
    """
    if not HAS_PREVIOUS_TI:
        pytest.skip("GetPreviousTI (the current try) is Airflow 3.2+")
    from airflow.sdk.api.datamodels._generated import PreviousTIResponse
    from airflow.sdk.execution_time import comms, task_runner

    answer: dict = {"try": None, "run_id": None, "calls": []}

    class Comms:
        def send(self, msg):
            answer["calls"].append(msg)
            assert isinstance(msg, comms.GetPreviousTI)
            if answer["try"] is None:
                return comms.PreviousTIResult(task_instance=None)
            ti = PreviousTIResponse(
                task_id=msg.task_id,
                dag_id=msg.dag_id,
                run_id=answer["run_id"],
                try_number=answer["try"],
                map_index=msg.map_index,
            )
            return comms.PreviousTIResult(task_instance=ti)

    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", Comms(), raising=False)
    return answer


@pytest.fixture(autouse=True)
def hand_overs(monkeypatch):
    """Every detached cancel the operators start, waited for (or, if it runs on, ended) after the test."""
    from airflow_provider_kluster.operators import kluster as operators

    started: list = []
    real = operators.hand_over_cancel

    def recording(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(operators, "hand_over_cancel", recording)
    yield started
    for hand_over in started:
        if hand_over is None:
            continue
        try:
            hand_over.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            hand_over.process.kill()  # started by this test: never left to run on
            hand_over.process.wait()


def run_the_task(**ti_fields) -> tuple[KlusterSubmitBatchOperator, str, FakeTI]:
    op = submit_op()
    context = make_context("submit", **ti_fields)
    context["ti"].try_number = 1
    return op, op.execute(context), context["ti"]


@pytest.fixture
def running(kluster_conn, emulator):
    """A submit operator in try 1 that created a batch stuck ``in_progress``, as if killed while polling."""
    emulator.emulator.faults.stick_batch("*", "in_progress")
    return run_the_task()


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


@pytest.mark.parametrize(
    ("state", "cancelled"),
    [("failed", True), ("restarting", True), (None, True), ("running", False), ("up_for_retry", False)],
    ids=["marked-failed", "cleared-running", "cleared", "worker-restart", "missed-heartbeats"],
)
def test_worker_cancels_only_on_a_persons_action(
    running, emulator, airflow_says, hand_overs, caplog, capsys, state, cancelled
):
    op, batch_id, _ = running
    airflow_says["state"] = state
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert airflow_says["calls"][-1]["task_ids"] == ["submit"]
    assert (status(emulator, batch_id) == "cancelling") is cancelled
    assert (cancels(emulator) == 1) is cancelled
    assert len(hand_overs) == int(cancelled), "a decided cancel is handed over before anything else"
    expected = "kluster confirmed the cancel" if cancelled else "NOT cancelled"
    text = logged(caplog, capsys)
    assert expected in text
    assert TEST_API_KEY not in text


@pytest.mark.parametrize(("current_try", "cancelled"), [(1, False), (2, True), (None, False)])
def test_worker_running_counts_as_cleared_only_in_a_later_try(
    running, emulator, airflow_says, airflow_tries, caplog, capsys, current_try, cancelled
):
    op, batch_id, ti = running
    airflow_says["state"] = "running"
    airflow_tries.update({"try": current_try, "run_id": ti.run_id})
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert airflow_tries["calls"], "the current try was asked"
    assert (status(emulator, batch_id) == "cancelling") is cancelled
    if current_try is None:
        assert "did not say which try" in logged(caplog, capsys)


@needs_previous_ti
def test_the_current_try_is_this_runs(airflow_tries):
    """Asked with the run's logical date plus 1 µs (Airflow answers the newest task instance *before* it)."""
    import datetime as dt

    from airflow_provider_kluster.ti_state import TaskInstanceRef, read_current_try

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    ref = TaskInstanceRef("dag", "submit", "run-a", -1, 1, when.isoformat())
    airflow_tries.update({"try": 4, "run_id": "run-a"})
    assert read_current_try(ref) == 4
    assert airflow_tries["calls"][-1].logical_date == when + dt.timedelta(microseconds=1)
    airflow_tries["run_id"] = "run-b"  # another run of the same logical date answered
    assert read_current_try(ref) is None


def test_worker_leaves_the_batch_when_airflow_cannot_say(running, emulator, airflow_says, caplog, capsys):
    op, batch_id, _ = running
    airflow_says["error"] = ConnectionError("api-server unreachable")
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert cancels(emulator) == 0
    assert "could not be read" in logged(caplog, capsys)


def test_on_kill_cannot_deadlock_on_airflows_channel(running, emulator, monkeypatch, caplog, capsys):
    """SIGTERM while the main thread is inside ``CommsDecoder.send`` (its lock is not reentrant): no hang."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    op, batch_id, _ = running
    comms_lock = threading.Lock()

    def get_task_states(**_):
        with comms_lock:
            return {}

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(get_task_states))
    took: list[float] = []

    def handler() -> None:  # what the signal handler runs, while the interrupted code holds the lock
        started = time.monotonic()
        op.on_kill()
        took.append(time.monotonic() - started)

    with caplog.at_level(logging.INFO), comms_lock:
        killed = threading.Thread(target=handler, daemon=True)
        killed.start()
        killed.join(10)
        assert not killed.is_alive(), "on_kill waited on the lock its own process holds"
    assert took[0] < WORKER_CANCEL_BUDGET
    assert cancels(emulator) == 0
    text = logged(caplog, capsys)
    assert "did not answer within" in text
    assert f"Batch {batch_id} NOT cancelled" in text


def test_a_kill_between_create_and_publish_cancels_the_batch(
    kluster_conn, emulator, airflow_says, monkeypatch
):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op = submit_op()

    def killed_here(context, batch):
        op.on_kill()  # SIGTERM arrives after the create, before the batch id is pushed
        raise RuntimeError("killed")

    monkeypatch.setattr(op, "publish", killed_here)
    context = make_context("submit")
    context["ti"].try_number = 1
    with pytest.raises(RuntimeError, match="killed"):
        op.execute(context)
    assert op._batch_id is not None
    assert cancels(emulator) == 1
    assert status(emulator, op._batch_id) == "cancelling"


def test_worker_mark_success_cancels_only_when_asked(kluster_conn, emulator, airflow_says):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    airflow_says["state"] = "success"
    kept = submit_op()
    kept_id = kept.execute(make_context("submit"))
    kept.on_kill()
    assert status(emulator, kept_id) not in ("cancelling", "cancelled")
    assert cancels(emulator) == 0
    asked = submit_op(cancel_on_mark_success=True)
    asked_id = asked.execute(make_context("submit"))
    asked.on_kill()
    assert status(emulator, asked_id) == "cancelling"


@pytest.mark.parametrize(
    "fault",
    [{"latency": 1.5}, {"status": 503, "times": 2}],
    ids=["slow-cancel", "two-503s"],
)
def test_worker_cancel_lands_despite_a_slow_or_failing_cancel(
    running, emulator, airflow_says, caplog, capsys, fault
):
    op, batch_id, _ = running
    emulator.emulator.faults.add(CANCEL, **fault)
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert status(emulator, batch_id) == "cancelling"
    assert "kluster confirmed the cancel" in logged(caplog, capsys)


def test_worker_cancel_refused_for_good_says_so(running, emulator, airflow_says, hand_overs, caplog, capsys):
    op, batch_id, _ = running
    emulator.emulator.faults.add(CANCEL, status=400, message="refused")
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert status(emulator, batch_id) not in ("cancelling", "cancelled")
    hand_overs[0].process.wait(timeout=60)
    task_log, outcome = logged(caplog, capsys), read(hand_overs[0].log_path)
    for text in (task_log, outcome):  # the task's inline attempt, then the detached process
        errors = error_lines(text)
        assert errors, text
        assert batch_id in errors[-1]
        assert "may still be running" in errors[-1]
    assert TEST_API_KEY not in task_log + outcome


def test_worker_cancel_outlives_the_task(running, emulator, airflow_says, hand_overs, caplog, capsys):
    """Not confirmed within the seconds Airflow leaves a stopped task: a detached process goes on and lands it."""
    op, batch_id, _ = running
    emulator.emulator.faults.add(CANCEL, status=503, times=12)
    with caplog.at_level(logging.INFO):
        op.on_kill()
    (hand_over,) = hand_overs
    with open(f"/proc/{hand_over.pid}/cmdline", "rb") as fh:
        assert TEST_API_KEY.encode() not in fh.read()
    with open(f"/proc/{hand_over.pid}/environ", "rb") as fh:
        assert TEST_API_KEY.encode() not in fh.read()
    assert hand_over.process.wait(timeout=150) == 0
    assert status(emulator, batch_id) in ("cancelling", "cancelled")
    task_log, outcome = logged(caplog, capsys), read(hand_over.log_path)
    assert hand_over.log_path in task_log, "the task's log says where the outcome goes"
    assert f"Batch {batch_id} is cancelling: kluster confirmed the cancel" in outcome
    assert "kluster confirmed the cancel" not in task_log
    assert TEST_API_KEY not in task_log + outcome


def test_a_detached_cancel_that_cannot_land_says_so(running, emulator, airflow_says, monkeypatch, hand_overs):
    from airflow_provider_kluster.operators import kluster as operators

    op, batch_id, _ = running
    emulator.emulator.faults.add(CANCEL, status=503)
    monkeypatch.setattr(operators, "DEFAULT_CANCEL_BUDGET", 3.0)
    op.on_kill()
    assert hand_overs[0].process.wait(timeout=60) == 1
    assert status(emulator, batch_id) not in ("cancelling", "cancelled")
    outcome = read(hand_overs[0].log_path)
    assert f"Could NOT cancel batch {batch_id}" in outcome
    assert "may still be running" in outcome
    assert "in the detached process" in outcome


@pytest.fixture
def default_conn(emulator, monkeypatch):
    """``kluster_default`` with the connection's DEFAULT timeout (60 s) and retries (5)."""
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url))
    return "kluster_default"


def test_a_hanging_cancel_is_handed_over_within_the_budget(
    default_conn, emulator, airflow_says, hand_overs, caplog, capsys
):
    """kluster answers the cancel only after 10 s, with default client timeout and retries: on_kill is in time."""
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op, batch_id, _ = run_the_task()
    assert (op.hook.settings.timeout, op.hook.settings.max_retries) == (60.0, 5)
    emulator.emulator.faults.add(CANCEL, latency=10.0)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        op.on_kill()
    took = time.monotonic() - started
    assert took < WORKER_CANCEL_BUDGET + 0.3, f"on_kill took {took:.1f}s; Airflow SIGKILLs at 5 s"
    (hand_over,) = hand_overs
    assert hand_over.process.wait(timeout=90) == 0
    assert status(emulator, batch_id) in ("cancelling", "cancelled")
    assert "kluster confirmed the cancel" in read(hand_over.log_path)
    assert f"The cancel of batch {batch_id} is not confirmed" in logged(caplog, capsys)


_KILLED_TASK = """
import json, signal, sys, time
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
# What the API server would say: the task was marked failed.
RuntimeTaskInstance.get_task_states = staticmethod(
    lambda **kw: {kw["run_ids"][0]: {kw["task_ids"][0]: "failed"}}
)
from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator
from airflow_provider_kluster.ti_state import TaskInstanceRef

op = KlusterSubmitBatchOperator(task_id="submit", requests=["hi"], model="m")
op._batch_id = sys.argv[1]
op._ti_ref = TaskInstanceRef("test_dag", "submit", "manual__run", -1, 1)
op.hook.settings  # read during the task's run, as after the create


def on_term(signum, frame):  # as Airflow's task runner: on_kill from the SIGTERM handler
    started = time.monotonic()
    op.on_kill()
    print(json.dumps({"on_kill_seconds": time.monotonic() - started}), flush=True)


signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""


def test_a_task_sigkilled_5s_after_sigterm_still_cancels(default_conn, emulator, hook, tmp_path):
    """The real thing: a task process gets SIGTERM, then SIGKILL 5 s later, while kluster takes 10 s to answer."""
    emulator.emulator.faults.stick_batch("*", "in_progress")
    path = write_jsonl(tmp_path / "in.jsonl", request_lines(2))
    batch_id = hook.create_batch(hook.upload_file(path)).id
    emulator.emulator.faults.add(CANCEL, latency=10.0)
    task = subprocess.Popen(
        [sys.executable, "-c", _KILLED_TASK, batch_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    finisher = None
    try:
        assert task.stdout is not None
        for line in task.stdout:
            if line.strip() == b"ready":
                break
        task.send_signal(signal.SIGTERM)
        time.sleep(5)
        task.kill()  # Airflow's SIGKILL, 5 s after SIGTERM
        killed = time.monotonic()
        out = task.communicate(timeout=30)[0].decode()
        assert time.monotonic() - killed < 3, "the task's output stayed open after it died (a child holds it)"
        took = json.loads(next(line for line in out.splitlines() if "on_kill_seconds" in line))
        assert took["on_kill_seconds"] < WORKER_CANCEL_BUDGET + 0.3
        match = re.search(r"Detached process (\d+) .*its outcome goes to (\S+)", out)
        assert match, out
        finisher, log_path = int(match.group(1)), match.group(2)
        deadline = time.monotonic() + 90
        # The finisher either sends the cancel and hears kluster confirm it, or finds it landed already: the
        # inline attempt's request, abandoned by the dying task, may still reach kluster (10 s later).
        outcomes = (
            f"Batch {batch_id} is cancelling: kluster confirmed the cancel",
            f"Batch {batch_id} already ended",
        )
        while time.monotonic() < deadline and not any(o in read(log_path) for o in outcomes):
            time.sleep(0.5)
        assert any(o in read(log_path) for o in outcomes), read(log_path)
        assert status(emulator, batch_id) in ("cancelling", "cancelled")
        assert TEST_API_KEY not in out + read(log_path)
    finally:
        if task.poll() is None:
            task.kill()
        if finisher is not None:  # not this test's child (the task's): wait for it to log its end and exit
            for _ in range(100):
                if not os.path.exists(f"/proc/{finisher}"):
                    break
                time.sleep(0.1)


def test_execution_timeout_cancels_without_asking_airflow(running, emulator, airflow_says):
    try:
        from airflow.sdk.exceptions import AirflowTaskTimeout
    except ImportError:  # Airflow < 3.2
        from airflow.exceptions import AirflowTaskTimeout  # type: ignore[no-redef]

    op, batch_id, _ = running
    airflow_says["state"] = "running"  # would mean "not a person"
    try:
        raise AirflowTaskTimeout("Timeout")
    except AirflowTaskTimeout:
        op.on_kill()  # as Airflow's task runner calls it
    assert airflow_says["calls"] == []
    assert status(emulator, batch_id) == "cancelling"


# -- clear means a new batch -------------------------------------------------------------------------------
class Store(dict):
    """A task state store (Airflow 3.3's ``task_state_store``) kept in memory across tries."""

    def set(self, key, value, **_):
        self[key] = value


def try_context(run_id: str, store: Store | None, *, try_number: int, max_tries: int) -> dict:
    ti = FakeTI("submit", run_id=run_id)
    ti.try_number = try_number
    ti.max_tries = max_tries
    return {"ti": ti} if store is None else {"ti": ti, "task_state_store": store}


def test_a_try_after_a_clear_never_reattaches(kluster_conn, emulator, airflow_says, caplog, capsys):
    """The cleared try's cancel may land late; the new try cancels that batch itself and submits a new one."""
    emulator.emulator.faults.stick_batch("*", "in_progress")
    run_id, store = f"manual__{uuid.uuid4().hex}", Store()
    first = submit_op().execute(try_context(run_id, store, try_number=1, max_tries=0))
    assert store[STATE_BATCH_KEY]["max_tries"] == 0
    with caplog.at_level(logging.INFO):
        second = submit_op().execute(
            try_context(run_id, store, try_number=2, max_tries=1)
        )  # cleared: max_tries rose
    assert second != first
    assert status(emulator, first) == "cancelling"
    assert "cleared since" in logged(caplog, capsys)
    assert store[STATE_BATCH_KEY]["batch_id"] == second


def test_a_try_after_a_clear_never_reattaches_without_a_state_store(kluster_conn, emulator, caplog, capsys):
    """Airflow 3.1-3.2, or a state store emptied by mark success: the batch's metadata tells the same."""
    emulator.emulator.faults.stick_batch("*", "in_progress")
    run_id = f"manual__{uuid.uuid4().hex}"
    first = submit_op().execute(try_context(run_id, None, try_number=1, max_tries=0))
    assert emulator.emulator.get_batch_raw(first)["metadata"]["airflow_max_tries"] == "0"
    retried = submit_op().execute(try_context(run_id, None, try_number=2, max_tries=0))
    assert retried == first  # a retry reattaches
    second = submit_op().execute(try_context(run_id, None, try_number=3, max_tries=2))  # cleared
    assert second != first
    assert status(emulator, first) == "cancelling"
    assert "cleared since" in logged(caplog, capsys)


def test_a_retry_reattaches(kluster_conn, emulator):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    run_id, store = f"manual__{uuid.uuid4().hex}", Store()
    first = submit_op().execute(try_context(run_id, store, try_number=1, max_tries=2))
    again = submit_op().execute(
        try_context(run_id, store, try_number=2, max_tries=2)
    )  # a retry: same max_tries
    assert again == first
    assert cancels(emulator) == 0


def test_results_of_an_empty_batch_id_say_why(kluster_conn):
    op = KlusterGetBatchResultsOperator(task_id="results", batch_id="", destination="results")
    with pytest.raises(KlusterConfigError, match="marked success"):
        op.execute(make_context("results"))


# -- the triggerer (Airflow 3.3+) --------------------------------------------------------------------------
needs_33 = pytest.mark.skipif(not AIRFLOW_33, reason="triggers get on_kill() only from Airflow 3.3")


def deferred_ti() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        id=uuid.uuid4(),
        dag_id="test_dag",
        task_id="submit",
        run_id=f"manual__{uuid.uuid4().hex}",
        try_number=1,
        map_index=-1,
        context_carrier=None,
    )


async def airflow_kills(trigger: KlusterBatchTrigger, *, resend_every: float = 0.3) -> tuple[int, int]:
    """Run the trigger in Airflow's ``TriggerRunner.run_trigger`` and kill it as the triggerer does.

    The triggerer cancels a trigger's task with its user-action message, and every state sync (about once a
    second) sends the cancel again while the task lives (``TriggerRunner.cancel_triggers``). Returns the kills sent.
    """
    import structlog
    from airflow.jobs.triggerer_job_runner import _USER_ACTION_CANCEL_MSG, TriggerRunner

    runner = types.SimpleNamespace(
        triggers={1: {"name": "kluster", "events": 0}},
        events=collections.deque(),
        log=structlog.get_logger("test_triggerer"),
        _shared_streams=None,
    )
    task = asyncio.create_task(TriggerRunner.run_trigger(runner, 1, trigger))  # type: ignore[arg-type]
    runner.triggers[1]["task"] = task
    await asyncio.sleep(0.3)  # it polls
    kills = 0
    while not task.done():
        task.cancel(_USER_ACTION_CANCEL_MSG)
        kills += 1
        await asyncio.sleep(resend_every)
    pending = len(trigger_module._CANCELS)
    for _ in range(200):  # a cancel the trigger could not stay with goes on: let it end before the loop does
        if not trigger_module._CANCELS:
            break
        await asyncio.sleep(0.1)
    return kills, pending


def trigger_for(submit_batch, **kwargs) -> KlusterBatchTrigger:
    trigger = KlusterBatchTrigger(batch_id=submit_batch, poll_interval=0.1, **kwargs)
    trigger.task_instance = deferred_ti()
    return trigger


@pytest.fixture
def deferred_batch(kluster_conn, emulator, hook, tmp_path):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    path = write_jsonl(tmp_path / "in.jsonl", request_lines(3))
    batch_id = hook.create_batch(hook.upload_file(path)).id
    wait_for(hook, batch_id, until=lambda b: b.status_text == "in_progress")
    return batch_id


@needs_33
@pytest.mark.parametrize(
    "fault",
    [{"latency": 2.5}, {"status": 503, "times": 3}],
    ids=["slow-cancel", "three-503s"],
)
def test_trigger_cancel_survives_airflow_resending_the_kill(
    deferred_batch, emulator, airflow_says, caplog, capsys, fault
):
    airflow_says["state"] = "failed"
    emulator.emulator.faults.add(CANCEL, **fault)
    with caplog.at_level(logging.INFO):
        kills, pending = asyncio.run(airflow_kills(trigger_for(deferred_batch)))
    assert kills >= 2, "the kill was re-sent while the cancel ran"
    assert pending == 0, "the trigger ended before its cancel did: the outcome would miss the task's log"
    assert status(emulator, deferred_batch) == "cancelling"
    text = logged(caplog, capsys)
    assert "kluster confirmed the cancel" in text
    assert TEST_API_KEY not in text


@needs_33
def test_trigger_handed_to_another_triggerer_leaves_its_batch(
    deferred_batch, emulator, airflow_says, caplog, capsys
):
    airflow_says["state"] = "deferred"  # what a stalled triggerer's hand-over looks like
    with caplog.at_level(logging.INFO):
        asyncio.run(airflow_kills(trigger_for(deferred_batch)))
    assert cancels(emulator) == 0
    assert status(emulator, deferred_batch) == "in_progress"
    assert "moved to another triggerer" in logged(caplog, capsys)


@needs_33
@pytest.mark.parametrize(("state", "cancelled"), [(None, True), ("success", False), (UNKNOWN_STATE, False)])
def test_trigger_verdicts(deferred_batch, emulator, airflow_says, state, cancelled):
    if state == UNKNOWN_STATE:
        airflow_says["error"] = ConnectionError("no answer")
    else:
        airflow_says["state"] = state
    asyncio.run(airflow_kills(trigger_for(deferred_batch)))
    assert (status(emulator, deferred_batch) == "cancelling") is cancelled


@needs_33
@pytest.mark.parametrize(
    ("state", "cancelled", "said"),
    [
        ("scheduled", True, "kluster confirmed the cancel"),
        ("running", True, "kluster confirmed the cancel"),
        ("deferred", False, "its trigger moved to another triggerer"),
    ],
)
def test_the_trigger_judges_by_state_and_never_asks_airflow_for_the_try(
    deferred_batch, emulator, airflow_says, airflow_tries, caplog, capsys, state, cancelled, said
):
    """The triggerer's channel to Airflow has no "which try" question in 3.3.2: asking it (GetPreviousTI) got
    an answer the triggerer could not read, and no clear of a deferred task cancelled its batch (seen on the
    real scheduler). So the trigger reads the state only."""
    trigger = trigger_for(deferred_batch, logical_date="2026-01-02T03:04:05+00:00")
    airflow_says["state"] = state
    airflow_tries.update({"try": 2, "run_id": trigger.task_instance.run_id})
    with caplog.at_level(logging.INFO):
        asyncio.run(airflow_kills(trigger))
    assert not [c for c in airflow_tries["calls"] if type(c).__name__ == "GetPreviousTI"]
    assert (status(emulator, deferred_batch) == "cancelling") is cancelled
    assert (cancels(emulator) == 1) is cancelled
    assert said in logged(caplog, capsys)


@needs_33
def test_trigger_cancel_that_cannot_be_sent_says_so(deferred_batch, emulator, airflow_says, caplog, capsys):
    airflow_says["state"] = "failed"
    emulator.emulator.faults.add(CANCEL, status=503)
    with caplog.at_level(logging.INFO):
        asyncio.run(airflow_kills(trigger_for(deferred_batch, cancel_budget=3.0)))
    assert status(emulator, deferred_batch) == "in_progress"
    text = logged(caplog, capsys)
    assert any(deferred_batch in e and "may still be running" in e for e in error_lines(text)), text


@needs_33
def test_the_user_action_message_is_airflows():
    from airflow.jobs.triggerer_job_runner import _USER_ACTION_CANCEL_MSG

    assert trigger_module.USER_ACTION_CANCEL_MSG == _USER_ACTION_CANCEL_MSG


@needs_33
def test_a_triggerer_shutdown_cancels_nothing(deferred_batch, emulator, airflow_says):
    """A cancel without Airflow's user-action message (the triggerer stopping) ends the wait at once."""
    airflow_says["state"] = "failed"

    async def shutdown() -> None:
        task = asyncio.create_task(trigger_for(deferred_batch).run().__anext__())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(shutdown())
    assert cancels(emulator) == 0
    assert airflow_says["calls"] == []


def test_trigger_kwargs_carry_the_new_settings(kluster_conn):
    _, kwargs = KlusterBatchTrigger(
        "b", cancel_on_mark_success=True, cancel_budget=30, logical_date="2026-01-02T03:04:05+00:00"
    ).serialize()
    assert kwargs["cancel_on_mark_success"] is True
    assert kwargs["cancel_budget"] == 30.0
    assert kwargs["logical_date"] == "2026-01-02T03:04:05+00:00"
    assert json.loads(json.dumps(kwargs)) == kwargs


def test_the_operator_gives_its_trigger_the_runs_logical_date(kluster_conn):
    import datetime as dt

    op = submit_op(deferrable=True, wait_for_completion=True)
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    context = make_context("submit")
    context["dag_run"] = types.SimpleNamespace(logical_date=when)
    op.remember_task(context)
    assert op.make_trigger("b", None).logical_date == when.isoformat()
