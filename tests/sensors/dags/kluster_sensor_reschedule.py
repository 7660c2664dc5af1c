"""A sensor in reschedule mode, for tests/sensors/test_reschedule.py (run with ``dag.test()``)."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG

from airflow_provider_kluster.sensors.kluster import KlusterBatchSensor

with DAG(
    dag_id="kluster_sensor_reschedule",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):
    KlusterBatchSensor(
        task_id="wait",
        batch_id=os.environ.get("KLUSTER_TEST_BATCH_ID", "unset"),
        mode="reschedule",
        poke_interval=1,
        timeout=90,
        max_consecutive_errors=int(os.environ.get("KLUSTER_TEST_MAX_ERRORS", "3")),
        retries=0,
    )
