"""``@task.kluster_batch`` mapped over three inputs, for tests/decorators/test_kluster_batch.py (``dag.test()``)."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, task

OUTPUT = os.environ.get("KLUSTER_TEST_OUTPUT", "/tmp/kluster-test-output")
CALLS = os.environ.get("KLUSTER_TEST_CALLS", "/tmp/kluster-test-calls")
DESTINATION = os.environ.get("KLUSTER_TEST_DESTINATION", OUTPUT + "/{{ ti.map_index }}")

with DAG(
    dag_id="kluster_batch_expand",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):

    @task.kluster_batch(
        model="klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        max_completion_tokens=50,
        destination=DESTINATION or None,
        check_models=False,
        deferrable=True,
        poll_interval=0.1,
        max_failed_ratio=0.0,
        retries=0,
    )
    def ask(topic: str, count: int) -> list[str]:
        with open(CALLS, "a") as calls:  # the test counts the function's runs
            calls.write(topic + "\n")
        return [f"Fact {i} about {topic}?" for i in range(count)]

    @task
    def collect(manifests: list[dict]) -> list[int]:
        return [m["succeeded"] for m in manifests]

    collect(ask.partial(count=2).expand(topic=["rivers", "mountains", "deserts"]))
