"""One operator does it all: build the request file from prompts, submit, and wait (deferred); then results.

Settings (environment): ``KLUSTER_EXAMPLE_POLL_INTERVAL`` (default 30 s), ``KLUSTER_EXAMPLE_OUTPUT``.
"""

from __future__ import annotations

import os
import tempfile

import pendulum
from airflow.sdk import DAG

from airflow_provider_kluster.operators.kluster import (
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
)

POLL_INTERVAL = float(os.environ.get("KLUSTER_EXAMPLE_POLL_INTERVAL", "30"))
OUTPUT = os.environ.get("KLUSTER_EXAMPLE_OUTPUT", os.path.join(tempfile.gettempdir(), "kluster-results"))

with DAG(
    dag_id="kluster_batch_one_operator",
    description="Prompts in, a finished batch out, in one task",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example"],
):
    submit = KlusterSubmitBatchOperator(
        task_id="submit_and_wait",
        requests=[
            "Name three rivers in South America.",
            "Translate 'good morning' into French.",
            {
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "2+2?"},
                ]
            },
        ],
        model="klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        max_completion_tokens=200,
        metadata={"team": "examples"},
        wait_for_completion=True,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        timeout=24 * 3600,
    )

    KlusterGetBatchResultsOperator(
        task_id="results",
        batch_id=submit.output,
        destination=OUTPUT + "/one-operator/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        return_records=3,
        max_failed_ratio=0.0,
    )
