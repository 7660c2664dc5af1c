"""A whole job in one task: any number of requests, sharded, failed ones resent, stalls caught, on a budget.

The input is built here from prompts (a real job would point ``input_file`` at a JSONL file of any size, local or in
object storage). The job operator shards it into batches of at most ``max_requests``, waits for all of them in the
triggerer, resends requests that failed with a retryable error or never came back, cancels a batch that stops making
progress, refuses to start when kluster's prices put the job over ``max_cost``, and writes one merged
``results.jsonl`` (one record per ``custom_id``) and a ``manifest.json``. A second task reads the manifest.

Settings (environment): ``KLUSTER_EXAMPLE_POLL_INTERVAL`` (default 30 s), ``KLUSTER_EXAMPLE_OUTPUT``.
"""

from __future__ import annotations

import json
import os
import tempfile

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_kluster.operators.job import KlusterBatchJobOperator

POLL_INTERVAL = float(os.environ.get("KLUSTER_EXAMPLE_POLL_INTERVAL", "30"))
OUTPUT = os.environ.get("KLUSTER_EXAMPLE_OUTPUT", os.path.join(tempfile.gettempdir(), "kluster-results"))
CITIES = [
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Quito",
    "Tromsø",
    "Hobart",
    "Tbilisi",
    "Ushuaia",
    "Da Nang",
    "Reykjavík",
]

with DAG(
    dag_id="kluster_batch_job",
    description="Many requests in, every one answered: shards, retries, stalls and a budget in one task",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example"],
):
    job = KlusterBatchJobOperator(
        task_id="enrich",
        requests=[
            {"custom_id": f"city-{i}", "messages": [{"role": "user", "content": f"One fact about {city}."}]}
            for i, city in enumerate(CITIES * 3)
        ],
        model="klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        max_completion_tokens=100,
        max_requests=10,  # three batches; your plan allows up to 100,000 per batch
        max_concurrent_batches=2,  # the third is submitted when one of the first two ends
        max_attempts=3,  # a request that fails with 429/5xx or never comes back is sent up to 3 times
        stall_timeout=30 * 60,  # a batch stuck for 30 minutes is cancelled; its requests are resent
        max_cost=5.0,  # USD; estimated from kluster's prices before anything is uploaded
        destination=OUTPUT + "/job/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        max_failed_ratio=0.0,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        timeout=24 * 3600,
    )

    @task
    def report(manifest: dict) -> dict:
        """Print what the job did and cost, from the manifest the job returned."""
        from airflow.sdk import ObjectStoragePath

        # The destination may be object storage, and this task may run on another worker: read it as a path.
        with ObjectStoragePath(manifest["records_path"]).open("r") as records:
            first = json.loads(records.readline())
        print(
            f"{manifest['succeeded']} of {manifest['total']} requests answered in {manifest['attempts']} attempt(s) "
            f"and {len(manifest['batches'])} batches; estimated {manifest['cost']['estimate']['total_usd']:.4f} USD, "
            f"spent {manifest['cost']['actual_usd']:.4f} USD. First answer: {first['custom_id']}: {first['content']}"
        )
        return {"succeeded": manifest["succeeded"], "total": manifest["total"]}

    report(job.output)
