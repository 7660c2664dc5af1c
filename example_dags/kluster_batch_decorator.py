"""``@task.kluster_batch``: a TaskFlow function returns the requests, the task runs them as a kluster.ai batch job.

One mapped task per topic (``.expand()``): each function returns its prompts, and its task validates them,
estimates their cost against ``max_cost``, submits them as a batch job, waits in the triggerer, resends failures,
merges the answers under ``destination`` and returns the job's manifest. A last task reads the manifests. The
function may equally return chat bodies, full batch lines, or the path of a JSONL request file.

Settings (environment): ``KLUSTER_EXAMPLE_POLL_INTERVAL`` (default 30 s), ``KLUSTER_EXAMPLE_OUTPUT``.
"""

from __future__ import annotations

import json
import os
import tempfile

import pendulum
from airflow.sdk import DAG, task

POLL_INTERVAL = float(os.environ.get("KLUSTER_EXAMPLE_POLL_INTERVAL", "30"))
OUTPUT = os.environ.get("KLUSTER_EXAMPLE_OUTPUT", os.path.join(tempfile.gettempdir(), "kluster-results"))
TOPICS = {
    "volcanoes": ["Etna", "Kilimanjaro", "Mauna Loa"],
    "rivers": ["Mekong", "Danube"],
    "deserts": ["Atacama", "Namib", "Gobi", "Sahara"],
}

with DAG(
    dag_id="kluster_batch_decorator",
    description="@task.kluster_batch mapped over topics: a function returns prompts, its task returns the manifest",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example"],
):

    @task
    def topics() -> list[str]:
        """The inputs to map over (in real life: produced upstream)."""
        return list(TOPICS)

    @task.kluster_batch(
        model="klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        max_completion_tokens=100,
        # One folder per run and mapped task: the requests, results.jsonl and manifest.json of that job.
        destination=OUTPUT
        + "/decorator/{{ run_id | replace(':', '_') | replace('+', '_') }}/{{ ti.map_index }}",
        max_attempts=3,
        max_cost=5.0,  # USD for each job; estimated from kluster's prices before anything is uploaded
        max_failed_ratio=0.0,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        timeout=24 * 3600,
    )
    def ask(topic: str) -> list[dict]:
        """Return one chat body per place (prompt strings, full batch lines or a file path work as well)."""
        return [
            {
                "custom_id": f"{topic}-{i}",
                "messages": [
                    {"role": "user", "content": f"In one sentence, what is remarkable about {place}?"}
                ],
            }
            for i, place in enumerate(TOPICS[topic])
        ]

    @task
    def report(manifests: list[dict]) -> dict:
        """Add up what the jobs did and cost, and print one answer of each."""
        total = {"jobs": 0, "succeeded": 0, "total": 0, "cost_usd": 0.0}
        for manifest in manifests:
            total["jobs"] += 1
            total["succeeded"] += manifest["succeeded"]
            total["total"] += manifest["total"]
            total["cost_usd"] += manifest["cost"]["actual_usd"] or 0.0
            with open(manifest["records_path"]) as records:
                first = json.loads(next(records))
            print(f"{first['custom_id']}: {first['content']}")
        print(f"All jobs: {total}")
        return total

    report(ask.expand(topic=topics()))
