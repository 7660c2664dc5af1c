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
import logging
import types
import uuid

import airflow
import pytest
from packaging.version import Version

from airflow_provider_kluster.cancelling import (
    UNKNOWN_STATE,
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
from tests.conftest import TEST_API_KEY
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
@pytest.mark.parametrize(
    ("state", "where", "cancel", "cause"),
    [
        ("failed", "triggerer", True, KillCause.MARKED),
        ("failed", "worker", True, KillCause.MARKED),
        ("skipped", "triggerer", True, KillCause.MARKED),
        (None, "triggerer", True, KillCause.CLEARED),
        ("scheduled", "triggerer", True, KillCause.CLEARED),
        ("queued", "triggerer", True, KillCause.CLEARED),
        ("running", "triggerer", True, KillCause.CLEARED),
        ("restarting", "worker", True, KillCause.CLEARED),
        (None, "worker", True, KillCause.CLEARED),
        ("deferred", "triggerer", False, KillCause.NOT_A_PERSON),  # handed to another triggerer
        ("running", "worker", False, KillCause.NOT_A_PERSON),  # scheduler / worker restart
        ("up_for_retry", "worker", False, KillCause.NOT_A_PERSON),  # missed heartbeats
        ("up_for_retry", "triggerer", False, KillCause.NOT_A_PERSON),
        ("success", "triggerer", False, KillCause.MARKED_SUCCESS),
        ("success", "worker", False, KillCause.MARKED_SUCCESS),
        (UNKNOWN_STATE, "triggerer", False, KillCause.UNKNOWN),
        (UNKNOWN_STATE, "worker", False, KillCause.UNKNOWN),
        ("up_for_reschedule", "worker", False, KillCause.UNKNOWN),
    ],
)
def test_only_a_persons_action_cancels(state, where, cancel, cause):
    verdict = judge_kill(state, where=where)
    assert (verdict.cancel, verdict.cause) == (cancel, cause)
    assert verdict.reason


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
def submit_op(**kwargs) -> KlusterSubmitBatchOperator:
    kwargs.setdefault("requests", PROMPTS)
    kwargs.setdefault("model", MODEL)
    return KlusterSubmitBatchOperator(task_id="submit", **kwargs)


@pytest.fixture
def running(kluster_conn, emulator):
    """A submit operator that created a batch stuck ``in_progress``, as if killed while polling."""
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op = submit_op()
    batch_id = op.execute(make_context("submit"))
    return op, batch_id


@pytest.mark.parametrize(
    ("state", "cancelled"),
    [("failed", True), ("restarting", True), (None, True), ("running", False), ("up_for_retry", False)],
    ids=["marked-failed", "cleared-running", "cleared", "worker-restart", "missed-heartbeats"],
)
def test_worker_cancels_only_on_a_persons_action(
    running, emulator, airflow_says, caplog, capsys, state, cancelled
):
    op, batch_id = running
    airflow_says["state"] = state
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert airflow_says["calls"][-1]["task_ids"] == ["submit"]
    assert (status(emulator, batch_id) == "cancelling") is cancelled
    assert (cancels(emulator) == 1) is cancelled
    expected = "kluster confirmed the cancel" if cancelled else "NOT cancelled"
    text = logged(caplog, capsys)
    assert expected in text
    assert TEST_API_KEY not in text


def test_worker_leaves_the_batch_when_airflow_cannot_say(running, emulator, airflow_says, caplog, capsys):
    op, batch_id = running
    airflow_says["error"] = ConnectionError("api-server unreachable")
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert cancels(emulator) == 0
    assert "could not be read" in logged(caplog, capsys)


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
    op, batch_id = running
    emulator.emulator.faults.add(CANCEL, **fault)
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert status(emulator, batch_id) == "cancelling"
    assert "kluster confirmed the cancel" in logged(caplog, capsys)


def test_worker_cancel_refused_for_good_says_so(running, emulator, airflow_says, caplog, capsys):
    op, batch_id = running
    emulator.emulator.faults.add(CANCEL, status=400, message="refused")
    with caplog.at_level(logging.INFO):
        op.on_kill()
    assert status(emulator, batch_id) not in ("cancelling", "cancelled")
    text = logged(caplog, capsys)
    errors = error_lines(text)
    assert errors, text
    assert batch_id in errors[-1]
    assert "may still be running" in errors[-1]
    assert TEST_API_KEY not in text


def wait_until_exited(pid: int, timeout: float = 60.0) -> None:
    import os
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs after {timeout}s")


def test_worker_cancel_outlives_the_task(running, emulator, airflow_says, monkeypatch, capfd):
    """Not confirmed within the seconds Airflow leaves a stopped task: a detached process goes on and lands it."""
    from airflow_provider_kluster.operators import kluster as operators

    op, batch_id = running
    emulator.emulator.faults.add(CANCEL, status=503, times=12)
    started = []
    real = operators.hand_over_cancel
    monkeypatch.setattr(
        operators, "hand_over_cancel", lambda *a, **k: started.append(real(*a, **k)) or started[-1]
    )
    op.on_kill()
    (pid,) = started
    assert pid
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        assert TEST_API_KEY.encode() not in fh.read()
    with open(f"/proc/{pid}/environ", "rb") as fh:
        assert TEST_API_KEY.encode() not in fh.read()
    wait_until_exited(pid)
    assert status(emulator, batch_id) in ("cancelling", "cancelled")
    out, err = capfd.readouterr()  # the detached process logs to the task's output
    assert "kluster confirmed the cancel" in out + err
    assert TEST_API_KEY not in out + err


def test_a_detached_cancel_that_cannot_land_says_so(running, emulator, airflow_says, monkeypatch, capfd):
    from airflow_provider_kluster.operators import kluster as operators

    op, batch_id = running
    emulator.emulator.faults.add(CANCEL, status=503)
    monkeypatch.setattr(operators, "DEFAULT_CANCEL_BUDGET", 3.0)
    started = []
    real = operators.hand_over_cancel
    monkeypatch.setattr(
        operators, "hand_over_cancel", lambda *a, **k: started.append(real(*a, **k)) or started[-1]
    )
    op.on_kill()
    wait_until_exited(started[0])
    assert status(emulator, batch_id) not in ("cancelling", "cancelled")
    out, err = capfd.readouterr()
    assert f"Could NOT cancel batch {batch_id}" in out + err
    assert "may still be running" in out + err
    assert "in the detached process" in out + err


def test_execution_timeout_cancels_without_asking_airflow(running, emulator, airflow_says):
    try:
        from airflow.sdk.exceptions import AirflowTaskTimeout
    except ImportError:  # Airflow < 3.2
        from airflow.exceptions import AirflowTaskTimeout  # type: ignore[no-redef]

    op, batch_id = running
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
    _, kwargs = KlusterBatchTrigger("b", cancel_on_mark_success=True, cancel_budget=30).serialize()
    assert kwargs["cancel_on_mark_success"] is True
    assert kwargs["cancel_budget"] == 30.0
