"""A retry finds its batch among thousands, cheaply: the task state store first (Airflow 3.3+), a time-bounded
scan otherwise. Runs a real DAG with one retry under ``dag.test()``; the first try "crashes" at a chosen point.
"""

from __future__ import annotations

import pathlib

import pytest

from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator
from tests.conftest import conn_json

DAGS = pathlib.Path(__file__).parent / "dags"
OLD_BATCHES = 2_000
HAS_STATE_STORE = True
try:
    from airflow.sdk.execution_time.context import TaskStateStoreAccessor  # noqa: F401
except ImportError:  # Airflow < 3.3
    HAS_STATE_STORE = False


class SimulatedCrash(Exception):
    """The worker died here."""


@pytest.fixture
def account(emulator, monkeypatch, airflow_db):
    import airflow.settings

    monkeypatch.setattr(airflow.settings, "DAGS_FOLDER", str(DAGS))
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, max_retries=0))
    # An account in use: 2,000 batches from earlier days, some from other runs of this very task.
    emulator.emulator.seed_batches(OLD_BATCHES)
    return emulator


def _crash_once(monkeypatch, cls, name, emulator, *, after: bool):
    """Make the first call of ``cls.name`` crash (after doing its work when ``after``); note counters then."""
    original = getattr(cls, name)
    seen = {"calls": 0, "counters": None}

    def crashing(self, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] > 1:
            return original(self, *args, **kwargs)
        if after:
            original(self, *args, **kwargs)
        seen["counters"] = dict(emulator.emulator.counters)
        raise SimulatedCrash(f"worker died in {name}")

    monkeypatch.setattr(cls, name, crashing)
    return seen


def _run_and_count(account, seen):
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag

    run = DagBag(dag_folder=str(DAGS)).get_dag("kluster_submit_retry").test()
    (ti,) = run.get_task_instances()
    after = account.emulator.counters
    second_try = {k: after.get(k, 0) - seen["counters"].get(k, 0) for k in after}
    second_try = {k: v for k, v in second_try.items() if v and k.startswith(("GET ", "POST ", "DELETE "))}
    return run, ti, second_try


def _new_batches(account):
    return [b for b in account.emulator.list_batch_ids() if account.emulator.get_batch_raw(b)["metadata"]]


@pytest.mark.skipif(not HAS_STATE_STORE, reason="the task state store is Airflow 3.3+")
def test_a_retry_after_a_crash_reattaches_with_at_most_three_calls(account, monkeypatch):
    """Try 1 creates and records the batch, then dies; try 2 decides from the store, listing nothing."""
    seen = _crash_once(monkeypatch, KlusterSubmitBatchOperator, "publish", account, after=False)
    run, ti, second_try = _run_and_count(account, seen)
    assert run.state == "success", ti.state
    assert ti.try_number == 2
    assert account.emulator.counters["POST /v1/batches"] == 1  # one batch, never two
    assert account.emulator.counters["POST /v1/files"] == 1
    assert sum(second_try.values()) <= 3, second_try
    assert "GET /v1/batches" not in second_try  # no scan of the 2,000
    assert "GET /v1/files" not in second_try


def test_a_crash_between_create_and_record_is_found_by_a_time_bounded_scan(account, monkeypatch):
    """Try 1 dies right after kluster created the batch (nothing recorded): try 2 scans back to the run's start
    only — one page of the list, not the 2,000 — and reattaches."""
    seen = _crash_once(monkeypatch, KlusterHook, "create_batch", account, after=True)
    run, ti, second_try = _run_and_count(account, seen)
    assert run.state == "success", ti.state
    assert account.emulator.counters["POST /v1/batches"] == 1
    assert account.emulator.counters["POST /v1/files"] == 1
    assert second_try.get("GET /v1/batches", 0) == 1, second_try  # first page only: the rest predate the run
