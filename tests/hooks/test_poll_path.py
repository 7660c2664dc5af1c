"""The poll's path: the shared async client's pool, the lighter GET each poll makes, and what it logs.

A triggerer's thousand waits each make one ``GET /v1/batches/{id}`` every few seconds on one shared client. These
tests pin down that the pool is bounded and reused as the connection says, that the lighter GET behaves as the
SDK's own call would (headers, retries, errors), and that neither the transport nor the policy writes a line per
poll. Over real HTTP: the emulator, or a canned server where the emulator cannot produce the wire form.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from airflow_provider_kluster.connection import DEFAULT_MAX_CONNECTIONS
from airflow_provider_kluster.exceptions import (
    KlusterAPIError,
    KlusterAuthError,
    KlusterConfigError,
    KlusterNotFoundError,
    KlusterTransientAPIError,
)
from airflow_provider_kluster.hooks import kluster as hook_module
from airflow_provider_kluster.hooks.kluster import KlusterHook, settings_from_connection
from tests.canned_server import CannedServer
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import request_lines, write_jsonl

BATCH_ID = "67533f6d1d7be1b5a7507be5"
BATCH_BODY = json.dumps(
    {
        "id": BATCH_ID,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "f1",
        "completion_window": "24h",
        "status": "in_progress",
        "created_at": 1_800_000_000,
        "request_counts": {"total": 3, "completed": 1, "failed": 0},
    }
)
POLL = "GET /v1/batches/{id}"


@pytest.fixture
def submitted(kluster_conn, emulator, tmp_path):
    hook = KlusterHook(kluster_conn)
    file_id = hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(3)))
    emulator.emulator.config.requests_per_second = 0.01  # stays in progress
    return hook.create_batch(file_id).id


def _canned_conn(monkeypatch, server: CannedServer, conn_id: str = "canned", **extra: object) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", conn_json(server.base_url, **extra))
    return conn_id


def _poll_many(conn_id: str, count: int, rounds: int = 1) -> list[str]:
    """``rounds`` times, ``count`` concurrent polls in one loop, as one triggerer's waits make them."""

    async def go() -> list[str]:
        hook = KlusterHook(conn_id)
        seen: list[str] = []
        async with hook.async_client_lease():  # the waits hold the shared client between rounds
            for _ in range(rounds):
                batches = await asyncio.gather(
                    *(KlusterHook(conn_id).aget_batch(BATCH_ID) for _ in range(count))
                )
                seen.extend(b.id for b in batches)
        return seen

    return asyncio.run(go())


# -- the pool ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_connections", "expect_at_most"), [(3, 3), (1, 1)])
def test_the_shared_pool_is_bounded_and_kept_alive(monkeypatch, max_connections, expect_at_most):
    with CannedServer(keep_alive=True, delay=0.1) as server:
        server.add("GET", f"/v1/batches/{BATCH_ID}", BATCH_BODY)
        conn_id = _canned_conn(monkeypatch, server, max_connections=max_connections, max_retries=0)
        seen = _poll_many(conn_id, count=12, rounds=2)
    assert seen == [BATCH_ID] * 24
    ports = {r.client for r in server.requests}
    assert len(server.requests) == 24
    assert 1 <= len(ports) <= expect_at_most, (
        ports
    )  # every poll rode one of the pool's kept-alive connections


def test_a_larger_pool_opens_more_connections(monkeypatch):
    """The control for the test above: the bound is the connection's setting, not the server's doing."""
    with CannedServer(keep_alive=True, delay=0.2) as server:
        server.add("GET", f"/v1/batches/{BATCH_ID}", BATCH_BODY)
        conn_id = _canned_conn(monkeypatch, server, max_connections=12, max_retries=0)
        _poll_many(conn_id, count=12)
    assert len({r.client for r in server.requests}) > 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, DEFAULT_MAX_CONNECTIONS), ("", DEFAULT_MAX_CONNECTIONS), (32, 32), ("64", 64), (8.0, 8), (1, 1)],
)
def test_max_connections_is_read_from_the_extra(value, expected):
    from airflow.models.connection import Connection

    extra = {} if value is None else {"max_connections": value}
    conn = Connection(conn_id="k", conn_type="kluster", password=TEST_API_KEY, extra=json.dumps(extra))
    settings = settings_from_connection(conn)
    assert settings.max_connections == expected
    assert settings.pool_limits.max_connections == settings.pool_limits.max_keepalive_connections == expected
    assert TEST_API_KEY not in repr(settings)


