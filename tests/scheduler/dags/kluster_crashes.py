"""DAGs for the real-scheduler crash tests: a worker killed mid-wait, a triggerer restarted mid-wait.

Each batch carries the Airflow run id (``airflow_run_id``) and the try that submitted it (``airflow_try``) in its
metadata, so the test finds it in the emulator and sees which try created it. Neither is part of the input
fingerprint: a retry still reattaches.
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


def _dag(dag_id: str, *, deferrable: bool, retries: int, timeout: float | None = None) -> DAG:
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
            timeout=timeout,
        )
    return dag


# Polls on the worker; one retry, one second after a failed try.
worker_dag = _dag("kluster_crash_worker", deferrable=False, retries=1)
# Waits in the triggerer; no retry, so a restart that broke the wait would fail the task at once.
triggerer_dag = _dag("kluster_crash_triggerer", deferrable=True, retries=0)
# Waits in the triggerer at most DEADLINE_SECONDS after the batch was created, whatever happens to the triggerer.
DEADLINE_SECONDS = 30
deadline_dag = _dag("kluster_crash_deadline", deferrable=True, retries=0, timeout=DEADLINE_SECONDS)
