"""The sensor in ``mode="reschedule"``, run by ``dag.test()``: every poke is a fresh operator instance.

``max_consecutive_errors`` must still mean "this many failed polls in a row are tolerated, one more fails the
task" — before the
waiting policy moved into one place, each reschedule started the count again, so a batch that could no longer
be read was waited on until the sensor's timeout.
"""

from __future__ import annotations

import pathlib
import threading

import pytest

from airflow_provider_kluster.hooks.kluster import KlusterHook
from tests.conftest import conn_json
from tests.helpers import request_lines, write_jsonl

DAGS = pathlib.Path(__file__).parent / "dags"


@pytest.fixture
def reschedule_env(emulator, monkeypatch, airflow_db, tmp_path):
    import airflow.settings

    # dag.test() runs DAGs of the configured dags folder's bundle: for this test, that is ours.
    monkeypatch.setattr(airflow.settings, "DAGS_FOLDER", str(DAGS))
    # No client retries: every poll is exactly one request, so the emulator's counts are the poll counts.
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, max_retries=0))
    hook = KlusterHook("kluster_default")
    batch_id = hook.create_batch(hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(3)))).id
    monkeypatch.setenv("KLUSTER_TEST_BATCH_ID", batch_id)
    monkeypatch.setenv("KLUSTER_TEST_MAX_ERRORS", "3")
    return batch_id


def _run():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    run = bag.get_dag("kluster_sensor_reschedule").test()
    (ti,) = run.get_task_instances()
    return run, ti


def _reschedules(ti) -> int:
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.scalar(select(func.count(TaskReschedule.id)).where(TaskReschedule.ti_id == ti.id))


def test_reschedule_mode_fails_after_max_consecutive_errors(reschedule_env, emulator):
    emulator.emulator.faults.stick_batch(reschedule_env, "in_progress")
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, retry_after=0)
    run, ti = _run()
    assert run.state == "failed"
    assert ti.state == "failed"
    # Three failed polls tolerated, the fourth failed the task — not the sensor's timeout, 90 s later.
    assert rule.fired == 4


def test_reschedule_mode_tolerates_fewer_errors_and_reschedules_until_done(reschedule_env, emulator):
    emulator.emulator.faults.stick_batch(reschedule_env, "in_progress")
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, times=2, retry_after=0)
    stop = threading.Event()

    def release_after_two_running_polls():
        # 2 failed polls, then 2 that saw the batch running (so at least one reschedule), then let it finish.
        while not stop.wait(0.05):
            if emulator.emulator.counters.get("GET /v1/batches/{id}", 0) >= 4:
                emulator.emulator.faults.unstick_batch(reschedule_env)
                return

    release = threading.Thread(target=release_after_two_running_polls, daemon=True)
    release.start()
    try:
        run, ti = _run()
    finally:
        stop.set()
        release.join()
    assert run.state == "success"
    assert rule.fired == 2
    assert ti.try_number == 1
    assert _reschedules(ti) >= 1  # it really was rescheduled between pokes
