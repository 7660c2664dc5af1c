"""Shared fixtures: an isolated AIRFLOW_HOME, the emulator on loopback, and connections pointing at it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

# Airflow reads its home at import time: isolate it before anything imports airflow.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="kluster-airflow-home-")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
# One Fernet key for this session, so every airflow CLI process reads what the previous one encrypted.
if "AIRFLOW__CORE__FERNET_KEY" not in os.environ:
    from cryptography.fernet import Fernet

    os.environ["AIRFLOW__CORE__FERNET_KEY"] = Fernet.generate_key().decode()
# dag.test() runs DAGs from the configured dags folder: the example DAGs are ours.
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(pathlib.Path(__file__).resolve().parents[1] / "example_dags")

import pytest

# The emulator fixtures (kluster_emulator, kluster_emulator_server) come from the pytest11 entry point
# this package registers, exactly as users get them.


#: A key recognisable anywhere it might leak.
TEST_API_KEY = "kl-test-SECRET-7f3a9c1e5b"


def conn_json(base_url: str, api_key: str = TEST_API_KEY, **extra: object) -> str:
    """Return an ``AIRFLOW_CONN_*`` value in JSON form for a kluster connection."""
    return json.dumps({"conn_type": "kluster", "host": base_url, "password": api_key, "extra": extra})


@pytest.fixture
def emulator(kluster_emulator):
    """Return the running emulator server, reset, accepting :data:`TEST_API_KEY`."""
    kluster_emulator.emulator.config.api_key = TEST_API_KEY
    return kluster_emulator


@pytest.fixture
def kluster_conn(emulator, monkeypatch):
    """Point ``kluster_default`` at the emulator with fast client retries; return the connection id."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, max_retries=2, timeout=10)
    )
    return "kluster_default"


@pytest.fixture(autouse=True)
def _fresh_async_connection_cache():
    """Forget async connection lookups between tests: tests reuse connection ids with other settings."""
    from airflow_provider_kluster.hooks import kluster

    kluster._ASYNC_SETTINGS.clear()
    yield
    kluster._ASYNC_SETTINGS.clear()


@pytest.fixture(scope="session")
def airflow_db():
    """Create the metadata database of the test AIRFLOW_HOME once (SQLite)."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, timeout=600
    )


@pytest.fixture
def airflow_says(monkeypatch):
    """What Airflow answers when ``on_kill`` reads the task instance's state back.

    In a real run the question goes through the supervisor (worker) or the triggerer's supervisor to the
    execution API; neither is here, so ``RuntimeTaskInstance.get_task_states`` is replaced by this answer. Set
    ``answer["state"]`` (``None`` means cleared) or ``answer["error"]``; ``answer["calls"]`` records each question.
    """
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    answer: dict = {"state": "failed", "error": None, "calls": []}

    def get_task_states(*, dag_id, map_index=None, task_ids=None, run_ids=None, **_):
        answer["calls"].append(
            {"dag_id": dag_id, "task_ids": task_ids, "run_ids": run_ids, "map_index": map_index}
        )
        if answer["error"] is not None:
            raise answer["error"]
        key = (lambda t: t) if map_index in (None, -1) else (lambda t: f"{t}_{map_index}")
        return {run_id: {key(t): answer["state"] for t in task_ids or []} for run_id in run_ids or []}

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(get_task_states))
    return answer
