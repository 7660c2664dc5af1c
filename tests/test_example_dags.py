"""Every example DAG loads cleanly and runs end to end under ``dag.test()`` against the emulator."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import REPO

EXAMPLE_DAGS = REPO / "example_dags"
DAG_IDS = [
    "kluster_batch_inference",
    "kluster_batch_one_operator",
    "kluster_batch_mapped",
    "kluster_batch_job",
    "kluster_results_asset_batch",
    "kluster_results_asset_job",
    "kluster_results_asset_consumer",
    "kluster_batch_decorator",
]
try:  # kluster_common_ai.py defines its DAG only with the common-ai extra (tests/common_ai runs it)
    import airflow.providers.common.ai.operators.llm_batch  # noqa: F401

    IMPORTED_DAG_IDS = [*DAG_IDS, "kluster_common_ai"]
except ImportError:
    IMPORTED_DAG_IDS = DAG_IDS


@pytest.fixture
def example_env(emulator, monkeypatch, tmp_path, airflow_db):
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, max_retries=2))
    monkeypatch.setenv("KLUSTER_EXAMPLE_POLL_INTERVAL", "0.2")
    monkeypatch.setenv("KLUSTER_EXAMPLE_OUTPUT", str(tmp_path / "results"))
    return tmp_path / "results"


def load_dagbag():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def test_example_dags_import_without_errors(example_env):
    bag = load_dagbag()
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == sorted(IMPORTED_DAG_IDS)


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_example_dag_runs_end_to_end(dag_id, example_env, emulator, capsys):
    dag = load_dagbag().get_dag(dag_id)
    run = dag.test()
    states = {
        ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): ti.state
        for ti in run.get_task_instances()
    }
    assert run.state == "success", states
    assert all(state == "success" for state in states.values()), states
    # Every batch the DAG created completed in the emulator.
    batches = [emulator.emulator.get_batch_raw(b) for b in emulator.emulator.list_batch_ids()]
    if dag_id == "kluster_results_asset_consumer":  # no batch: it reads asset events (tests/test_assets.py)
        assert batches == []
        assert "No asset event started this run" in capsys.readouterr().out
        return
    assert batches
    assert {b["status"] for b in batches} == {"completed"}
    if dag_id == "kluster_batch_job":  # one merged file for the whole job, one record per request
        (merged,) = example_env.rglob("job/*/results.jsonl")
        assert len(merged.read_text().splitlines()) == 30
        assert len(batches) == 3
    elif dag_id == "kluster_results_asset_job":
        (merged,) = example_env.rglob("asset-job/*/results.jsonl")
        assert len(merged.read_text().splitlines()) == 8
        assert len(batches) == 2
    elif dag_id == "kluster_batch_decorator":  # one job per mapped topic, each in its own folder
        merged = sorted(example_env.rglob("decorator/*/*/results.jsonl"))
        assert [len(m.read_text().splitlines()) for m in merged] == [3, 2, 4]
        assert len(batches) == 3
    else:
        manifests = list(example_env.rglob("*.results.jsonl"))
        assert len(manifests) == len(batches)
    out = capsys.readouterr()
    assert TEST_API_KEY not in out.out + out.err


def test_guide_dag_logs_answers_next_to_questions(example_env, capsys):
    run = load_dagbag().get_dag("kluster_batch_inference").test()
    assert run.state == "success"
    out = capsys.readouterr().out
    assert "Q [request-1]: What is the capital of Argentina?" in out
    assert "4 succeeded, 0 failed, 0 missing" in out


def _files_containing(root: pathlib.Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_the_key_appears_nowhere_after_every_example_runs(example_env, emulator, capfd):
    """Logs, XCom, rendered fields and every other row the runs wrote: the key is in none of them."""
    for dag_id in DAG_IDS:
        assert load_dagbag().get_dag(dag_id).test().state == "success"
    out = capfd.readouterr()
    assert TEST_API_KEY not in out.out + out.err
    home = pathlib.Path(os.environ["AIRFLOW_HOME"])
    assert _files_containing(home, TEST_API_KEY.encode()) == []
    assert _files_containing(example_env, TEST_API_KEY.encode()) == []


def test_a_rejected_key_fails_the_run_without_showing_the_key(example_env, emulator, monkeypatch, capfd):
    wrong = TEST_API_KEY + "-WRONG"
    monkeypatch.setenv(
        "AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, api_key=wrong, max_retries=0)
    )
    run = load_dagbag().get_dag("kluster_batch_one_operator").test()
    assert run.state == "failed"
    out = capfd.readouterr()
    assert "rejected" in out.out + out.err or "401" in out.out + out.err
    assert wrong not in out.out + out.err
    assert _files_containing(pathlib.Path(os.environ["AIRFLOW_HOME"]), wrong.encode()) == []
