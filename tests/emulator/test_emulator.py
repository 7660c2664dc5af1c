"""Tests of the kluster.ai emulator over real loopback HTTP (httpx and the openai SDK)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from airflow_provider_kluster.emulator import (
    EmulatorServer,
    FaultInjector,
    FaultRule,
    KlusterEmulator,
    parse_fault_spec,
)
from airflow_provider_kluster.emulator.faults import rule_from_dict
from tests.helpers import FIXTURES

if not any(
    ep.value == "airflow_provider_kluster.emulator.pytest_plugin" for ep in entry_points(group="pytest11")
):
    # package not installed: load the fixtures the pytest11 entry point would provide
    from airflow_provider_kluster.emulator.pytest_plugin import (  # noqa: F401
        kluster_emulator,
        kluster_emulator_server,
    )

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
# kluster's published input files and batch guide: every model id they use must be one the emulator lists.
DOCUMENTED_MODEL_SOURCES = ("batch_input.jsonl", "batch_input_multimodel.jsonl", "batch-guide.txt")
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def make_lines(n: int, model: str = MODEL, prefix: str = "req") -> bytes:
    lines = [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Question {i}?"}]},
        }
        for i in range(n)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture
def server(kluster_emulator: EmulatorServer) -> EmulatorServer:
    return kluster_emulator


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=10,
    ) as c:
        yield c


def upload(client: httpx.Client, content: bytes, name: str = "input.jsonl") -> dict[str, Any]:
    resp = client.post("/files", files={"file": (name, content)}, data={"purpose": "batch"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def create_batch(client: httpx.Client, file_id: str, window: str = "24h", **extra: Any) -> dict[str, Any]:
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": window,
        **extra,
    }
    resp = client.post("/batches", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for(
    client: httpx.Client, batch_id: str, statuses: set[str], timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.get(f"/batches/{batch_id}").json()
        if batch["status"] in statuses:
            return batch
        assert time.monotonic() < deadline, "batch stuck in {}".format(batch["status"])
        time.sleep(0.02)


def jsonl(client: httpx.Client, file_id: str) -> list[dict[str, Any]]:
    resp = client.get(f"/files/{file_id}/content")
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- auth, models, chat
def test_auth_required_and_key_not_echoed(server: EmulatorServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-secret-key"}):
        resp = httpx.get(server.base_url + "/batches", headers=headers)
        assert resp.status_code == 401
        assert resp.json() == {
            "error": {"message": "Invalid API key", "errorCode": 4000, "type": "invalid_request_error"},
        }
        assert "wrong-secret-key" not in resp.text


def test_models_cover_documented_ids(client: httpx.Client) -> None:
    data = client.get("/models").json()
    assert data["object"] == "list"
    ids = {m["id"] for m in data["data"]}
    assert all(m["object"] == "model" and "created" in m and "owned_by" in m for m in data["data"])
    used = set()
    for name in DOCUMENTED_MODEL_SOURCES:
        text = (FIXTURES / name).read_text()
        found = {chunk.split('"')[0] for chunk in text.split('"model": "')[1:]}
        assert found, f"{name} names no model: there is nothing to check"
        used |= found
    assert used <= ids, used - ids


def test_chat_completions(server: EmulatorServer) -> None:
    oai = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    body = json.loads((FIXTURES / "chat_completions.request.json").read_text())
    resp = oai.chat.completions.create(**body)
    assert resp.object == "chat.completion"
    assert "Argentina" in resp.choices[0].message.content
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    raw = httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {server.api_key}"},
    ).json()
    assert raw["prompt_logprobs"] is None
    assert raw["choices"][0]["stop_reason"] is None
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope/model", messages=[{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------- files
def test_file_upload_get_list_delete(client: httpx.Client) -> None:
    content = (FIXTURES / "batch_input.jsonl").read_bytes()
    meta = upload(client, content, "mybatch.jsonl")
    assert set(meta) == {"id", "object", "bytes", "created_at", "filename", "purpose"}
    assert len(meta["id"]) == 24
    assert int(meta["id"], 16) >= 0
    assert meta["bytes"] == len(content)
    assert meta["purpose"] == "batch"
    assert meta["filename"] == "/data/uploads/{}/mybatch.jsonl".format(meta["id"])
    assert meta["created_at"].isdigit()
    assert client.get("/files/{}".format(meta["id"])).json() == meta
    listing = client.get("/files").json()
    assert [f["id"] for f in listing["data"]] == [meta["id"]]
    assert client.get("/files/{}/content".format(meta["id"])).content == content
    assert client.delete("/files/{}".format(meta["id"])).json() == {
        "id": meta["id"],
        "object": "file",
        "deleted": True,
    }
    resp = client.get("/files/{}".format(meta["id"]))
    assert resp.status_code == 404
    assert resp.json()["errorCode"] == -1
    assert client.get("/files/{}/content".format(meta["id"])).status_code == 404


def test_upload_too_large_rejected(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.max_file_bytes = 1000
    resp = client.post("/files", files={"file": ("big.jsonl", b"x" * 5000)}, data={"purpose": "batch"})
    assert resp.status_code == 400
    assert resp.json()["error"]["errorCode"] == 4000
    assert client.get("/files").json()["data"] == []


def test_range_download(server: EmulatorServer, client: httpx.Client) -> None:
    content = bytes(range(256)) * 64
    file_id = server.emulator.add_file(content, filename="blob.bin")
    resp = client.get(f"/files/{file_id}/content", headers={"Range": "bytes=100-199"})
    assert resp.status_code == 206
    assert resp.content == content[100:200]
    assert resp.headers["content-range"] == f"bytes 100-199/{len(content)}"
    # resume a "broken" download from an offset
    with client.stream("GET", f"/files/{file_id}/content") as stream:
        first = next(stream.iter_bytes(1000))[:1000]
    rest = client.get(f"/files/{file_id}/content", headers={"Range": f"bytes={len(first)}-"})
    assert rest.status_code == 206
    assert first + rest.content == content


def test_add_file_from_path_in_place(server: EmulatorServer, client: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    path.write_bytes(make_lines(3))
    file_id = server.emulator.add_file(path, copy=False)
    assert client.get(f"/files/{file_id}/content").content == path.read_bytes()
    assert client.delete(f"/files/{file_id}").status_code == 200
    assert path.exists()
    gen_id = server.emulator.add_file(iter([b"a\n", b"b\n"]), purpose="batch")
    assert client.get(f"/files/{gen_id}/content").content == b"a\nb\n"


# --------------------------------------------------------------------------- batch lifecycle
def test_batch_lifecycle_httpx(server: EmulatorServer, client: httpx.Client) -> None:
    content = (FIXTURES / "batch_input_multimodel.jsonl").read_bytes() + make_lines(1, model="no/such-model")
    file_id = upload(client, content)["id"]
    created = create_batch(
        client, file_id, metadata={"@kluster.ai": {"greedy": True, "strict_completion_window": False}}
    )
    assert created["status"] == "pre_schedule"
    assert len(created["id"]) == 24
    for key in ("output_file_id", "error_file_id", "cancelled_at", "completed_at"):
        assert key not in created
    assert int(created["expires_at"]) - int(created["created_at"]) == 24 * 3600
    assert created["metadata"]["@kluster.ai"]["greedy"] is True
    seen = set()
    deadline = time.monotonic() + 10
    while True:
        batch = client.get("/batches/{}".format(created["id"])).json()
        seen.add(batch["status"])
        if batch["status"] in TERMINAL:
            break
        assert "output_file_id" not in batch
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert batch["status"] == "completed", batch
    assert "validating" in seen or "in_progress" in seen
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    for key in ("in_progress_at", "finalizing_at", "completed_at"):
        assert batch[key].isdigit()
    out = jsonl(client, batch["output_file_id"])
    assert sorted(line["custom_id"] for line in out) == ["request-1", "request-2", "request-3"]
    for line in out:
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert "stop_reason" in body["choices"][0]
    models = {line["response"]["body"]["model"] for line in out}
    assert len(models) == 3
    errors = jsonl(client, batch["error_file_id"])
    assert [e["custom_id"] for e in errors] == ["req-0"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"
    assert server.emulator.counters["batches_created"] == 1


def test_batch_lifecycle_openai_sdk(server: EmulatorServer) -> None:
    oai = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    content = make_lines(25)
    file_obj = oai.files.create(file=("batch.jsonl", content), purpose="batch")
    batch = oai.batches.create(
        input_file_id=file_obj.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 10
    while batch.status not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.02)
        batch = oai.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.completed == 25
    lines = [json.loads(x) for x in oai.files.content(batch.output_file_id).content.splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(25))
    assert ids != sorted(ids, key=lambda x: int(x.split("-")[1]))  # order is (deterministically) shuffled
    assert batch.error_file_id is None


def test_int_timestamps_mode(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.timestamps = "int"
    file_id = upload(client, make_lines(1))["id"]
    created = create_batch(client, file_id)
    assert isinstance(created["created_at"], int)
    assert created["output_file_id"] is None
    assert created["cancelled_at"] is None
    listing = client.get("/batches").json()
    assert "items_per_page" not in listing


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"this is not json\n" + make_lines(1), "invalid_json_line"),
        (b"", "empty_file"),
        (
            b'{"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {"model": "m"}}\n',
            "invalid_method",
        ),
    ],
)
def test_invalid_input_fails(client: httpx.Client, content: bytes, code: str) -> None:
    file_id = upload(client, content)["id"]
    batch = wait_for(client, create_batch(client, file_id)["id"], TERMINAL)
    assert batch["status"] == "failed"
    assert batch["failed_at"].isdigit()
    assert batch["errors"]["object"] == "list"
    first = batch["errors"]["data"][0]
    assert set(first) == {"code", "message", "param", "line"}
    assert first["code"] == code
    assert "output_file_id" not in batch


def test_create_batch_validation(client: httpx.Client) -> None:
    file_id = upload(client, make_lines(1))["id"]
    base = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert client.post("/batches", json={**base, "endpoint": "/v1/embeddings"}).status_code == 400
    assert client.post("/batches", json={**base, "completion_window": "5d"}).status_code == 400
    for window in ("48h", "72h", "1h", "12h", "asap"):
        assert client.post("/batches", json={**base, "completion_window": window}).status_code == 200
    resp = client.post("/batches", json={**base, "input_file_id": "0" * 24})
    assert resp.status_code == 404
    assert resp.json()["errorCode"] == -1
    assert client.post("/batches", json={**base, "metadata": "x"}).status_code == 400
    assert client.post("/batches", json={**base, "metadata": None}).json()["metadata"] is None
    assert client.get("/batches/%s" % ("f" * 24)).status_code == 404


def test_expired_via_speedup(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.speedup = 3600 / 0.6  # "1h" lasts 0.6 s
    server.emulator.config.requests_per_second = 20
    file_id = upload(client, make_lines(200))["id"]
    batch = wait_for(client, create_batch(client, file_id, window="1h")["id"], TERMINAL)
    assert batch["status"] == "expired"
    assert batch["expired_at"].isdigit()
    done = batch["request_counts"]["completed"]
    assert 0 < done < 200
    assert len(jsonl(client, batch["output_file_id"])) == done


def test_stick_batch_then_expire(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.speedup = 3600 / 0.4
    server.emulator.faults.stick_batch("*", "validating")
    file_id = upload(client, make_lines(2))["id"]
    batch_id = create_batch(client, file_id, window="1h")["id"]
    time.sleep(0.2)
    assert client.get(f"/batches/{batch_id}").json()["status"] == "validating"
    batch = wait_for(client, batch_id, TERMINAL)
    assert batch["status"] == "expired"
    assert "output_file_id" not in batch


def test_cancel_keeps_partial_output(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.requests_per_second = 40
    file_id = upload(client, make_lines(400))["id"]
    batch_id = create_batch(client, file_id)["id"]
    deadline = time.monotonic() + 5
    while client.get(f"/batches/{batch_id}").json()["request_counts"]["completed"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    resp = client.post(f"/batches/{batch_id}/cancel", json={})
    assert resp.status_code == 200
    assert resp.json()["status"] == "cancelling"
    assert resp.json()["cancelling_at"].isdigit()
    assert "cancelled_at" not in resp.json()
    batch = wait_for(client, batch_id, TERMINAL)
    assert batch["status"] == "cancelled"
    assert batch["cancelled_at"].isdigit()
    done = batch["request_counts"]["completed"]
    assert 3 <= done < 400
    assert len(jsonl(client, batch["output_file_id"])) == done
    assert server.emulator.counters["cancels"] == 1
    # cancelling a terminal batch is refused
    resp = client.post(f"/batches/{batch_id}/cancel", json={})
    assert resp.status_code == 400
    assert "cancelled" in resp.json()["error"]["message"]


def test_cancel_empty_json_body_quirk(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.stick_batch("*", "pre_schedule")
    file_id = upload(client, make_lines(1))["id"]
    batch_id = create_batch(client, file_id)["id"]
    resp = client.post(f"/batches/{batch_id}/cancel", headers={"Content-Type": "application/json"})
    assert resp.status_code == 500
    assert resp.json() == {"message": "Unexpected end of JSON input", "errorCode": -1}
    assert client.get(f"/batches/{batch_id}").json()["status"] == "pre_schedule"
    resp = client.post(f"/batches/{batch_id}/cancel")  # no content type, empty body
    assert resp.status_code == 200
    assert resp.json()["status"] == "cancelling"
    assert client.post(f"/batches/{batch_id}/cancel", json={}).json()["status"] == "cancelling"
    oai = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    assert oai.batches.cancel(batch_id, extra_body={}).status == "cancelling"
    assert wait_for(client, batch_id, TERMINAL)["status"] == "cancelled"


def test_list_pagination(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.stick_batch("*", "pre_schedule")
    file_id = upload(client, make_lines(1))["id"]
    ids = [create_batch(client, file_id)["id"] for _ in range(5)]
    newest_first = list(reversed(ids))
    assert server.emulator.list_batch_ids() == newest_first
    page = client.get("/batches", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == newest_first[:2]
    assert page["has_more"] is True
    assert page["first_id"] == newest_first[0]
    assert page["last_id"] == newest_first[1]
    assert page["page_count"] == -1
    assert page["items_per_page"] == 9223372036854775807
    assert page["count"] == 2
    collected = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["after"] = after
        page = client.get("/batches", params=params).json()
        collected += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert collected == newest_first
    assert [b["id"] for b in client.get("/batches").json()["data"]] == newest_first
    for bad in (0, 101, "x"):
        assert client.get("/batches", params={"limit": bad}).status_code == 400
    assert client.get("/batches", params={"status": "completed"}).json()["data"] == []
    oai = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    assert [b.id for b in oai.batches.list(limit=2)] == newest_first  # SDK auto-pagination


# --------------------------------------------------------------------------- faults
def test_fault_times_then_success_with_retry_after(server: EmulatorServer, client: httpx.Client) -> None:
    rule = server.emulator.faults.add("GET /v1/batches", status=503, times=2, retry_after=1)
    for _ in range(2):
        resp = client.get("/batches")
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["errorCode"] == -1
    assert client.get("/batches").status_code == 200
    assert rule.fired == 2
    assert rule.exhausted
    assert server.emulator.counters["GET /v1/batches"] == 3


def test_fault_on_templated_route_and_429(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.add("GET /v1/files/{file_id}", status=429, times=1)
    file_id = upload(client, b"x\n")["id"]
    resp = client.get(f"/files/{file_id}")
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert client.get(f"/files/{file_id}").status_code == 200
    assert client.get("/files").status_code == 200


def test_fault_drop_connection(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.add("GET /v1/models", drop_connection=True, times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/models")
    assert client.get("/models").status_code == 200
    server.emulator.faults.add("GET /v1/models", drop_connection=True, times=1)
    oai = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        oai.models.list()


BATCH_BODY = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}


def _batch_ids(client: httpx.Client) -> list[str]:
    return [b["id"] for b in client.get("/batches").json()["data"]]


def test_fault_after_commit_status_creates_batch(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.stick_batch("*", "pre_schedule")
    file_id = upload(client, make_lines(1))["id"]
    rule = server.emulator.faults.add(
        "POST /v1/batches", status=503, times=1, retry_after=2, after_commit=True
    )
    resp = client.post("/batches", json={"input_file_id": file_id, **BATCH_BODY})
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "2"
    assert resp.json() == {
        "message": "Service Unavailable (injected by the kluster emulator)",
        "errorCode": -1,
    }
    # the server did the work although the client got an error
    [lost_id] = _batch_ids(client)
    assert client.get(f"/batches/{lost_id}").json()["input_file_id"] == file_id
    assert server.emulator.counters["batches_created"] == 1
    assert rule.fired == 1
    assert rule.exhausted
    # times=1: the next request is answered normally
    again = create_batch(client, file_id)
    assert again["id"] != lost_id
    assert sorted(_batch_ids(client)) == sorted([lost_id, again["id"]])
    assert server.emulator.counters["batches_created"] == 2
    assert server.emulator.counters["POST /v1/batches"] == 2
    assert rule.fired == 1


def test_fault_after_commit_429_and_malformed(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.stick_batch("*", "pre_schedule")
    file_id = upload(client, make_lines(1))["id"]
    server.emulator.faults.add(
        "POST /v1/batches", status=429, times=1, message="slow down", after_commit=True
    )
    resp = client.post("/batches", json={"input_file_id": file_id, **BATCH_BODY})
    assert resp.status_code == 429
    assert resp.json() == {
        "error": {"message": "slow down", "errorCode": 4290, "type": "rate_limit_error"},
    }
    assert len(_batch_ids(client)) == 1
    server.emulator.faults.add("POST /v1/batches", malformed_body=True, times=1, after_commit=True)
    resp = client.post("/batches", json={"input_file_id": file_id, **BATCH_BODY})
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        resp.json()
    assert len(_batch_ids(client)) == 2


def test_fault_after_commit_drop_creates_batch(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.stick_batch("*", "pre_schedule")
    file_id = upload(client, make_lines(1))["id"]
    rule = server.emulator.faults.add("POST /v1/batches", drop_connection=True, times=1, after_commit=True)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        client.post("/batches", json={"input_file_id": file_id, **BATCH_BODY})
    [lost_id] = _batch_ids(client)
    assert server.emulator.counters["batches_created"] == 1
    assert rule.fired == 1
    assert create_batch(client, file_id)["id"] != lost_id  # times=1: back to normal
    assert len(_batch_ids(client)) == 2
    # on the wire: the request is fully handled, then the TCP connection closes with not one byte sent
    server.emulator.faults.add("POST /v1/batches", drop_connection=True, times=1, after_commit=True)
    body = json.dumps({"input_file_id": file_id, **BATCH_BODY}).encode()
    request = (
        b"POST /v1/batches HTTP/1.1\r\nHost: emulator\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received == b""
    assert len(_batch_ids(client)) == 3


def test_fault_after_commit_duplicates_batch_on_sdk_retry(server: EmulatorServer) -> None:
    """The motivating case: a retried create whose first answer was lost makes two (paid) batches."""
    server.emulator.faults.stick_batch("*", "pre_schedule")
    file_id = server.emulator.add_file(make_lines(1))
    server.emulator.faults.add("POST /v1/batches", status=503, times=1, retry_after=0.01, after_commit=True)
    oai = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=1)
    batch = oai.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    ids = server.emulator.list_batch_ids()
    assert len(ids) == 2
    assert batch.id in ids
    assert server.emulator.counters["batches_created"] == 2


@pytest.mark.parametrize(
    ("fault", "error"),
    [({"status": 503}, None), ({"drop_connection": True}, httpx.RemoteProtocolError)],
    ids=["status", "drop"],
)
def test_fault_after_commit_file_upload(
    server: EmulatorServer, client: httpx.Client, fault: dict[str, Any], error: type[Exception] | None
) -> None:
    content = make_lines(3)
    rule = server.emulator.faults.add("POST /v1/files", times=1, after_commit=True, **fault)

    def post() -> httpx.Response:
        return client.post("/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})

    if error is None:
        resp = post()
        assert resp.status_code == 503
        assert resp.json()["errorCode"] == -1
    else:
        with pytest.raises(error):
            post()
    [stored] = client.get("/files").json()["data"]
    assert stored["bytes"] == len(content)
    assert client.get("/files/{}/content".format(stored["id"])).content == content
    assert server.emulator.counters["files_uploaded"] == 1
    assert rule.fired == 1
    second = upload(client, content)  # times=1: normal again
    assert second["id"] != stored["id"]
    assert len(client.get("/files").json()["data"]) == 2
    assert server.emulator.counters["files_uploaded"] == 2


@pytest.mark.parametrize(
    "fault",
    [{"status": 503}, {"status": 429}, {"drop_connection": True}, {"malformed_body": True}],
    ids=["503", "429", "drop", "malformed"],
)
def test_fault_without_after_commit_does_nothing(
    server: EmulatorServer, client: httpx.Client, fault: dict[str, Any]
) -> None:
    file_id = server.emulator.add_file(make_lines(1))
    rules = [
        server.emulator.faults.add("POST /v1/batches", times=1, **fault),
        server.emulator.faults.add("POST /v1/files", times=1, **fault),
    ]
    assert not any(r.after_commit for r in rules)
    requests = [
        lambda: client.post("/batches", json={"input_file_id": file_id, **BATCH_BODY}),
        lambda: client.post("/files", files={"file": ("x.jsonl", b"x\n")}, data={"purpose": "batch"}),
    ]
    for send in requests:
        if fault.get("drop_connection"):
            # dropped before the request body is read: the close may come as EOF or as a reset (RST)
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
                send()
        else:
            assert send().status_code == fault.get("status", 200)
    assert server.emulator.list_batch_ids() == []
    assert [f["id"] for f in client.get("/files").json()["data"]] == [file_id]
    counters = server.emulator.counters
    assert "batches_created" not in counters
    assert "files_uploaded" not in counters
    assert [r.fired for r in rules] == [1, 1]


def test_after_commit_rule_api_and_round_trip(server: EmulatorServer, client: httpx.Client) -> None:
    for spec in (
        "POST /v1/batches:times=1:status=503:after_commit",
        "POST /v1/batches:times=1:status=503:after_commit=1",
        "POST /v1/batches:times=1:status=503:after-commit=true",
    ):
        assert parse_fault_spec(spec) == {
            "route": "POST /v1/batches",
            "times": 1,
            "status": 503,
            "after_commit": True,
        }
    assert parse_fault_spec("POST /v1/files:drop:after_commit=0") == {
        "route": "POST /v1/files",
        "drop_connection": True,
        "after_commit": False,
    }
    faults = server.emulator.faults
    rule = faults.add_spec("POST /v1/files:drop:after_commit:times=2")
    assert rule.after_commit is True
    assert rule.drop_connection is True
    data = rule.to_dict()
    assert data["after_commit"] is True
    again = rule_from_dict(data)
    assert again.after_commit is True
    assert again.to_dict() == {**data, "id": 0}
    assert faults.add("GET /v1/models", status=500).to_dict()["after_commit"] is False
    with pytest.raises(ValueError, match="after_commit needs"):
        faults.add("POST /v1/batches", latency=0.1, after_commit=True)
    with pytest.raises(ValueError, match="after_commit must be"):
        FaultRule("POST /v1/batches", status=503, after_commit="yes")  # type: ignore[arg-type]
    assert FaultInjector().add(after_commit=True, status=503).after_commit is True
    # over HTTP: PUT /_emulator/faults accepts the field and GET shows it
    faults.clear()
    admin = httpx.Client(base_url=server.root_url, timeout=10)
    try:
        resp = admin.put(
            "/_emulator/faults",
            json={"route": "POST /v1/batches", "status": 502, "times": 1, "after_commit": True},
        )
        assert resp.status_code == 200
        assert [r["after_commit"] for r in resp.json()["rules"]] == [True]
        bad = {"route": "POST /v1/batches", "status": 502, "after_commit": "yes"}
        assert admin.put("/_emulator/faults", json=bad).status_code == 400
        bad = {"route": "POST /v1/batches", "after_commit": True}
        assert admin.put("/_emulator/faults", json=bad).status_code == 400
        faults.stick_batch("*", "pre_schedule")
        file_id = server.emulator.add_file(make_lines(1))
        resp = client.post("/batches", json={"input_file_id": file_id, **BATCH_BODY})
        assert resp.status_code == 502
        assert len(server.emulator.list_batch_ids()) == 1
        [listed] = admin.get("/_emulator/faults").json()["rules"]
        assert listed["after_commit"] is True
        assert listed["fired"] == 1
        assert listed["exhausted"] is True
        document = {"rules": [{"route": "POST /v1/files", "drop_connection": True, "after_commit": True}]}
        resp = admin.put("/_emulator/faults", json=document)
        assert [(r["route"], r["after_commit"]) for r in resp.json()["rules"]] == [("POST /v1/files", True)]
    finally:
        admin.close()


def test_fault_malformed_body_and_latency(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.add("GET /v1/models", malformed_body=True, times=1)
    resp = client.get("/models")
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        resp.json()
    server.emulator.faults.add("GET /v1/models", latency=0.3, times=1)
    start = time.monotonic()
    assert client.get("/models").status_code == 200
    assert time.monotonic() - start >= 0.3


def test_fault_rate_is_deterministic() -> None:
    def pattern() -> list[bool]:
        emu = KlusterEmulator(seed=7)
        try:
            emu.faults.add("*", status=500, rate=0.5)
            return [emu.faults.pick("GET", "GET /v1/models", "/v1/models") is not None for _ in range(40)]
        finally:
            emu.close()

    first = pattern()
    assert first == pattern()
    assert 5 < sum(first) < 35


def test_fault_spec_parsing() -> None:
    assert parse_fault_spec("POST /v1/batches:rate=0.5:status=503") == {
        "route": "POST /v1/batches",
        "rate": 0.5,
        "status": 503,
    }
    assert parse_fault_spec("GET /v1/files/{id}/content:times=1:drop:retry_after=2") == {
        "route": "GET /v1/files/{id}/content",
        "times": 1,
        "drop_connection": True,
        "retry_after": 2.0,
    }
    with pytest.raises(ValueError, match="unknown fault option"):
        parse_fault_spec("GET /v1/models:bogus=1")


def test_fail_share(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.faults.fail_share = 0.5
    file_id = upload(client, make_lines(40))["id"]
    batch = wait_for(client, create_batch(client, file_id)["id"], TERMINAL)
    assert batch["status"] == "completed"
    counts = batch["request_counts"]
    assert counts["total"] == 40
    assert counts["completed"] + counts["failed"] == 40
    assert 5 < counts["failed"] < 35
    errors = jsonl(client, batch["error_file_id"])
    assert len(errors) == counts["failed"]
    assert all(e["response"]["status_code"] == 500 for e in errors)


def test_admin_endpoints(server: EmulatorServer, client: httpx.Client) -> None:
    admin = httpx.Client(base_url=server.root_url, timeout=10)
    resp = admin.put("/_emulator/faults", json={"route": "GET /v1/models", "status": 502, "times": 1})
    assert resp.status_code == 200
    assert len(resp.json()["rules"]) == 1
    assert client.get("/models").status_code == 502
    resp = admin.put(
        "/_emulator/faults",
        json={
            "rules": [{"route": "GET /v1/files", "status": 503, "times": 1}],
            "fail_share": 0.0,
            "stuck": {"*": "pre_schedule"},
        },
    )
    assert [r["route"] for r in resp.json()["rules"]] == ["GET /v1/files"]
    assert admin.put("/_emulator/faults", json={"route": "GET /v1/x", "bogus": 1}).status_code == 400
    assert client.get("/files").status_code == 503
    file_id = upload(client, make_lines(2))["id"]
    batch_id = create_batch(client, file_id)["id"]
    assert admin.get(f"/_emulator/batches/{batch_id}").json()["status"] == "pre_schedule"
    forced = admin.post(f"/_emulator/batches/{batch_id}/status", json={"status": "failed"})
    assert forced.status_code == 200
    assert forced.json()["status"] == "failed"
    assert client.get(f"/batches/{batch_id}").json()["status"] == "failed"
    counters = admin.get("/_emulator/counters").json()
    assert counters["GET /v1/models"] == 1
    assert counters["POST /v1/batches"] == 1
    assert admin.delete("/_emulator/faults").json()["rules"] == []
    assert admin.post("/_emulator/reset").json() == {"reset": True}
    assert client.get("/batches").json()["data"] == []
    admin.close()


def test_python_api_force_status_counters_reset(server: EmulatorServer, client: httpx.Client) -> None:
    emu = server.emulator
    emu.faults.stick_batch("*", "in_progress")
    emu.config.requests_per_second = 1000
    file_id = emu.add_file(make_lines(3))
    batch_id = create_batch(client, file_id)["id"]
    wait_for(client, batch_id, {"in_progress"})
    raw = emu.set_batch_status(batch_id, "completed")
    assert raw["status"] == "completed"
    assert "output_file_id" in raw
    assert emu.get_batch_raw(batch_id)["status"] == "completed"
    assert emu.list_batch_ids() == [batch_id]
    with pytest.raises(KeyError):
        emu.get_batch_raw("nope")
    counters = emu.counters
    assert counters["POST /v1/batches"] == 1
    assert counters["batches_created"] == 1
    assert counters["GET /v1/batches/{id}"] >= 1
    other = create_batch(client, file_id)["id"]
    client.get(f"/batches/{other}")
    assert emu.polls_of(batch_id) == counters["GET /v1/batches/{id}"]  # each batch's polls on their own
    assert emu.polls_of(other) == 1
    assert emu.polls_of("never-polled") == 0
    emu.reset()
    assert emu.counters == {}
    assert emu.polls_of(batch_id) == 0
    assert emu.list_batch_ids() == []
    assert emu.faults.rules == []
    assert client.get("/files").json()["data"] == []


# --------------------------------------------------------------------------- server / CLI
def test_server_context_manager_and_stop_is_quick(tmp_path: Path) -> None:
    start = time.monotonic()
    with EmulatorServer(api_key="other", data_dir=str(tmp_path)) as srv:
        assert srv.port > 0
        with httpx.Client() as c:  # keep-alive connection open during stop
            assert (
                c.get(srv.base_url + "/models", headers={"Authorization": "Bearer other"}).status_code == 200
            )
            srv.stop()
    assert time.monotonic() - start < 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.base_url + "/models")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_subprocess() -> None:
    port = _free_port()
    env = dict(os.environ, KLUSTER_EMULATOR_API_KEY="cli-key")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_kluster.emulator",
            "--port",
            str(port),
            "--fault",
            "GET /v1/batches:times=1:status=503",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                resp = httpx.get(
                    f"http://127.0.0.1:{port}/v1/models",
                    headers={"Authorization": "Bearer cli-key"},
                    timeout=2,
                )
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert resp.status_code == 200
        assert resp.json()["data"]
        batches = f"http://127.0.0.1:{port}/v1/batches"
        assert httpx.get(batches, headers={"Authorization": "Bearer cli-key"}).status_code == 503
        assert httpx.get(batches, headers={"Authorization": "Bearer cli-key"}).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_upstream_forwarding(server: EmulatorServer, client: httpx.Client) -> None:
    with EmulatorServer(api_key="upstream-key") as upstream:
        server.emulator.config.upstream_url = upstream.base_url
        server.emulator.config.upstream_api_key = "upstream-key"
        file_id = upload(client, make_lines(3))["id"]
        batch = wait_for(client, create_batch(client, file_id)["id"], TERMINAL)
        assert batch["status"] == "completed"
        assert batch["request_counts"]["completed"] == 3
        assert upstream.emulator.counters["POST /v1/chat/completions"] == 3
        lines = jsonl(client, batch["output_file_id"])
        assert all(line["response"]["body"]["object"] == "chat.completion" for line in lines)
