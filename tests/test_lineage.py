"""OpenLineage: the results and job operators report the request file, the records file and a ``kluster`` run facet.

The end-to-end test runs the asset example DAGs under ``dag.test()`` in a fresh process with the OpenLineage
provider's listener on and its ``file`` transport writing every event to a file, then reads the events back. A
fresh process, because Airflow loads listener plugins once per process, reading the OpenLineage settings then.
Skipped without ``apache-airflow-providers-openlineage`` (extra ``openlineage``).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from airflow_provider_kluster.lineage import dataset_name, files_namespace
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import MODEL, REPO


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/data/in.jsonl", ("file", "/data/in.jsonl")),
        ("file:///data/in.jsonl", ("file", "/data/in.jsonl")),
        ("file://host/data/in.jsonl", ("file://host", "/data/in.jsonl")),
        ("s3://bucket/nightly/in.jsonl", ("s3://bucket", "nightly/in.jsonl")),
        ("gs://bucket/a/b.jsonl", ("gs://bucket", "a/b.jsonl")),
    ],
)
def test_dataset_names_follow_openlineage_naming(location, expected):
    assert dataset_name(location) == expected


def test_kluster_files_are_named_by_the_api_host():
    assert files_namespace("https://api.kluster.ai/v1") == "kluster://api.kluster.ai"
    assert files_namespace("http://127.0.0.1:8000/v1") == "kluster://127.0.0.1:8000"
    assert files_namespace(None) == "kluster://api.kluster.ai"


def test_the_provider_imports_no_openlineage():
    code = (
        "import sys\nimport airflow_provider_kluster.lineage, airflow_provider_kluster.operators.job\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'openlineage' or 'openlineage.' in m))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    # Airflow's provider manager may read the OpenLineage provider's metadata; its code and client stay unloaded.
    loaded = json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert [m for m in loaded if not m.endswith(".get_provider_info")] == []


# -- with the OpenLineage provider -------------------------------------------------------------------------


@pytest.fixture
def openlineage():
    return pytest.importorskip(
        "airflow.providers.openlineage", reason="the openlineage extra is not installed"
    )


def test_the_job_operator_reports_its_input_file_before_it_starts(openlineage, tmp_path):
    from airflow_provider_kluster.operators.job import KlusterBatchJobOperator

    op = KlusterBatchJobOperator(
        task_id="enrich",
        input_file="s3://bucket/nightly/requests.jsonl",
        destination="s3://bucket/out/2025-01-01/",
        model=MODEL,
        completion_window="48h",
    )
    lineage = op.get_openlineage_facets_on_start()
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://bucket", "nightly/requests.jsonl")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        ("s3://bucket", "out/2025-01-01/results.jsonl")
    ]
    facet = lineage.run_facets["kluster"]
    assert (facet.models, facet.completionWindow, facet.requestCounts) == ([MODEL], "48h", None)
    # Nothing ran yet: on complete it says the same.
    assert op.get_openlineage_facets_on_complete(None).inputs == lineage.inputs
    # The facet class is importable by name, so it pickles (as the listener's workers may need).
    assert pickle.loads(pickle.dumps(facet)) == facet


def test_openlineage_events_carry_the_datasets_and_the_facet(openlineage, emulator, airflow_db, tmp_path):
    events_path = tmp_path / "openlineage.jsonl"
    env = {
        **os.environ,
        "AIRFLOW_CONN_KLUSTER_DEFAULT": conn_json(emulator.base_url, max_retries=2),
        "KLUSTER_EXAMPLE_POLL_INTERVAL": "0.2",
        "KLUSTER_EXAMPLE_OUTPUT": str(tmp_path / "results"),
        "AIRFLOW__OPENLINEAGE__DISABLED": "False",
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "kluster-tests",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_path), "append": True}
        ),
    }
    code = (
        "try:\n    from airflow.dag_processing.dagbag import DagBag\n"
        "except ImportError:  # Airflow < 3.2\n    from airflow.models.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'example_dags')!r})\n"
        "for dag_id in ('kluster_results_asset_batch', 'kluster_results_asset_job'):\n"
        "    print(dag_id, bag.get_dag(dag_id).test().state)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert "kluster_results_asset_batch success" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
    assert "kluster_results_asset_job success" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    text = events_path.read_text()
    assert TEST_API_KEY not in text
    events = [json.loads(line) for line in text.splitlines()]
    by_task = {}
    for event in events:
        by_task.setdefault((event["job"]["name"], event["eventType"]), []).append(event)

    # The results task: the batch's request file on kluster in, its records file out, the facet after the run.
    (started,) = by_task[("kluster_results_asset_batch.results", "START")]
    (completed,) = by_task[("kluster_results_asset_batch.results", "COMPLETE")]
    assert completed["job"]["namespace"] == "kluster-tests"
    (output,) = completed["outputs"]
    assert output["namespace"] == "file"
    assert output["name"].startswith(str(tmp_path / "results" / "asset-batch"))
    assert output["name"].endswith(".results.jsonl")
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 3
    assert [o["name"] for o in started["outputs"]] == [output["name"]]
    (request_file,) = completed["inputs"]
    host = emulator.base_url.split("://", 1)[1].split("/", 1)[0]
    assert request_file["namespace"] == f"kluster://{host}"
    assert request_file["name"].startswith("files/")
    facet = completed["run"]["facets"]["kluster"]
    (batch_id,) = facet["batchIds"]
    assert completed["run"]["facets"]["externalQuery"]["externalQueryId"] == batch_id
    assert facet["models"] == [MODEL]
    assert facet["completionWindow"] == "24h"
    assert facet["requestCounts"] == {"total": 3, "succeeded": 3, "failed": 0, "missing": 0}
    assert (
        facet["tokens"]["total_tokens"]
        == facet["tokens"]["prompt_tokens"] + facet["tokens"]["completion_tokens"]
    )
    assert facet["tokens"]["total_tokens"] > 0

    # The job: its merged results file out; the facet with every batch, the counts and the cost.
    (completed,) = by_task[("kluster_results_asset_job.job", "COMPLETE")]
    (output,) = completed["outputs"]
    assert output["name"].endswith("/results.jsonl")
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 8
    facet = completed["run"]["facets"]["kluster"]
    assert len(facet["batchIds"]) == 2
    assert facet["requestCounts"] == {"total": 8, "succeeded": 8, "failed": 0, "missing": 0}
    assert facet["models"] == [MODEL]
    assert facet["cost"]["actual_usd"] > 0
    assert facet["cost"]["unit"] == "USD per token"
    # Before the run the job's facet already names its model and window.
    first = by_task[("kluster_results_asset_job.job", "START")][0]["run"]["facets"]["kluster"]
    assert (first["models"], first["completionWindow"]) == ([MODEL], "24h")
