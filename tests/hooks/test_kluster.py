"""KlusterHook against the emulator over real HTTP, and against canned published responses."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from airflow_provider_kluster.batches import BatchStatus
from airflow_provider_kluster.exceptions import (
    KlusterAuthError,
    KlusterBadRequestError,
    KlusterConfigError,
    KlusterNotFoundError,
    KlusterTransientAPIError,
)
from airflow_provider_kluster.hooks.kluster import KlusterHook, settings_from_connection
from tests.canned_server import CannedServer
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import FIXTURES, MODEL, request_lines, wait_for, write_jsonl


@pytest.fixture
def hook(kluster_conn):
    return KlusterHook(kluster_conn)


@pytest.fixture
def input_file(tmp_path):
    return write_jsonl(tmp_path / "requests.jsonl", request_lines(5))


def _submit(hook, input_file, **kwargs):
    file_id = hook.upload_file(input_file)
    return hook.create_batch(file_id, **kwargs)


# -- connection ------------------------------------------------------------------------------------------


def test_test_connection_lists_models(hook):
    ok, message = hook.test_connection()
    assert ok, message
    assert "models available" in message


def test_test_connection_with_a_wrong_key_says_so_without_the_key(emulator, monkeypatch):
    wrong = "kl-WRONG-key-0123456789"
    monkeypatch.setenv("AIRFLOW_CONN_BAD", conn_json(emulator.base_url, api_key=wrong))
    ok, message = KlusterHook("bad").test_connection()
    assert not ok
    assert "rejected the API key (HTTP 401)" in message
    assert wrong not in message


def test_auth_failure_raises_auth_error_naming_the_batch(emulator, monkeypatch):
    wrong = "kl-WRONG-key-0123456789"
    monkeypatch.setenv("AIRFLOW_CONN_BAD", conn_json(emulator.base_url, api_key=wrong))
    with pytest.raises(KlusterAuthError) as info:
        KlusterHook("bad").get_batch("67533f6d1d7be1b5a7507be5")
    assert info.value.status_code == 401
    assert "67533f6d1d7be1b5a7507be5" in str(info.value)
    assert wrong not in str(info.value)


def test_list_models_comes_from_the_server(hook, emulator):
    models = hook.list_models()
    assert MODEL in models
    assert len(models) == len(set(models)) > 1


@pytest.mark.parametrize(
    ("conn", "base_url"),
    [
        ({"host": "http://127.0.0.1:8000/v1"}, "http://127.0.0.1:8000/v1"),
        ({"host": "api.kluster.ai", "schema": "v1"}, "https://api.kluster.ai/v1"),
        ({"host": "127.0.0.1", "port": 8000}, "http://127.0.0.1:8000/v1"),
        ({}, "https://api.kluster.ai/v1"),
        ({"host": "ignored", "extra": json.dumps({"base_url": "http://x:1/v1/"})}, "http://x:1/v1"),
    ],
    ids=["full-url", "bare-host", "local-host-port", "default", "extra-base-url"],
)
def test_base_url_from_connection(conn, base_url):
    from airflow.sdk import Connection

    c = Connection(conn_id="k", conn_type="kluster", password="x" * 8, **conn)
    assert settings_from_connection(c).base_url == base_url


def test_uri_connection_from_env(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_KURI", "kluster://:abcd1234@api.kluster.ai/v1?timeout=7&max_retries=1")
    settings = KlusterHook("kuri").settings
    assert settings.base_url == "https://api.kluster.ai/v1"
    assert (settings.timeout, settings.max_retries) == (7.0, 1)
    assert "abcd1234" not in repr(settings)


def test_missing_api_key_is_a_config_error(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOKEY", json.dumps({"conn_type": "kluster", "host": "http://x/v1"}))
    with pytest.raises(KlusterConfigError, match="no API key"):
        KlusterHook("nokey").get_conn()


# -- files and batches -----------------------------------------------------------------------------------


def test_upload_returns_the_file_id_and_keeps_the_bytes(hook, input_file):
    file_id = hook.upload_file(input_file)
    info = hook.get_file(file_id)
    assert info["id"] == file_id
    assert int(info["bytes"]) == input_file.stat().st_size
    assert info["purpose"] == "batch"


def test_upload_from_object_storage_path(hook, input_file):
    from airflow.sdk import ObjectStoragePath

    file_id = hook.upload_file(ObjectStoragePath(f"file://{input_file}"))
    assert int(hook.get_file(file_id)["bytes"]) == input_file.stat().st_size


def test_upload_of_a_missing_file_is_a_config_error(hook, tmp_path, emulator):
    with pytest.raises(KlusterConfigError, match="no such file"):
        hook.upload_file(tmp_path / "nope.jsonl")


def test_create_batch_puts_kluster_options_under_their_metadata_key(hook, input_file):
    batch = _submit(
        hook,
        input_file,
        metadata={"team": "ml"},
        kluster_options={"greedy": True, "strict_completion_window": False},
    )
    stored = hook.get_batch(batch.id)
    assert stored.metadata == {
        "team": "ml",
        "@kluster.ai": {"greedy": True, "strict_completion_window": False},
    }
    assert stored.completion_window == "24h"


def test_unknown_kluster_option_is_refused_before_any_call(hook, emulator):
    with pytest.raises(KlusterConfigError, match="Unknown kluster_options"):
        hook.create_batch("f1", kluster_options={"fast": True})
    assert emulator.emulator.counters.get("POST /v1/batches", 0) == 0


def test_batch_runs_to_completed_and_downloads(hook, input_file, tmp_path):
    batch = _submit(hook, input_file)
    assert batch.status in (BatchStatus.PRE_SCHEDULE, BatchStatus.VALIDATING)
    assert batch.created_at is not None
    done = wait_for(hook, batch.id)
    assert done.status is BatchStatus.COMPLETED
    assert done.request_counts.total == 5
    assert done.request_counts.completed == 5
    assert done.completed_at >= done.created_at
    dest = hook.download_file(done.output_file_id, tmp_path / "out" / "results.jsonl")
    ids = sorted(json.loads(line)["custom_id"] for line in dest.read_text().splitlines())
    assert ids == [f"request-{i}" for i in range(5)]
    assert [p.name for p in dest.parent.iterdir()] == ["results.jsonl"]  # no temp file left behind


def test_download_to_object_storage_path(hook, input_file, tmp_path):
    from airflow.sdk import ObjectStoragePath

    done = wait_for(hook, _submit(hook, input_file).id)
    dest = hook.download_file(done.output_file_id, ObjectStoragePath(f"file://{tmp_path}/os/results.jsonl"))
    assert len(dest.read_text().splitlines()) == 5


def test_failed_batch_carries_errors(hook, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    done = wait_for(hook, hook.create_batch(hook.upload_file(bad)).id)
    assert done.status is BatchStatus.FAILED
    assert done.errors == ["line 1: This line is not parseable as valid JSON. (invalid_json_line)"]
    assert done.failed_at is not None
    assert done.output_file_id is None


def test_cancel_sends_a_json_body_and_reaches_cancelled(hook, emulator, tmp_path):
    emulator.emulator.config.requests_per_second = 2  # slow enough to cancel mid-way
    batch = _submit(hook, write_jsonl(tmp_path / "r.jsonl", request_lines(200)))
    wait_for(hook, batch.id, until=lambda b: b.status is BatchStatus.IN_PROGRESS)
    cancelling = hook.cancel_batch(batch.id)  # the emulator answers 500 to an empty JSON body, as kluster did
    assert cancelling.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    done = wait_for(hook, batch.id)
    assert done.status is BatchStatus.CANCELLED
    assert done.cancelled_at is not None
    assert done.request_counts.completed < 200


def test_async_get_and_cancel(hook, emulator, tmp_path):
    emulator.emulator.config.requests_per_second = 2
    batch = _submit(hook, write_jsonl(tmp_path / "r.jsonl", request_lines(100)))

    async def go():
        fresh = KlusterHook(hook.kluster_conn_id)
        seen = await fresh.aget_batch(batch.id)
        cancelled = await fresh.acancel_batch(batch.id)
        return seen, cancelled

    seen, cancelled = asyncio.run(go())
    assert seen.id == batch.id
    assert cancelled.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    assert wait_for(hook, batch.id).status is BatchStatus.CANCELLED


def test_async_clients_are_shared_per_loop_and_settings(kluster_conn):
    """Hooks in one loop with the same settings share a client; other settings or another loop get their own."""

    async def go():
        a = await KlusterHook(kluster_conn).get_async_conn()
        b = await KlusterHook(kluster_conn).get_async_conn()
        other_settings = await KlusterHook(kluster_conn, timeout=7).get_async_conn()
        return a, b, other_settings

    a, b, other_settings = asyncio.run(go())
    assert a is b
    assert other_settings is not a
    assert other_settings.timeout == 7
    a_next_loop, b_next_loop, _ = asyncio.run(go())
    assert a_next_loop is b_next_loop
    assert a_next_loop is not a  # a client is bound to its loop: a new loop never reuses one


def test_list_batches_follows_the_cursor_newest_first(hook, input_file, emulator):
    file_id = hook.upload_file(input_file)
    created = [hook.create_batch(file_id).id for _ in range(5)]
    listed = [b.id for b in hook.iter_batches(page_size=2)]
    assert listed == list(reversed(created))
    assert emulator.emulator.counters["GET /v1/batches"] == 3
    assert [b.id for b in hook.list_batches(limit=3)] == list(reversed(created))[:3]


def test_get_and_delete_file_and_not_found(hook, input_file):
    file_id = hook.upload_file(input_file)
    assert hook.delete_file(file_id) is True
    with pytest.raises(KlusterNotFoundError) as info:
        hook.get_file(file_id)
    assert file_id in str(info.value)
    assert info.value.status_code == 404


def test_unknown_batch_is_not_found_and_not_retried(hook, emulator):
    with pytest.raises(KlusterNotFoundError, match="get batch 000000000000000000000000"):
        hook.get_batch("000000000000000000000000")
    assert emulator.emulator.counters["GET /v1/batches/{id}"] == 1


# -- retries ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503], ids=lambda s: f"http-{s}")
def test_transient_errors_are_retried_then_succeed(hook, input_file, emulator, status):
    batch = _submit(hook, input_file)
    emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=status, times=2, retry_after=0)
    assert hook.get_batch(batch.id).id == batch.id
    assert emulator.emulator.counters["GET /v1/batches/{id}"] == 3


def test_retry_after_is_honoured(hook, input_file, emulator):
    import time

    batch = _submit(hook, input_file)
    emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=429, times=1, retry_after=1)
    start = time.monotonic()
    assert hook.get_batch(batch.id).id == batch.id
    assert time.monotonic() - start >= 0.9
    assert emulator.emulator.counters["GET /v1/batches/{id}"] == 2  # the 429, then the retry after 1 s


def test_persistent_5xx_gives_up_with_a_transient_error(hook, input_file, emulator):
    batch = _submit(hook, input_file)
    emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, times=10, retry_after=0)
    with pytest.raises(KlusterTransientAPIError) as info:
        hook.get_batch(batch.id)
    assert info.value.status_code == 503
    assert info.value.is_transient
    assert batch.id in str(info.value)
    assert emulator.emulator.counters["GET /v1/batches/{id}"] == 3  # 1 + max_retries=2


def test_dropped_connection_is_retried(hook, input_file, emulator):
    batch = _submit(hook, input_file)
    drop = emulator.emulator.faults.add(route="GET /v1/batches/{id}", drop_connection=True, times=1)
    assert hook.get_batch(batch.id).id == batch.id
    assert drop.fired == 1
    assert emulator.emulator.counters["GET /v1/batches/{id}"] == 2  # the dropped call, then the retry


def test_the_key_never_reaches_logs(hook, input_file, emulator, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    batch = _submit(hook, input_file)
    wait_for(hook, batch.id)
    monkeypatch.setenv("AIRFLOW_CONN_BAD", conn_json(emulator.base_url, api_key=TEST_API_KEY + "x"))
    with pytest.raises(KlusterAuthError):
        KlusterHook("bad").get_batch(batch.id)
    assert caplog.records
    assert TEST_API_KEY not in caplog.text


# -- published examples and kluster's error envelopes, served verbatim -----------------------------------


@pytest.fixture
def canned(monkeypatch):
    with CannedServer() as server:
        monkeypatch.setenv("AIRFLOW_CONN_CANNED", conn_json(server.base_url, max_retries=0))
        yield server


def test_published_examples_through_the_hook(canned, tmp_path):
    canned.add("GET", "/v1/batches/mybatch-123", (FIXTURES / "batches_retrieve.response.json").read_bytes())
    canned.add(
        "POST", "/v1/batches/mybatch-123/cancel", (FIXTURES / "batches_cancel.response.json").read_bytes()
    )
    canned.add("POST", "/v1/batches", (FIXTURES / "batches_create.response.json").read_bytes())
    canned.add("GET", "/v1/batches", (FIXTURES / "batches_list.response.cleaned.json").read_bytes())
    canned.add("POST", "/v1/files", (FIXTURES / "files_upload.response.json").read_bytes())
    canned.add("GET", "/v1/models", (FIXTURES / "models_list.response.json").read_bytes())
    hook = KlusterHook("canned")

    got = hook.get_batch("mybatch-123")
    assert got.status is BatchStatus.COMPLETED
    assert got.completed_at.timestamp() == 1733832781
    assert got.output_file_id == "myfile-123-output"

    cancelling = hook.cancel_batch("mybatch-123")
    assert cancelling.status is BatchStatus.CANCELLING
    assert canned.requests[-1].body == b"{}"
    assert {k.lower(): v for k, v in canned.requests[-1].headers.items()}[
        "content-type"
    ] == "application/json"

    created = hook.create_batch("myfile-123", completion_window="24h")
    assert created.status is BatchStatus.VALIDATING
    assert created.expires_at.timestamp() == 1733919177

    listed = hook.list_batches()
    assert [b.id for b in listed] == ["mybatch-123"]

    assert hook.upload_file(write_jsonl(tmp_path / "in.jsonl", request_lines(1))) == "myfile-123"
    published = json.loads((FIXTURES / "models_list.response.json").read_bytes())
    assert hook.list_models() == [m["id"] for m in published["data"]]


def test_verbatim_list_example_is_not_json_and_fails_clearly(canned):
    canned.add("GET", "/v1/batches", (FIXTURES / "batches_list.response.verbatim.txt").read_bytes())
    with pytest.raises(
        KlusterTransientAPIError, match="list batches returned a body that is not valid JSON"
    ) as info:
        KlusterHook("canned").list_batches()
    assert info.value.call == "list batches"
    assert TEST_API_KEY not in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "exc", "text"),
    [
        (
            400,
            '{"error": {"message": "completion_window must be 24h", "errorCode": 4000, "type": "invalid_request_error"}}',
            KlusterBadRequestError,
            "completion_window must be 24h (code 4000)",
        ),
        (
            404,
            '{"message": "Batch not found", "errorCode": -1}',
            KlusterNotFoundError,
            "Batch not found (code -1)",
        ),
        (403, "forbidden by policy", KlusterAuthError, "forbidden by policy"),
        (500, "upstream exploded", KlusterTransientAPIError, "upstream exploded"),
    ],
    ids=["kluster-envelope", "flat-envelope", "plain-text-403", "plain-text-500"],
)
def test_kluster_error_envelopes_are_read(canned, status, body, exc, text):
    canned.add("GET", "/v1/batches/b-1", body, status=status, **{"x-request-id": "req-42"})
    with pytest.raises(exc) as info:
        KlusterHook("canned").get_batch("b-1")
    assert text in str(info.value)
    assert "get batch b-1" in str(info.value)
    assert info.value.request_id == "req-42"
    assert info.value.status_code == status


def test_a_server_echoing_the_key_is_redacted(canned):
    canned.add("GET", "/v1/batches/b-1", json.dumps({"message": f"bad key {TEST_API_KEY}"}), status=401)
    with pytest.raises(KlusterAuthError) as info:
        KlusterHook("canned").get_batch("b-1")
    assert TEST_API_KEY not in str(info.value)
    assert "***" in str(info.value)


def test_openai_style_int_timestamps_read_the_same(monkeypatch, tmp_path):
    from airflow_provider_kluster.emulator import EmulatorServer

    with EmulatorServer(
        api_key=TEST_API_KEY, timestamps="int", requests_per_second=1000, pre_schedule_delay=0.01
    ) as s:
        monkeypatch.setenv("AIRFLOW_CONN_INTS", conn_json(s.base_url))
        hook = KlusterHook("ints")
        batch = hook.create_batch(hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(2))))
        assert isinstance(s.emulator.get_batch_raw(batch.id)["created_at"], int)
        done = wait_for(hook, batch.id)
    assert done.status is BatchStatus.COMPLETED
    assert done.completed_at >= done.created_at
    assert done.cancelled_at is None
