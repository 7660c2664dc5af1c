"""kluster.ai through Airflow's common.ai: ``LLMBatchOperator`` and ``@task.llm_batch`` with ``model_id="kluster:..."``.

Needs ``pip install airflow-provider-kluster[common-ai]``; without common.ai this file defines no DAG. The
``llm_conn_id`` is a ``kluster`` connection (here ``kluster_default``); common.ai writes results as JSONL under
``result_path`` and returns a manifest.

Settings (environment): ``KLUSTER_COMMON_AI_POLL_INTERVAL`` (default 30 s, common.ai's minimum),
``KLUSTER_COMMON_AI_DEFERRABLE`` (default ``true``), ``KLUSTER_COMMON_AI_TIMEOUT`` (default 24 h),
``KLUSTER_COMMON_AI_CANCEL_ON_TIMEOUT`` (default ``true``), ``KLUSTER_COMMON_AI_PROMPT_SUFFIX`` (appended to
every prompt), ``KLUSTER_EXAMPLE_OUTPUT``.
"""

from __future__ import annotations

import os
import tempfile

import pendulum
from airflow.sdk import DAG, task

try:
    from airflow.providers.common.ai.operators.llm_batch import LLMBatchOperator
except ImportError:  # the common-ai extra is not installed
    LLMBatchOperator = None

MODEL_ID = "kluster:klusterai/Meta-Llama-3.3-70B-Instruct-Turbo"
POLL_INTERVAL = float(os.environ.get("KLUSTER_COMMON_AI_POLL_INTERVAL", "30"))
DEFERRABLE = os.environ.get("KLUSTER_COMMON_AI_DEFERRABLE", "true").lower() == "true"
TIMEOUT = int(os.environ.get("KLUSTER_COMMON_AI_TIMEOUT", str(24 * 3600)))
CANCEL_ON_TIMEOUT = os.environ.get("KLUSTER_COMMON_AI_CANCEL_ON_TIMEOUT", "true").lower() == "true"
SUFFIX = os.environ.get("KLUSTER_COMMON_AI_PROMPT_SUFFIX", "")
OUTPUT = os.environ.get("KLUSTER_EXAMPLE_OUTPUT", os.path.join(tempfile.gettempdir(), "kluster-results"))
QUESTIONS = [
    "Name three rivers in South America.",
    "What is the capital of Argentina?",
    "Translate 'good morning' into French.",
]

if LLMBatchOperator is not None:
    with DAG(
        dag_id="kluster_common_ai",
        description="common.ai's batch operator and decorator, run on kluster.ai",
        schedule=None,
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        tags=["kluster", "example", "common.ai"],
    ):
        answers = LLMBatchOperator(
            task_id="answer",
            requests=[question + SUFFIX for question in QUESTIONS],
            llm_conn_id="kluster_default",
            model_id=MODEL_ID,
            system_prompt="Answer in one sentence.",
            max_tokens=200,
            result_path=f"file://{OUTPUT}/common-ai/answer",
            poll_interval=POLL_INTERVAL,
            deferrable=DEFERRABLE,
            timeout=TIMEOUT,
            cancel_on_timeout=CANCEL_ON_TIMEOUT,
        )

        @task.llm_batch(
            llm_conn_id="kluster_default",
            model_id=MODEL_ID,
            result_path=f"file://{OUTPUT}/common-ai/greet",
            poll_interval=POLL_INTERVAL,
            deferrable=DEFERRABLE,
            timeout=TIMEOUT,
            cancel_on_timeout=CANCEL_ON_TIMEOUT,
        )
        def greet(names: list[str]) -> list[str]:
            return [f"Write a one-line greeting for {name}.{SUFFIX}" for name in names]

        @task
        def report(*manifests: dict) -> dict:
            """Log where each task's results landed and how they came out."""
            summary = {}
            for manifest in manifests:
                print(f"batch {manifest['batch_id']}: {manifest['counts']} -> {manifest['result_uri']}")
                summary[manifest["batch_id"]] = manifest["counts"]
            return summary

        report(answers.output, greet(["Ada", "Grace"]))
