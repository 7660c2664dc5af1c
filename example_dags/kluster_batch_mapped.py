"""Dynamic task mapping: several request files, one batch each, results per file.

Settings (environment): ``KLUSTER_EXAMPLE_POLL_INTERVAL`` (default 30 s), ``KLUSTER_EXAMPLE_OUTPUT``.
"""

from __future__ import annotations

import json
import os
import tempfile

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_kluster.operators.kluster import (
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
)

POLL_INTERVAL = float(os.environ.get("KLUSTER_EXAMPLE_POLL_INTERVAL", "30"))
OUTPUT = os.environ.get("KLUSTER_EXAMPLE_OUTPUT", os.path.join(tempfile.gettempdir(), "kluster-results"))
MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
TOPICS = {
    "geography": ["Capital of Peru?", "Longest river?"],
    "maths": ["7 * 6?", "Is 97 prime?", "sqrt(2)?"],
    "physics": ["Speed of light?"],
}

with DAG(
    dag_id="kluster_batch_mapped",
    description="One kluster batch per request file, with dynamic task mapping",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example"],
):

    @task
    def write_request_files() -> list[str]:
        """Write one JSONL request file per topic (in real life: files produced upstream)."""
        folder = tempfile.mkdtemp(prefix="kluster-inputs-")
        paths = []
        for topic, questions in TOPICS.items():
            path = os.path.join(folder, f"{topic}.jsonl")
            with open(path, "w") as handle:
                for i, question in enumerate(questions):
                    line = {
                        "custom_id": f"{topic}-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": MODEL, "messages": [{"role": "user", "content": question}]},
                    }
                    handle.write(json.dumps(line) + "\n")
            paths.append(path)
        return paths

    submitted = KlusterSubmitBatchOperator.partial(
        task_id="submit",
        wait_for_completion=True,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        timeout=24 * 3600,
    ).expand(input_file=write_request_files())

    results = KlusterGetBatchResultsOperator.partial(
        task_id="results",
        destination=OUTPUT + "/mapped/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        max_failed_ratio=0.0,
    ).expand(batch_id=submitted.output)

    @task
    def summarize(manifests: list[dict]) -> dict:
        """Add up the per-file manifests."""
        total = {"batches": 0, "succeeded": 0, "failed": 0, "missing": 0, "total_tokens": 0}
        for manifest in manifests:
            total["batches"] += 1
            total["succeeded"] += manifest["succeeded"]
            total["failed"] += manifest["failed"]
            total["missing"] += manifest["missing"]
            total["total_tokens"] += manifest["usage"]["total_tokens"]
        print(f"All batches: {total}")
        return total

    summarize(results.output)
