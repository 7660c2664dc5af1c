"""Results as an Airflow Asset: a downstream DAG runs when a batch's (or a job's) answers are ready.

* ``kluster_results_asset_batch`` submits a batch, waits for it (deferred) and fetches its results with
  ``results_asset=ANSWERS``: the results task gets the asset as an outlet, and its asset event carries an extra
  with the batch id, models, request counts, tokens and where the records are.
* ``kluster_results_asset_job`` does the same with the job operator (shards, retries, a budget); its extra also
  has the job's cost.
* ``kluster_results_asset_consumer`` is scheduled on ``ANSWERS``: the scheduler starts it after either producer
  succeeds, and it reads the counts from ``triggering_asset_events`` — no XCom across DAGs, no sensor.

Settings (environment): ``KLUSTER_EXAMPLE_POLL_INTERVAL`` (default 30 s), ``KLUSTER_EXAMPLE_OUTPUT``.
"""

from __future__ import annotations

import os
import tempfile

import pendulum
from airflow.sdk import DAG, Asset, task

from airflow_provider_kluster.operators.job import KlusterBatchJobOperator
from airflow_provider_kluster.operators.kluster import (
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
)

POLL_INTERVAL = float(os.environ.get("KLUSTER_EXAMPLE_POLL_INTERVAL", "30"))
OUTPUT = os.environ.get("KLUSTER_EXAMPLE_OUTPUT", os.path.join(tempfile.gettempdir(), "kluster-results"))
MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
RUN_DIR = "{{ run_id | replace(':', '_') | replace('+', '_') }}"
#: The logical dataset "kluster answers are ready". Outlets are fixed when the DAG is parsed, so the asset names
#: the dataset, not one run's folder: each event's extra says where that run's records are.
ANSWERS = Asset(name="kluster_example_answers", uri="file:///kluster-results/example-answers")

with DAG(
    dag_id="kluster_results_asset_batch",
    description="A batch's results, published as an asset event with the counts in its extra",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example", "asset"],
):
    submit = KlusterSubmitBatchOperator(
        task_id="submit_and_wait",
        requests=["Name a river in Peru.", "Name a lake in Kenya.", "Name a desert in Chile."],
        model=MODEL,
        max_completion_tokens=100,
        wait_for_completion=True,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        timeout=24 * 3600,
    )
    KlusterGetBatchResultsOperator(
        task_id="results",
        batch_id=submit.output,
        destination=OUTPUT + "/asset-batch/" + RUN_DIR,
        max_failed_ratio=0.0,
        results_asset=ANSWERS,  # or a string: results_asset="s3://bucket/kluster/answers"
    )

with DAG(
    dag_id="kluster_results_asset_job",
    description="A whole job's results, published as an asset event with its counts and cost",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example", "asset"],
):
    KlusterBatchJobOperator(
        task_id="job",
        requests=[f"One fact about the number {n}." for n in range(8)],
        model=MODEL,
        max_completion_tokens=50,
        max_requests=4,  # two batches
        max_cost=1.0,
        destination=OUTPUT + "/asset-job/" + RUN_DIR,
        max_failed_ratio=0.0,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        results_asset=ANSWERS,
    )

with DAG(
    dag_id="kluster_results_asset_consumer",
    description="Runs when kluster answers are ready; reads the counts from the asset event",
    schedule=[ANSWERS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kluster", "example", "asset"],
):

    @task
    def read_answers(*, triggering_asset_events=None) -> list[dict]:
        """Print what each event that started this run says: which batches, how many answers, at what cost."""
        seen = []
        # Run by hand, no event started it: the accessor is empty (and looking ANSWERS up would raise KeyError).
        for event in triggering_asset_events[ANSWERS] if triggering_asset_events else []:
            extra = event.extra
            cost = (extra.get("cost") or {}).get("actual_usd")
            print(
                f"{extra['kind']} {', '.join(extra['batch_ids'])} ({', '.join(extra['models'])}): "
                f"{extra['succeeded']} of {extra['total']} succeeded, {extra['failed']} failed, "
                f"{extra['missing']} missing; {extra['usage']['total_tokens']} tokens"
                + ("" if cost is None else f", {cost:.6f} USD")
                + f"; records in {extra['records_path']}"
            )
            seen.append(
                {key: extra[key] for key in ("kind", "batch_ids", "total", "succeeded", "records_path")}
            )
        if not seen:
            print("No asset event started this run (triggered by hand).")
        return seen

    read_answers()
