"""A submit task with one retry, for tests/operators/test_reattach_at_scale.py (run with ``dag.test()``)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator

with DAG(
    dag_id="kluster_submit_retry",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):
    KlusterSubmitBatchOperator(
        task_id="submit",
        requests=["What is 1 + 1?", "Name a colour."],
        model="klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        retries=1,
        retry_delay=timedelta(seconds=1),
    )
