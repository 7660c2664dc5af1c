"""kluster.ai's batch guide, step by step, as an Airflow DAG.

Build the guide's requests, upload them, create a batch, wait for it in the triggerer (no worker slot held),
fetch the results, and log each answer next to its question.

Settings (environment): ``KLUSTER_EXAMPLE_POLL_INTERVAL`` seconds between polls (default 30),
``KLUSTER_EXAMPLE_OUTPUT`` directory or object-storage URI for results (default a temp directory).
The connection is ``kluster_default``.
"""

from __future__ import annotations

import os
import tempfile

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_kluster.operators.kluster import (
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
    KlusterUploadFileOperator,
)
from airflow_provider_kluster.sensors.kluster import KlusterBatchSensor

POLL_INTERVAL = float(os.environ.get("KLUSTER_EXAMPLE_POLL_INTERVAL", "30"))
OUTPUT = os.environ.get("KLUSTER_EXAMPLE_OUTPUT", os.path.join(tempfile.gettempdir(), "kluster-results"))

# The requests of kluster.ai's batch guide.
GUIDE_REQUESTS = [
    (
        "request-1",
        "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        "You are a helpful assistant.",
        "What is the capital of Argentina?",
    ),
    (
        "request-2",
        "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo",
        "You are an experienced maths tutor.",
        "Explain the Pythagorean theorem.",
    ),
    (
        "request-3",
        "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo",
        "You are an astronomer.",
        "What is the distance between the Earth and the Moon",
    ),
    (
        "request-4",
        "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo",
        "You are a multilingual, experienced maths tutor.",
        "Explain the Pythagorean theorem in Spanish",
    ),
]

with DAG(
    dag_id="kluster_batch_inference",
    description="kluster.ai batch guide: build, upload, submit, wait (deferred), fetch and show results",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example"],
):

    @task
    def build_requests() -> list[dict]:
        """Create the batch's request lines (step 1 of the guide)."""
        return [
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": question},
                    ],
                    "max_completion_tokens": 1000,
                },
            }
            for custom_id, model, system, question in GUIDE_REQUESTS
        ]

    requests = build_requests()

    # Step 2: validate locally, then upload.
    upload = KlusterUploadFileOperator(task_id="upload", requests=requests)

    # Step 3: start the batch. Its id and platform link go to XCom before anything waits.
    submit = KlusterSubmitBatchOperator(
        task_id="submit", input_file_id=upload.output, completion_window="24h"
    )

    # Step 4: monitor in the triggerer; the task fails clearly on failed/expired/cancelled.
    wait = KlusterBatchSensor(
        task_id="wait",
        batch_id=submit.output,
        deferrable=True,
        poke_interval=POLL_INTERVAL,
        timeout=72 * 3600,
    )

    # Step 5: stream the output and error files, join them to every custom_id.
    results = KlusterGetBatchResultsOperator(
        task_id="results",
        batch_id=submit.output,
        destination=OUTPUT + "/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        return_records=len(GUIDE_REQUESTS),
        max_failed_ratio=0.5,
    )

    @task
    def show_answers(manifest: dict) -> None:
        """Log each answer next to its question."""
        questions = {custom_id: question for custom_id, _, _, question in GUIDE_REQUESTS}
        for record in manifest["records"]:
            print(f"Q [{record['custom_id']}]: {questions.get(record['custom_id'], '?')}")
            print(
                f"A: {record['content'] if record['status'] == 'succeeded' else 'FAILED: ' + str(record['error'])}"
            )
            print()
        print(
            f"{manifest['succeeded']} succeeded, {manifest['failed']} failed, {manifest['missing']} missing; "
            f"{manifest['usage']['total_tokens']} tokens. All records: {manifest['records_path']}"
        )

    wait >> results
    show_answers(results.output)