@pytest.mark.parametrize("value", [0, -3, "abc", 2.5, True, [4]])
def test_a_bad_max_connections_is_refused_naming_it(value):
    from airflow.models.connection import Connection

    conn = Connection(
        conn_id="k", conn_type="kluster", password=TEST_API_KEY, extra=json.dumps({"max_connections": value})
    )
    with pytest.raises(
        KlusterConfigError, match="'max_connections' must be a whole number of at least 1"
    ) as info:
        settings_from_connection(conn)
    assert "'k'" in str(info.value)
    assert TEST_API_KEY not in str(info.value)


def test_the_default_pool_is_sized_for_reuse():
    """Not the SDK's 1,000 connections of which 100 are kept: no more than it keeps, and every one kept alive."""
    from airflow.models.connection import Connection

    assert 32 <= DEFAULT_MAX_CONNECTIONS <= 100
    settings = settings_from_connection(Connection(conn_id="k", conn_type="kluster", password=TEST_API_KEY))
    assert settings.pool_limits.max_keepalive_connections == settings.pool_limits.max_connections


# -- the lighter GET behaves like the SDK's --------------------------------------------------------------------


def test_the_poll_sends_what_the_sdk_sends(monkeypatch):
    """Same headers as the openai SDK's own ``batches.retrieve`` (less its per-try bookkeeping headers)."""
    import openai

    with CannedServer() as server:
        server.add("GET", f"/v1/batches/{BATCH_ID}", BATCH_BODY)
        conn_id = _canned_conn(monkeypatch, server, max_retries=0)
        assert asyncio.run(KlusterHook(conn_id).aget_batch(BATCH_ID)).id == BATCH_ID

        async def by_the_sdk() -> None:
            async with openai.AsyncOpenAI(
                base_url=server.base_url, api_key=TEST_API_KEY, max_retries=0
            ) as sdk:
                await sdk.batches.retrieve(BATCH_ID)

        asyncio.run(by_the_sdk())
    ours, sdks = ({k.lower(): v for k, v in r.headers.items()} for r in server.requests)
    per_try = {"x-stainless-retry-count", "x-stainless-read-timeout", "x-stainless-timeout"}
    assert set(ours) - per_try == set(sdks) - per_try
    assert ours["authorization"] == f"Bearer {TEST_API_KEY}"
    assert ours["user-agent"] == sdks["user-agent"]
    assert [r.path for r in server.requests] == [f"/v1/batches/{BATCH_ID}"] * 2


@pytest.mark.parametrize("status", [429, 500, 502, 503], ids=lambda s: f"http-{s}")
def test_a_transient_poll_error_is_retried(kluster_conn, emulator, submitted, status):
    emulator.emulator.faults.add(route=POLL, status=status, times=2, retry_after=0)
    before = emulator.emulator.counters.get(POLL, 0)
    assert asyncio.run(KlusterHook(kluster_conn).aget_batch(submitted)).id == submitted
    assert emulator.emulator.counters[POLL] - before == 3


def test_a_persistent_poll_error_gives_up_after_max_retries(kluster_conn, emulator, submitted):
    emulator.emulator.faults.add(route=POLL, status=503, times=10, retry_after=0)
    before = emulator.emulator.counters.get(POLL, 0)
    with pytest.raises(KlusterTransientAPIError) as info:
        asyncio.run(KlusterHook(kluster_conn).aget_batch(submitted))
    assert info.value.status_code == 503
    assert submitted in str(info.value)
    assert info.value.__context__ is None  # no response (nor its body) hangs on the error
    assert emulator.emulator.counters[POLL] - before == 3  # 1 + max_retries=2


def test_a_dropped_poll_connection_is_retried(kluster_conn, emulator, submitted):
    drop = emulator.emulator.faults.add(route=POLL, drop_connection=True, times=1)
    assert asyncio.run(KlusterHook(kluster_conn).aget_batch(submitted)).id == submitted
    assert drop.fired == 1


