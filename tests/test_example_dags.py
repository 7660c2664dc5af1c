"""Every example DAG loads cleanly and runs end to end under ``dag.test()`` against the emulator."""

from __future__ import annotations

import pytest

from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import REPO

EXAMPLE_DAGS = REPO / "example_dags"
DAG_IDS = ["kluster_batch_inference", "kluster_batch_one_operator", "kluster_batch_mapped"]


@pytest.fixture
def example_env(emulator, monkeypatch, tmp_path, airflow_db):
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, max_retries=2))
    monkeypatch.setenv("KLUSTER_EXAMPLE_POLL_INTERVAL", "0.2")
    monkeypatch.setenv("KLUSTER_EXAMPLE_OUTPUT", str(tmp_path / "results"))
    return tmp_path / "results"


def load_dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def test_example_dags_import_without_errors(example_env):
    bag = load_dagbag()
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == sorted(DAG_IDS)


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
    assert batches
    assert {b["status"] for b in batches} == {"completed"}
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
