"""Every wait path works whatever the connection's source, and leaves nothing broken behind.

The connection may come from an environment variable, the metadata database or a secrets backend; under
``dag.test()`` the database is only reachable synchronously, so the async lookup must fall back. A process that
runs many waits must log no ERROR record and no "Task exception was never retrieved", and keep no client bound
to a closed event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import pytest

from airflow_provider_kluster.hooks import kluster as hook_module
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator
from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger
from tests.conftest import TEST_API_KEY
from tests.helpers import MODEL, make_context, request_lines, write_jsonl
from tests.test_example_dags import load_dagbag


def _add_db_connection(conn_id: str, base_url: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "airflow",
            "connections",
            "add",
            conn_id,
            "--conn-json",
            json.dumps(
                {
                    "conn_type": "kluster",
                    "host": base_url,
                    "password": TEST_API_KEY,
                    "extra": {"max_retries": 2},
                }
            ),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


def test_deferrable_example_runs_with_a_connection_from_the_metadata_db(
    emulator, airflow_db, monkeypatch, tmp_path
):
    monkeypatch.delenv("AIRFLOW_CONN_KLUSTER_DEFAULT", raising=False)
    monkeypatch.setenv("KLUSTER_EXAMPLE_POLL_INTERVAL", "0.2")
    monkeypatch.setenv("KLUSTER_EXAMPLE_OUTPUT", str(tmp_path / "results"))
    subprocess.run(
        [sys.executable, "-m", "airflow", "connections", "delete", "kluster_default"],
        capture_output=True,
        timeout=180,
    )
    _add_db_connection("kluster_default", emulator.base_url)
    run = load_dagbag().get_dag("kluster_batch_inference").test()
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    ids = emulator.emulator.list_batch_ids()
    assert [emulator.emulator.get_batch_raw(b)["status"] for b in ids] == ["completed"]


def test_many_waits_in_one_process_log_no_error_and_keep_no_dead_client(
    kluster_conn, emulator, caplog, tmp_path
):
    hook = KlusterHook(kluster_conn)
    path = write_jsonl(tmp_path / "r.jsonl", request_lines(2))
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):  # worker waits: plain blocking polls
            op = KlusterSubmitBatchOperator(
                task_id="s", requests=["hi"], model=MODEL, wait_for_completion=True, poll_interval=0.05
            )
            op.execute(make_context())
        for _ in range(3):  # triggers, each in an event loop of its own (as dag.test and tests run them)
            batch_id = hook.create_batch(hook.upload_file(path, find_created=lambda: None)).id
            trigger = KlusterBatchTrigger(batch_id, kluster_conn_id=kluster_conn, poll_interval=0.05)

            async def run(trigger=trigger):
                return [e.payload async for e in trigger.run()]

            assert asyncio.run(run())[0]["status"] == "success"
            # The client the wait used is closed with it: nothing bound to the closed loop stays cached.
            assert hook_module._ASYNC_CLIENTS == {}
    import gc

    gc.collect()
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or "never retrieved" in r.getMessage()]
    assert bad == [], [r.getMessage() for r in bad]


@pytest.mark.parametrize("users", [1, 3])
def test_a_shared_client_is_closed_when_its_last_wait_ends(kluster_conn, users):
    hook = KlusterHook(kluster_conn)

    async def main():
        clients = []

        async def hold():
            async with hook.async_client_lease() as client:
                clients.append(client)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(hold() for _ in range(users)))
        return clients

    clients = asyncio.run(main())
    assert len({id(c) for c in clients}) == 1  # shared while held
    assert clients[0].is_closed()
    assert hook_module._ASYNC_CLIENTS == {}