def test_a_malformed_poll_answer_is_transient(kluster_conn, emulator, submitted):
    emulator.emulator.faults.add(route=POLL, malformed_body=True, times=1)
    with pytest.raises(KlusterTransientAPIError, match="get batch"):
        asyncio.run(KlusterHook(kluster_conn).aget_batch(submitted))


def test_not_found_and_a_wrong_key_are_not_retried(kluster_conn, emulator, monkeypatch):
    before = emulator.emulator.counters.get(POLL, 0)
    with pytest.raises(KlusterNotFoundError, match="000000000000000000000000"):
        asyncio.run(KlusterHook(kluster_conn).aget_batch("000000000000000000000000"))
    wrong = TEST_API_KEY + "-wrong"
    monkeypatch.setenv("AIRFLOW_CONN_BAD", conn_json(emulator.base_url, api_key=wrong, max_retries=2))
    with pytest.raises(KlusterAuthError) as info:
        asyncio.run(KlusterHook("bad").aget_batch(BATCH_ID))
    assert wrong not in str(info.value)
    assert TEST_API_KEY not in str(info.value)
    assert emulator.emulator.counters.get(POLL, 0) - before == 2


@pytest.mark.parametrize(
    ("headers", "tries"),
    [
        ({"x-should-retry": "false"}, 1),  # the server says no
        ({"Retry-After": "600"}, 1),  # longer than two minutes: not waited for
        ({"x-should-retry": "true"}, 3),  # a 400 the server says to retry
    ],
)
def test_the_servers_retry_headers_are_obeyed(monkeypatch, headers, tries):
    status = 400 if headers.get("x-should-retry") == "true" else 503
    with CannedServer() as server:
        server.add(
            "GET", f"/v1/batches/{BATCH_ID}", '{"error": {"message": "busy"}}', status=status, **headers
        )
        conn_id = _canned_conn(monkeypatch, server, max_retries=2)
        with pytest.raises(KlusterAPIError) as info:
            asyncio.run(KlusterHook(conn_id).aget_batch(BATCH_ID))
    assert getattr(info.value, "status_code", None) == status
    assert len(server.requests) == tries


# -- what a poll logs ---------------------------------------------------------------------------------------


def test_the_transport_writes_no_line_per_request(kluster_conn, emulator, submitted, caplog):
    transport = logging.getLogger("httpx2")
    saved = transport.level
    transport.setLevel(logging.NOTSET)
    try:
        caplog.set_level(logging.INFO)
        for _ in range(3):
            asyncio.run(KlusterHook(kluster_conn).aget_batch(submitted))
        assert transport.level == logging.WARNING
        assert not [r for r in caplog.records if r.name.startswith("httpx")], caplog.text
    finally:
        transport.setLevel(saved)


def test_a_configured_transport_level_is_left_alone(kluster_conn, emulator, submitted):
    transport = logging.getLogger("httpx2")
    saved = transport.level
    transport.setLevel(logging.DEBUG)
    try:
        hook_module._ASYNC_CLIENTS.clear()
        asyncio.run(KlusterHook(kluster_conn).aget_batch(submitted))
        assert transport.level == logging.DEBUG
    finally:
        transport.setLevel(saved)


def test_a_thousand_waits_resuming_look_the_connection_up_once(
    kluster_conn, emulator, submitted, monkeypatch
):
    lookups = 0
    original = KlusterHook._alookup_connection

    async def counting(self):
        nonlocal lookups
        lookups += 1
        await asyncio.sleep(0.05)  # a slow secrets backend: the others must wait for this one, not ask again
        return await original(self)

    monkeypatch.setattr(KlusterHook, "_alookup_connection", counting)

    async def go() -> int:
        batches = await asyncio.gather(*(KlusterHook(kluster_conn).aget_batch(submitted) for _ in range(200)))
        return len(batches)

    assert asyncio.run(go()) == 200
    assert lookups == 1


def test_the_sync_client_writes_no_line_per_request_either(kluster_conn, emulator, submitted, caplog):
    transport = logging.getLogger("httpx2")
    saved = transport.level
    transport.setLevel(logging.NOTSET)
    try:
        caplog.set_level(logging.INFO)
        KlusterHook(kluster_conn).get_batch(submitted)
        assert transport.level == logging.WARNING
        assert not [r for r in caplog.records if r.name.startswith("httpx")], caplog.text
    finally:
        transport.setLevel(saved)
