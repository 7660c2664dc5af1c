"""The main job: run the ``kluster_batch_inference`` example DAG through Airflow and print the answers.

Without ``KLUSTER_API_KEY`` it starts the local kluster emulator on a free loopback port, points the
``kluster_default`` connection at it, runs ``airflow dags test kluster_batch_inference``, prints each question with
its answer, and stops the emulator. With ``KLUSTER_API_KEY`` set it runs the same DAG against the real kluster.ai
(``KLUSTER_BASE_URL`` overrides the base URL), polling every 30 seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "kluster_batch_inference"


def main() -> int:
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(REPO / ".airflow"))
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    output = Path(tempfile.mkdtemp(prefix="kluster-demo-"))
    env["KLUSTER_EXAMPLE_OUTPUT"] = str(output)
    with ExitStack() as stack:
        api_key = os.environ.get("KLUSTER_API_KEY")
        if api_key:
            base_url = os.environ.get("KLUSTER_BASE_URL", "https://api.kluster.ai/v1")
            env.setdefault("KLUSTER_EXAMPLE_POLL_INTERVAL", "30")
            print(f"Running {DAG_ID} against {base_url} (KLUSTER_API_KEY is set)", flush=True)
        else:
            from airflow_provider_kluster.emulator import EmulatorServer

            server = stack.enter_context(EmulatorServer(requests_per_second=2, pre_schedule_delay=1.0))
            base_url, api_key = server.base_url, server.api_key
            env.setdefault("KLUSTER_EXAMPLE_POLL_INTERVAL", "1")
            print(f"Running {DAG_ID} against the local kluster emulator at {base_url}", flush=True)
        env["AIRFLOW_CONN_KLUSTER_DEFAULT"] = json.dumps(
            {"conn_type": "kluster", "host": base_url, "password": api_key}
        )
        airflow = [sys.executable, "-m", "airflow"]
        subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
        run = subprocess.run([*airflow, "dags", "test", DAG_ID], env=env)
    records = sorted(output.rglob("*.results.jsonl"))
    if run.returncode != 0 or not records:
        print(f"\nThe DAG run failed (exit code {run.returncode}); see the task logs above.", file=sys.stderr)
        return 1
    from example_dags.kluster_batch_inference import GUIDE_REQUESTS

    questions = {custom_id: question for custom_id, _, _, question in GUIDE_REQUESTS}
    print("\n" + "=" * 100)
    with records[-1].open() as handle:
        for line in handle:
            record = json.loads(line)
            answer = (
                record["content"]
                if record["status"] == "succeeded"
                else f"{record['status']}: {record['error']}"
            )
            print(f"Q [{record['custom_id']}] {questions.get(record['custom_id'], '?')}\nA: {answer}\n")
    print(f"All results: {records[-1]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
