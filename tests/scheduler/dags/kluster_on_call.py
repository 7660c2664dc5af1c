"""DAGs for the real-scheduler on-call tests: one batch waited on in the triggerer, one on the worker.

Each batch carries the Airflow run id in its metadata (``airflow_run_id``) so the test finds it in the emulator.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator

PROMPTS = [
    "Name three rivers in South America.",
    "Translate 'good morning' into French.",
    "What is 2+2? Answer in one word.",
]


def _dag(dag_id: str, *, deferrable: bool) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=4,
        default_args={"retries": 0},
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
