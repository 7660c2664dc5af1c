"""KlusterBatchSensor against the emulator: poke and deferrable."""

from __future__ import annotations

import asyncio

import pytest

try:
    from airflow.sdk.exceptions import TaskDeferred
except ImportError:  # Airflow < 3.2
    from airflow.exceptions import TaskDeferred

from airflow_provider_kluster.exceptions import (
    KlusterBatchExpiredError,
    KlusterBatchFailedError,
    KlusterWaitError,
)
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.links import KlusterBatchLink
from airflow_provider_kluster.sensors.kluster import KlusterBatchSensor
from tests.conftest import conn_json
from tests.helpers import make_context, request_lines, run_deferred, wait_for, write_jsonl


@pytest.fixture
def batch_id(kluster_conn, tmp_path):
    hook = KlusterHook(kluster_conn)
    return hook.create_batch(hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(3)))).id


def sensor(batch_id: str, **kwargs) -> KlusterBatchSensor:
    kwargs.setdefault("poke_interval", 0.05)
    kwargs.setdefault("timeout", 30)
    return KlusterBatchSensor(task_id="wait", batch_id=batch_id, **kwargs)


def test_poke_is_false_while_running_then_true(batch_id, emulator, kluster_conn):
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    s = sensor(batch_id)
    assert s.poke(make_context()) is False
    emulator.emulator.faults.unstick_batch(batch_id)
    wait_for(KlusterHook(kluster_conn), batch_id)
    assert s.poke(make_context()) is True


def test_poke_raises_on_failed(batch_id, emulator, kluster_conn):
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    wait_for(KlusterHook(kluster_conn), batch_id, until=lambda b: b.status_text == "in_progress")
    emulator.emulator.set_batch_status(batch_id, "failed")
    with pytest.raises(KlusterBatchFailedError, match=batch_id):
        sensor(batch_id).poke(make_context())


@pytest.fixture
def one_request_per_poll(emulator, monkeypatch):
    """No client retries: each poll is one request, so fault firings count polls."""
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, max_retries=0))


@pytest.mark.parametrize("max_errors", [0, 1, 2, 3])
def test_poke_fails_on_one_error_more_than_max_consecutive_errors(
    batch_id, emulator, one_request_per_poll, max_errors
):
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, retry_after=0)
    s = sensor(batch_id, max_consecutive_errors=max_errors)
    with pytest.raises(KlusterWaitError, match=f"after {max_errors + 1} failures in a row.*HTTP 503") as info:
        s.poke(make_context())
    assert rule.fired == max_errors + 1
    assert info.value.batch_id == batch_id


@pytest.mark.parametrize("errors", ["N-1", "N"])
def test_poke_tolerates_up_to_max_consecutive_errors(batch_id, emulator, one_request_per_poll, errors):
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    times = {"N-1": 2, "N": 3}[errors]
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, times=times, retry_after=0)
    assert sensor(batch_id, max_consecutive_errors=3).poke(make_context()) is False
    assert rule.fired == times


def test_poke_retries_fewer_errors_within_the_poke(batch_id, emulator, one_request_per_poll):
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, times=2, retry_after=0)
    assert sensor(batch_id, max_consecutive_errors=3).poke(make_context()) is False
    assert rule.fired == 2
    # The next poke starts with nothing owed: two more errors are tolerated again.
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, times=2, retry_after=0)
    assert sensor(batch_id, max_consecutive_errors=3).poke(make_context()) is False
    assert rule.fired == 2


def test_poke_raises_at_once_on_not_found(kluster_conn, emulator, one_request_per_poll):
    with pytest.raises(KlusterWaitError, match="permanent error.*HTTP 404"):
        sensor("000000000000000000000000").poke(make_context())
    assert emulator.emulator.counters.get("GET /v1/batches/{id}", 0) == 1


def test_poke_mode_execute_waits_to_success(batch_id, emulator):
    context = make_context()
    sensor(batch_id, mode="poke").execute(context)
    assert emulator.emulator.get_batch_raw(batch_id)["status"] == "completed"
    assert context["ti"].xcom[KlusterBatchLink().xcom_key].endswith(f"/batches/{batch_id}")


def test_deferrable_success(batch_id):
    assert run_deferred(sensor(batch_id, deferrable=True), make_context()) == batch_id


def test_deferrable_expired_raises(batch_id, emulator, kluster_conn):
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    wait_for(KlusterHook(kluster_conn), batch_id, until=lambda b: b.status_text == "in_progress")
    emulator.emulator.set_batch_status(batch_id, "expired")
    with pytest.raises(KlusterBatchExpiredError, match="completion window"):
        run_deferred(sensor(batch_id, deferrable=True), make_context())


def test_deferred_sensor_leaves_the_batch_running_when_killed(batch_id, emulator):
    """A sensor watches a batch it may not own: killing its deferred wait must not cancel the batch."""
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    with pytest.raises(TaskDeferred) as deferred:
        sensor(batch_id, deferrable=True).execute(make_context())
    trigger = deferred.value.trigger
    asyncio.run(trigger.on_kill())
    assert emulator.emulator.counters.get("POST /v1/batches/{id}/cancel", 0) == 0
    assert emulator.emulator.get_batch_raw(batch_id)["status"] not in ("cancelling", "cancelled")
