"""KlusterBatchSensor against the emulator: poke and deferrable."""

from __future__ import annotations

import pytest

from airflow_provider_kluster.exceptions import (
    KlusterBatchExpiredError,
    KlusterBatchFailedError,
    KlusterNotFoundError,
)
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.sensors.kluster import KlusterBatchSensor
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


def test_poke_tolerates_transient_errors_up_to_the_bound(batch_id, emulator):
    emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, times=100, retry_after=0)
    s = sensor(batch_id, max_consecutive_errors=2)
    assert s.poke(make_context()) is False
    with pytest.raises(Exception, match="503"):
        s.poke(make_context())


def test_poke_raises_at_once_on_not_found(kluster_conn, emulator):
    with pytest.raises(KlusterNotFoundError):
        sensor("000000000000000000000000").poke(make_context())


def test_poke_mode_execute_waits_to_success(batch_id):
    sensor(batch_id, mode="poke").execute(make_context())


def test_deferrable_success(batch_id):
    assert run_deferred(sensor(batch_id, deferrable=True), make_context()) == batch_id


def test_deferrable_expired_raises(batch_id, emulator, kluster_conn):
    emulator.emulator.faults.stick_batch(batch_id, "in_progress")
    wait_for(KlusterHook(kluster_conn), batch_id, until=lambda b: b.status_text == "in_progress")
    emulator.emulator.set_batch_status(batch_id, "expired")
    with pytest.raises(KlusterBatchExpiredError, match="completion window"):
        run_deferred(sensor(batch_id, deferrable=True), make_context())


def test_deferred_sensor_does_not_cancel_on_kill_by_default(batch_id):
    assert sensor(batch_id, deferrable=True).cancel_on_kill is False
