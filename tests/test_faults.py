"""The fault suite: transient failures, dropped connections and stale keep-alives lose nothing."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_provider_kluster.emulator import EmulatorServer
from airflow_provider_kluster.exceptions import KlusterTransientAPIError
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator
from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import MODEL, make_context, request_lines, write_jsonl

# -- polling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [{"status": 503}, {"status": 429, "retry_after": 0}, {"drop_connection": True}],
    ids=["503", "429", "dropped"],
)
def test_worker_side_wait_survives_transient_errors(kluster_conn, emulator, fault):
    # 5 failures: the client's 2 retries absorb some, the waiter's tolerance the rest.
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", times=5, **fault)
    op = KlusterSubmitBatchOperator(
        task_id="t",
        requests=["hi"],
        model=MODEL,
        wait_for_completion=True,
        deferrable=False,
        poll_interval=0.05,
    )
    batch_id = op.execute(make_context())
    assert rule.fired == 5  # every injected failure really hit the wait
    assert emulator.emulator.get_batch_raw(batch_id)["status"] == "completed"


def test_stale_keep_alive_connections_are_transient(monkeypatch, tmp_path):
    """A reused connection the server already closed ("Server disconnected without sending a response").

    The server keeps idle connections 1 s and the trigger polls every 1 s, as in the field; because the real race
    is rare on loopback, the emulator also drops two polls' connections without a response. With no client
    retries, only the trigger's own tolerance can carry the wait: it must treat them as transient.
    """
    with EmulatorServer(
        timeout_keep_alive=1, api_key=TEST_API_KEY, requests_per_second=2, pre_schedule_delay=0.05
    ) as server:
        monkeypatch.setenv("AIRFLOW_CONN_KA", conn_json(server.base_url, max_retries=0))
        hook = KlusterHook("ka")
        batch_id = hook.create_batch(hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(6)))).id
        drops = server.emulator.faults.add(route="GET /v1/batches/{id}", drop_connection=True, times=2)
        trigger = KlusterBatchTrigger(
            batch_id, kluster_conn_id="ka", poll_interval=1.0, max_consecutive_errors=3
        )

        async def run():
            return [e.payload async for e in trigger.run()]

        events = asyncio.run(asyncio.wait_for(run(), 60))
    assert drops.fired == 2
    assert [e["status"] for e in events] == ["success"]


def test_a_dropped_connection_is_transient_not_permanent(kluster_conn, emulator, monkeypatch):
    """The error a dropped connection raises is classified transient (and says what happened)."""
    monkeypatch.setenv("AIRFLOW_CONN_NORETRY", conn_json(emulator.base_url, max_retries=0))
    emulator.emulator.faults.add(route="GET /v1/batches/{id}", drop_connection=True, times=1)
    with pytest.raises(KlusterTransientAPIError, match="could not reach kluster.ai") as info:
        KlusterHook("noretry").get_batch("67533f6d1d7be1b5a7507be5")
    assert info.value.is_transient


# -- upload and download ---------------------------------------------------------------------------------


def test_upload_survives_a_dropped_connection(kluster_conn, emulator, tmp_path):
    """Nothing was stored (dropped before the server committed): the upload is looked for, then sent again."""
    path = write_jsonl(tmp_path / "r.jsonl", request_lines(200))
    emulator.emulator.faults.add(route="POST /v1/files", drop_connection=True, times=1)
    looked = []
    file_id = KlusterHook(kluster_conn).upload_file(path, find_created=lambda: looked.append(1))
    assert looked == [1]
    assert emulator.emulator.counters["POST /v1/files"] == 2
    stored = emulator.emulator.get_file(file_id)
    assert stored.bytes == path.stat().st_size  # the retry sent the whole file again, not the rest of it


def test_an_upload_with_an_unknown_outcome_is_not_blindly_retried(kluster_conn, emulator, tmp_path):
    """Without a way to look for what it may have stored, the hook raises instead of uploading twice."""
    path = write_jsonl(tmp_path / "r.jsonl", request_lines(3))
    emulator.emulator.faults.add(route="POST /v1/files", status=503, times=1, retry_after=0)
    with pytest.raises(KlusterTransientAPIError, match="Not retried"):
        KlusterHook(kluster_conn).upload_file(path)
    assert emulator.emulator.counters["POST /v1/files"] == 1


class _FlakyContent:
    """A file server whose first response breaks half-way; later ones honour Range or not, as told."""

    def __init__(self, body: bytes, *, honour_range: bool, breaks: int = 1) -> None:
        self.body, self.honour_range, self.breaks = body, honour_range, breaks
        self.ranges: list[str | None] = []

    def __enter__(self):
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                flaky.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if (rng and flaky.honour_range) else 0
                data = flaky.body[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if flaky.breaks > 0:
                    flaky.breaks -= 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


BODY = b"".join(json.dumps({"custom_id": f"r{i}", "pad": "x" * 200}).encode() + b"\n" for i in range(5000))


@pytest.mark.parametrize("honour_range", [True, False], ids=["resumed-with-range", "restarted"])
def test_download_survives_a_connection_cut_mid_stream(monkeypatch, tmp_path, honour_range):
    with _FlakyContent(BODY, honour_range=honour_range) as server:
        monkeypatch.setenv("AIRFLOW_CONN_FLAKY", conn_json(server.base_url, max_retries=0))
        dest = KlusterHook("flaky").download_file("file-1", tmp_path / "out.jsonl", chunk_size=4096)
        assert dest.read_bytes() == BODY
        assert server.ranges[0] is None
        assert str(server.ranges[1]).startswith("bytes=")
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_download_that_keeps_breaking_leaves_no_partial_file(monkeypatch, tmp_path):
    with _FlakyContent(BODY, honour_range=True, breaks=100) as server:
        monkeypatch.setenv("AIRFLOW_CONN_FLAKY", conn_json(server.base_url, max_retries=0))
        with pytest.raises(KlusterTransientAPIError, match="download file file-1"):
            KlusterHook("flaky").download_file("file-1", tmp_path / "out.jsonl", attempts=3)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_destination_survives_a_failed_download(monkeypatch, tmp_path):
    (tmp_path / "out.jsonl").write_text("previous good results\n")
    with _FlakyContent(BODY, honour_range=True, breaks=100) as server:
        monkeypatch.setenv("AIRFLOW_CONN_FLAKY", conn_json(server.base_url, max_retries=0))
        with pytest.raises(KlusterTransientAPIError):
            KlusterHook("flaky").download_file("file-1", tmp_path / "out.jsonl", attempts=2)
    assert (tmp_path / "out.jsonl").read_text() == "previous good results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_malformed_bodies_are_transient(kluster_conn, emulator, tmp_path):
    hook = KlusterHook(kluster_conn)
    batch_id = hook.create_batch(hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(2)))).id
    emulator.emulator.faults.add(route="GET /v1/batches/{id}", malformed_body=True, times=1)
    with pytest.raises(KlusterTransientAPIError, match="not valid JSON"):
        hook.get_batch(batch_id)
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", malformed_body=True, times=2)
    trigger = KlusterBatchTrigger(batch_id, kluster_conn_id=kluster_conn, poll_interval=0.05)

    async def run():
        return [e.payload async for e in trigger.run()]

    assert [e["status"] for e in asyncio.run(run())] == ["success"]
    assert rule.fired == 2  # the trigger read both malformed bodies and kept waiting
