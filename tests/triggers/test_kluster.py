"""KlusterBatchTrigger against the emulator over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import FakeTI, request_lines, wait_for, write_jsonl


@pytest.fixture
def hook(kluster_conn):
    return KlusterHook(kluster_conn)


@pytest.fixture
def submit(hook, tmp_path):
    def _submit(n: int = 5) -> str:
        path = write_jsonl(tmp_path / f"r{n}.jsonl", request_lines(n))
        return hook.create_batch(hook.upload_file(path)).id

    return _submit


def run_trigger(trigger: KlusterBatchTrigger, timeout: float = 30.0) -> list[dict]:
    """Run the trigger to its end and return every event it fired."""

    async def collect():
        return [event.payload async for event in trigger.run()]

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def make(batch_id: str, **kwargs) -> KlusterBatchTrigger:
    kwargs.setdefault("poll_interval", 0.05)
    return KlusterBatchTrigger(batch_id=batch_id, **kwargs)


def test_serialize_round_trips_json_native_kwargs_without_the_key(kluster_conn):
    trigger = KlusterBatchTrigger(
        "b1",
        kluster_conn_id=kluster_conn,
        poll_interval=30,
        deadline=1.8e9,
        cancel_on_kill=False,
        max_consecutive_errors=7,
    )
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_kluster.triggers.kluster.KlusterBatchTrigger"
    text = json.dumps(kwargs)
    assert TEST_API_KEY not in text
    rebuilt = KlusterBatchTrigger(**json.loads(text))
    assert rebuilt.serialize() == (path, kwargs)


@pytest.mark.parametrize(
    ("force", "event_status"),
    [(None, "success"), ("failed", "failed"), ("expired", "expired"), ("cancelled", "cancelled")],
    ids=["completed", "failed", "expired", "cancelled"],
)
def test_one_event_per_terminal_status(emulator, submit, force, event_status):
    batch_id = submit()
    if force:
        emulator.emulator.faults.stick_batch(batch_id, "in_progress")
        emulator.emulator.set_batch_status(batch_id, force)
    events = run_trigger(make(batch_id))
    assert len(events) == 1
    (event,) = events
    assert event["status"] == event_status
    assert event["batch_id"] == batch_id
    assert event["batch_status"] == (force or "completed")
    assert batch_id in event["message"]
    assert json.loads(json.dumps(event)) == event  # JSON-native
    if event_status == "success":
        assert event["output_file_id"]
        assert event["request_counts"] == {"total": 5, "completed": 5, "failed": 0}


def test_unknown_status_keeps_waiting(emulator, submit, canned_status):
    batch_id = submit()
    trigger = make(batch_id)
    events = run_trigger(trigger)
    assert events[0]["status"] == "success"
    assert canned_status["unknown_seen"] >= 1


@pytest.fixture
def canned_status(emulator, monkeypatch):
    """Make the first two polls answer an undocumented status, as a new kluster release might."""
    seen = {"unknown_seen": 0}
    original = KlusterHook.aget_batch

    async def aget_batch(self, batch_id):
        batch = await original(self, batch_id)
        if seen["unknown_seen"] < 2:
            seen["unknown_seen"] += 1
            from airflow_provider_kluster.batches import KlusterBatch

            return KlusterBatch.from_api({**batch.raw, "status": "Rebalancing"})
        return batch

    monkeypatch.setattr(KlusterHook, "aget_batch", aget_batch)
    return seen


def test_transient_failures_then_success(emulator, submit):
    batch_id = submit()
    # The client retries each poll twice (max_retries=2): 4 failures cost the trigger one failed poll.
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, times=4, retry_after=0)
    events = run_trigger(make(batch_id))
    assert [e["status"] for e in events] == ["success"]
    assert rule.fired == 4


def test_dropped_connections_are_transient(emulator, submit):
    batch_id = submit()
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", drop_connection=True, times=4)
    assert run_trigger(make(batch_id))[0]["status"] == "success"
    assert rule.fired == 4


def test_gives_up_after_the_bound_of_consecutive_failures(emulator, submit):
    batch_id = submit()
    emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=502, times=1000, retry_after=0)
    (event,) = run_trigger(make(batch_id, max_consecutive_errors=2, poll_interval=0.01))
    assert event["status"] == "error"
    assert "3 failures in a row" in event["message"]  # 2 tolerated, the third ends the wait
    assert "502" in event["message"]
    assert emulator.emulator.counters["GET /v1/batches/{id}"] == 9  # 3 polls x (1 + 2 client retries)


def test_not_found_ends_the_wait_at_once(emulator, kluster_conn):
    (event,) = run_trigger(make("000000000000000000000000"))
    assert event["status"] == "error"
    assert "permanent" in event["message"]
    assert "000000000000000000000000" in event["message"]
    assert emulator.emulator.counters["GET /v1/batches/{id}"] == 1


def test_auth_failure_ends_the_wait_without_the_key(emulator, submit, monkeypatch):
    batch_id = submit()
    wrong = "kl-WRONG-9d8c7b6a5f"
    monkeypatch.setenv("AIRFLOW_CONN_BAD", conn_json(emulator.base_url, api_key=wrong))
    (event,) = run_trigger(make(batch_id, kluster_conn_id="bad"))
    assert event["status"] == "error"
    assert "401" in event["message"]
    assert wrong not in json.dumps(event)


def test_deadline_fires_a_timeout_event(emulator, submit):
    batch_id = submit()
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    (event,) = run_trigger(make(batch_id, deadline=time.time() + 0.5))
    assert event["status"] == "timeout"
    assert event["batch_status"] == "in_progress"
    assert "deadline" in event["message"]


def test_a_batch_finished_at_the_deadline_is_not_timed_out(emulator, submit, hook):
    batch_id = submit()
    wait_for(hook, batch_id)
    (event,) = run_trigger(make(batch_id, deadline=time.time() - 60))  # picked up after its deadline
    assert event["status"] == "success"
    assert emulator.emulator.counters.get("POST /v1/batches/{id}/cancel", 0) == 0


def test_a_timeout_reports_the_status_the_batch_had(emulator, submit, hook):
    batch_id = submit()
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    wait_for(hook, batch_id, until=lambda b: b.status_text == "in_progress")
    (event,) = run_trigger(make(batch_id, deadline=time.time() - 60))
    assert event["status"] == "timeout"
    assert "still in_progress" in event["message"]


def test_deadline_survives_a_triggerer_restart(emulator, submit):
    batch_id = submit()
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    deadline = time.time() + 1.0
    first = make(batch_id, deadline=deadline)

    async def run_briefly():
        agen = first.run()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(agen.__anext__(), 0.3)  # the triggerer dies mid-wait

    asyncio.run(run_briefly())
    _, kwargs = first.serialize()
    restarted = KlusterBatchTrigger(**json.loads(json.dumps(kwargs)))
    start = time.time()
    (event,) = run_trigger(restarted)
    assert event["status"] == "timeout"
    assert time.time() - start < 1.0  # the original deadline, not a fresh one
    assert time.time() >= deadline


def test_on_kill_cancels_the_batch(emulator, submit, hook, airflow_says):
    airflow_says["state"] = "failed"  # a person marked the deferred task failed
    batch_id = submit()
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    trigger = make(batch_id)
    trigger.task_instance = FakeTI("wait")
    asyncio.run(trigger.on_kill())
    emulator.emulator.faults.unstick_batch(batch_id)
    assert wait_for(hook, batch_id).status_text == "cancelled"


def test_on_kill_leaves_the_batch_when_told_to(emulator, submit, hook):
    batch_id = submit()
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    wait_for(hook, batch_id, until=lambda b: b.status_text == "in_progress")
    asyncio.run(make(batch_id, cancel_on_kill=False).on_kill())
    assert emulator.emulator.counters.get("POST /v1/batches/{id}/cancel", 0) == 0
    assert hook.get_batch(batch_id).status_text == "in_progress"


def test_cleanup_never_cancels(emulator, submit, hook):
    batch_id = submit()
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    asyncio.run(make(batch_id).cleanup())
    assert emulator.emulator.counters.get("POST /v1/batches/{id}/cancel", 0) == 0


def test_many_triggers_share_one_client(kluster_conn):
    async def clients():
        triggers = [make(f"b{i}", kluster_conn_id=kluster_conn) for i in range(50)]
        return {id(await t._hook().get_async_conn()) for t in triggers}

    assert len(asyncio.run(clients())) == 1
