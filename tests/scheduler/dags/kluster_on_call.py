"""DAGs for the real-scheduler on-call tests: a batch waited on in the triggerer, or on the worker (with a retry).

Each batch carries the Airflow run id in its metadata (``airflow_run_id``) so the test finds it in the emulator.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator

PROMPTS = [
    "Name three rivers in South America.",
    "Translate 'good morning' into French.",
    "What is 2+2? Answer in one word.",
]


def _dag(dag_id: str, *, deferrable: bool, retries: int = 0) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=4,
        default_args={"retries": retries, "retry_delay": timedelta(seconds=1)},
        tags=["kluster", "test"],
    ) as dag:
        KlusterSubmitBatchOperator(
            task_id="submit_and_wait",
            requests=PROMPTS,
            model="klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
            max_completion_tokens=50,
            metadata={"airflow_run_id": "{{ run_id }}", "airflow_try": "{{ ti.try_number }}"},
            wait_for_completion=True,
            deferrable=deferrable,
            poll_interval=1,
        )
    return dag


deferred_dag = _dag("kluster_on_call_deferred", deferrable=True)
worker_dag = _dag("kluster_on_call_worker", deferrable=False)
# Polls on the worker with one retry: a try Airflow stops without a person's action is retried and reattaches.
retry_worker_dag = _dag("kluster_on_call_retry_worker", deferrable=False, retries=1)
