"""Emulator support for large jobs (issue 10): multipart uploads, extended models with pricing, per-request
transient and lost failures, stalled batches, and their CLI flags. Everything over real loopback HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from airflow_provider_kluster.emulator import EmulatorServer, FaultInjector
from airflow_provider_kluster.emulator.__main__ import build_parser, emulator_from_args, main
from airflow_provider_kluster.emulator.faults import LOST, RATE_LIMITED, SERVER_ERROR

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
# Required fields of an extended model object, from the `/v1/models` response schema of kluster's published
# OpenAPI file (mid-2025; see tests/fixtures/kluster/README.md for where the reference material comes from).
EXTENDED_REQUIRED = {
    "id",
    "internal_model_id",
    "object",
    "created",
    "owned_by",
    "reasoning_model",
    "tools_supported",
    "name",
    "description",
    "context_length",
    "output_length",
    "model_type",
    "model_purpose",
    "status",
    "deleted",
    "tags",
    "up_votes",
    "default",
}
WINDOWS = ("asap", "24h", "48h", "72h")


@pytest.fixture
def server(kluster_emulator: EmulatorServer) -> EmulatorServer:
    return kluster_emulator


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=30
    ) as c:
        yield c


@pytest.fixture
def admin(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root_url, timeout=10) as c:
        yield c


def make_lines(ids: list[str], model: str = MODEL) -> bytes:
    return "".join(
        json.dumps(
            {
                "custom_id": cid,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"Question {cid}?"}]},
            }
        )
        + "\n"
        for cid in ids
    ).encode()


def submit(client: httpx.Client, ids: list[str]) -> str:
    up = client.post("/files", files={"file": ("in.jsonl", make_lines(ids))}, data={"purpose": "batch"})
    assert up.status_code == 200, up.text
    resp = client.post(
        "/batches",
        json={
            "input_file_id": up.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def wait(client: httpx.Client, batch_id: str, until: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.get(f"/batches/{batch_id}").json()
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch['status']}"
        time.sleep(0.02)


def finished(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    return wait(client, batch_id, lambda b: b["status"] in {"completed", "failed", "expired", "cancelled"})


def lines_of(client: httpx.Client, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    resp = client.get(f"/files/{file_id}/content")
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.content.splitlines() if line.strip()]


def create_upload(client: httpx.Client, size: int, **extra: Any) -> dict[str, Any]:
    body = {"bytes": size, "filename": "big.jsonl", "mime_type": "text/jsonl", "purpose": "batch", **extra}
    resp = client.post("/uploads", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def add_part(client: httpx.Client, upload_id: str, data: bytes) -> httpx.Response:
    return client.post(f"/uploads/{upload_id}/parts", files={"data": ("part", data)})


# -- /v1/uploads ------------------------------------------------------------------------------------------


def test_upload_round_trip_in_part_id_order(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.max_file_bytes = 1000  # the /v1/files limit does not apply to uploads
    chunks = [os.urandom(1500), os.urandom(700), os.urandom(1)]
    upload = create_upload(client, sum(map(len, chunks)))
    assert upload["id"].startswith("upload_")
    assert upload["object"] == "upload"
    assert upload["status"] == "pending"
    assert upload["bytes"] == 2201
    assert upload["expires_at"] - upload["created_at"] == 3600
    assert "file" not in upload
    # send the parts in another order than the file's: complete's part_ids order decides
    part_ids = {}
    for index in (2, 0, 1):
        resp = add_part(client, upload["id"], chunks[index])
        assert resp.status_code == 200, resp.text
        part = resp.json()
        assert part["object"] == "upload.part"
        assert part["upload_id"] == upload["id"]
        assert part["id"].startswith("part_")
        assert isinstance(part["created_at"], int)
        part_ids[index] = part["id"]
    content = b"".join(chunks)
    resp = client.post(
        f"/uploads/{upload['id']}/complete",
        json={"part_ids": [part_ids[0], part_ids[1], part_ids[2]], "md5": hashlib.md5(content).hexdigest()},
    )
    assert resp.status_code == 200, resp.text
    done = resp.json()
    assert done["status"] == "completed"
    assert done["file"]["object"] == "file"
    assert done["file"]["bytes"] == len(content)
    assert done["file"]["purpose"] == "batch"
    assert client.get(f"/files/{done['file']['id']}/content").content == content
    counters = server.emulator.counters
    assert counters["POST /v1/uploads"] == 1
    assert counters["POST /v1/uploads/{id}/parts"] == 3
    assert counters["POST /v1/uploads/{id}/complete"] == 1
    assert counters["uploads_completed"] == 1
    # a repeated complete (an answer lost on the way back) gives the same file, not a second one
    again = client.post(
        f"/uploads/{upload['id']}/complete", json={"part_ids": [part_ids[i] for i in (0, 1, 2)]}
    )
    assert again.status_code == 200
    assert again.json()["file"]["id"] == done["file"]["id"]
    assert len(server.emulator.list_files()) == 1
    other_order = client.post(
        f"/uploads/{upload['id']}/complete", json={"part_ids": [part_ids[i] for i in (2, 1, 0)]}
    )
    assert other_order.status_code == 400
    assert add_part(client, upload["id"], b"late").status_code == 400


def test_part_too_large_is_refused(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.max_part_bytes = 1024
    upload = create_upload(client, 4096)
    # just over the limit: found while streaming the part to disk
    resp = add_part(client, upload["id"], b"x" * 1025)
    assert resp.status_code == 400
    assert "too large" in resp.json()["error"]["message"]
    # far over it: refused from the Content-Length alone
    resp = add_part(client, upload["id"], b"x" * 200_000)
    assert resp.status_code == 400
    assert add_part(client, upload["id"], b"x" * 1024).status_code == 200
    assert len(server.emulator.get_upload(upload["id"]).parts) == 1  # type: ignore[union-attr]


def test_upload_larger_than_declared_limit_is_refused(server: EmulatorServer, client: httpx.Client) -> None:
    resp = client.post(
        "/uploads",
        json={"bytes": 8 * 1024**3 + 1, "filename": "a.jsonl", "mime_type": "text/jsonl", "purpose": "batch"},
    )
    assert resp.status_code == 400
    assert client.post("/uploads", json={"filename": "a.jsonl", "purpose": "batch"}).status_code == 400
    assert create_upload(client, 8 * 1024**3)["bytes"] == 8 * 1024**3  # 8 GB itself is fine


def test_complete_with_wrong_total_or_md5_is_refused(server: EmulatorServer, client: httpx.Client) -> None:
    upload = create_upload(client, 10)
    first = add_part(client, upload["id"], b"12345").json()["id"]
    resp = client.post(f"/uploads/{upload['id']}/complete", json={"part_ids": [first]})
    assert resp.status_code == 400
    assert "5 bytes" in resp.json()["error"]["message"]
    second = add_part(client, upload["id"], b"67890").json()["id"]
    assert (
        client.post(f"/uploads/{upload['id']}/complete", json={"part_ids": [first, first]}).status_code == 400
    )
    assert (
        client.post(f"/uploads/{upload['id']}/complete", json={"part_ids": [first, "part_nope"]}).status_code
        == 400
    )
    bad_md5 = client.post(
        f"/uploads/{upload['id']}/complete", json={"part_ids": [first, second], "md5": "0" * 32}
    )
    assert bad_md5.status_code == 400
    assert server.emulator.list_files() == []  # nothing was stored by the refused completes
    ok = client.post(f"/uploads/{upload['id']}/complete", json={"part_ids": [first, second]})
    assert ok.status_code == 200, ok.text
    assert client.get(f"/files/{ok.json()['file']['id']}/content").content == b"1234567890"


def test_expired_upload_is_refused(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.upload_ttl = 0.3
    upload = create_upload(client, 4)
    part = add_part(client, upload["id"], b"abcd").json()["id"]
    time.sleep(0.4)
    resp = client.post(f"/uploads/{upload['id']}/complete", json={"part_ids": [part]})
    assert resp.status_code == 400
    assert "expired" in resp.json()["error"]["message"]
    assert resp.json()["error"]["type"] == "expired"
    assert add_part(client, upload["id"], b"abcd").status_code == 400
    assert server.emulator.get_upload(upload["id"]).status == "expired"  # type: ignore[union-attr]
    assert server.emulator.list_files() == []
    # the speedup shortens the hour like completion windows
    server.emulator.config.upload_ttl = 3600
    server.emulator.config.speedup = 3600 / 0.2
    fast = create_upload(client, 1)
    time.sleep(0.3)
    assert add_part(client, fast["id"], b"a").status_code == 400


def test_cancel_upload(server: EmulatorServer, client: httpx.Client) -> None:
    upload = create_upload(client, 4)
    part = add_part(client, upload["id"], b"abcd").json()["id"]
    resp = client.post(f"/uploads/{upload['id']}/cancel")
    assert resp.status_code == 200
    assert resp.json()["status"] == "cancelled"
    assert client.post(f"/uploads/{upload['id']}/complete", json={"part_ids": [part]}).status_code == 400
    assert add_part(client, upload["id"], b"abcd").status_code == 400
    assert client.post("/uploads/upload_unknown/cancel").status_code == 404
    assert add_part(client, "upload_unknown", b"a").status_code == 404


# -- /v1/models?extended=true -----------------------------------------------------------------------------


def test_models_extended_has_pricing_for_every_model(server: EmulatorServer, client: httpx.Client) -> None:
    plain = client.get("/models").json()
    assert all(set(m) == {"id", "object", "created", "owned_by"} for m in plain["data"])
    assert client.get("/models", params={"extended": "false"}).json() == plain
    extended = client.get("/models", params={"extended": "true"}).json()
    assert extended["object"] == "list"
    assert [m["id"] for m in extended["data"]] == [m["id"] for m in plain["data"]] == server.emulator.models
    for model, base in zip(extended["data"], plain["data"], strict=True):
        assert EXTENDED_REQUIRED <= set(model), model["id"]
        assert {k: model[k] for k in base} == base
        pricing = model["pricing"]
        realtime = pricing["realtime"]
        assert 0 < realtime["input"] < realtime["output"] < 1e-4  # USD per token, output dearer
        windows = pricing["asynchronous"]
        assert set(windows) == set(WINDOWS)
        # longer windows are cheaper, every one cheaper than realtime
        inputs = [windows[w]["input"] for w in WINDOWS]
        assert inputs == sorted(inputs, reverse=True)
        assert inputs[0] < realtime["input"]
    llama = next(m for m in extended["data"] if m["id"] == MODEL)
    assert llama["pricing"]["realtime"]["input"] == pytest.approx(0.18e-6)
    assert sum(m["default"] for m in extended["data"]) == 1


def test_model_prices_are_configurable(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.prices[MODEL] = {
        "realtime": {"input": 2e-6},
        "asynchronous": {"24h": {"output": 1e-6}},
    }
    model = next(m for m in client.get("/models?extended=true").json()["data"] if m["id"] == MODEL)
    assert model["pricing"]["realtime"] == {"input": 2e-6, "output": pytest.approx(0.36e-6)}
    assert model["pricing"]["asynchronous"]["24h"]["output"] == 1e-6
    assert model["pricing"]["asynchronous"]["24h"]["input"] == pytest.approx(0.09e-6)
    server.emulator.reset()  # the in-place change is undone
    assert server.emulator.config.prices == {}


# -- per-request transient failures and lost requests -----------------------------------------------------


def test_transient_share_fails_once_then_succeeds(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.requests_per_second = 100_000
    faults = server.emulator.faults
    faults.transient_share = 0.1
    ids = [f"req-{i}" for i in range(2000)]
    batch = finished(client, submit(client, ids))
    assert batch["status"] == "completed"
    errors = lines_of(client, batch.get("error_file_id"))
    outputs = lines_of(client, batch.get("output_file_id"))
    failed = {line["custom_id"] for line in errors}
    assert 150 <= len(failed) <= 250  # about 10 %
    assert batch["request_counts"] == {"total": 2000, "completed": 2000 - len(failed), "failed": len(failed)}
    assert failed.isdisjoint(line["custom_id"] for line in outputs)
    # deterministic from seed + custom_id: exactly the ids the injector picks
    assert failed == {cid for cid in ids if faults.request_fate(cid, 1) is not None}
    statuses = {line["response"]["status_code"] for line in errors}
    assert statuses == {500, 429}
    for line in errors:
        code = line["response"]["body"]["error"]["code"]
        assert code == {500: "server_error", 429: "rate_limit_exceeded"}[line["response"]["status_code"]]
    # the same custom_ids, sent again in a new batch, all succeed
    retry = finished(client, submit(client, sorted(failed)))
    assert retry["request_counts"] == {"total": len(failed), "completed": len(failed), "failed": 0}
    assert {line["custom_id"] for line in lines_of(client, retry.get("output_file_id"))} == failed
    assert not retry.get("error_file_id")
    assert server.emulator.executions(sorted(failed)[0]) == 2
    assert server.emulator.executions("req-never-sent") == 0


def test_transient_repeats(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.requests_per_second = 100_000
    server.emulator.faults.transient_share = 0.3
    server.emulator.faults.transient_repeats = 2
    ids = [f"rep-{i}" for i in range(200)]
    failed = {
        line["custom_id"]
        for line in lines_of(client, finished(client, submit(client, ids)).get("error_file_id"))
    }
    assert failed
    second = finished(client, submit(client, sorted(failed)))
    assert second["request_counts"]["failed"] == len(failed)  # the second execution fails too
    third = finished(client, submit(client, sorted(failed)))
    assert third["request_counts"] == {"total": len(failed), "completed": len(failed), "failed": 0}


def test_lost_share_requests_never_come_back(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.requests_per_second = 100_000
    server.emulator.faults.lost_share = 0.05
    server.emulator.faults.fail_share = 0.05  # the existing random failures still work alongside
    ids = [f"lost-{i}" for i in range(1000)]
    batch = finished(client, submit(client, ids))
    assert batch["status"] == "completed"
    seen = [line["custom_id"] for line in lines_of(client, batch.get("output_file_id"))]
    seen += [line["custom_id"] for line in lines_of(client, batch.get("error_file_id"))]
    lost = set(ids) - set(seen)
    assert len(seen) == len(set(seen))
    assert 20 <= len(lost) <= 80
    assert lost == {cid for cid in ids if server.emulator.faults.request_fate(cid, 1) == LOST}
    counts = batch["request_counts"]
    assert counts["total"] == 1000
    assert counts["completed"] + counts["failed"] == 1000 - len(lost)
    assert counts["failed"] > 0
    assert server.emulator.get_batch(batch["id"]).lost == len(lost)  # type: ignore[union-attr]
    server.emulator.faults.fail_share = 0.0
    again = finished(client, submit(client, sorted(lost)))
    assert again["request_counts"] == {"total": len(lost), "completed": len(lost), "failed": 0}


def test_request_fate_is_deterministic_and_seeded() -> None:
    a, b, other = FaultInjector(seed=1), FaultInjector(seed=1), FaultInjector(seed=2)
    for f in (a, b, other):
        f.transient_share = 0.5
        f.lost_share = 0.1
    ids = [f"x-{i}" for i in range(400)]
    fates = [a.request_fate(cid, 1) for cid in ids]
    assert fates == [b.request_fate(cid, 1) for cid in ids]
    assert fates != [other.request_fate(cid, 1) for cid in ids]
    assert {LOST, SERVER_ERROR, RATE_LIMITED, None} == set(fates)
    assert all(a.request_fate(cid, 2) is None for cid in ids)  # repeats default to 1


# -- stalled batches --------------------------------------------------------------------------------------


def test_stalled_batch_stays_in_progress_until_cancelled(
    server: EmulatorServer, client: httpx.Client
) -> None:
    server.emulator.faults.stall_batch("next", after=30)
    batch_id = submit(client, [f"s-{i}" for i in range(200)])
    assert server.emulator.faults.to_dict()["stalled"] == {batch_id: 30}
    other = submit(client, ["free-1", "free-2"])  # "next" was claimed: this one runs through
    assert finished(client, other)["status"] == "completed"
    stalled = wait(client, batch_id, lambda b: b["request_counts"]["completed"] >= 30)
    time.sleep(0.5)
    later = client.get(f"/batches/{batch_id}").json()
    assert later["status"] == stalled["status"] == "in_progress"
    assert (
        later["request_counts"] == stalled["request_counts"] == {"total": 200, "completed": 30, "failed": 0}
    )
    resp = client.post(f"/batches/{batch_id}/cancel", json={})
    assert resp.json()["status"] == "cancelling"
    done = finished(client, batch_id)
    assert done["status"] == "cancelled"
    assert len(lines_of(client, done.get("output_file_id"))) == 30


def test_stall_after_every_batch_and_unstall(
    server: EmulatorServer, client: httpx.Client, admin: httpx.Client
) -> None:
    resp = admin.put("/_emulator/faults?replace=false", json={"stall_after": 5})
    assert resp.status_code == 200
    assert resp.json()["stall_after"] == 5
    batch_id = submit(client, [f"u-{i}" for i in range(20)])
    wait(client, batch_id, lambda b: b["request_counts"]["completed"] == 5)
    time.sleep(0.2)
    assert client.get(f"/batches/{batch_id}").json()["request_counts"]["completed"] == 5
    # a per-batch stall further on, then lift the global one: it runs on to the per-batch limit
    assert admin.put("/_emulator/faults?replace=false", json={"stalled": {batch_id: 12}}).status_code == 200
    assert admin.put("/_emulator/faults?replace=false", json={"stall_after": None}).status_code == 200
    wait(client, batch_id, lambda b: b["request_counts"]["completed"] == 12)
    server.emulator.faults.unstall_batch(batch_id)
    assert finished(client, batch_id)["request_counts"]["completed"] == 20


def test_stalled_batch_still_expires(server: EmulatorServer, client: httpx.Client) -> None:
    server.emulator.config.speedup = 86400 / 0.6  # 24h lasts 0.6 s
    server.emulator.faults.stall_batch("*", after=3)
    batch = finished(client, submit(client, [f"e-{i}" for i in range(10)]))
    assert batch["status"] == "expired"
    assert batch["request_counts"]["completed"] == 3


def test_admin_document_round_trip_and_validation(admin: httpx.Client) -> None:
    doc = {
        "transient_share": 0.2,
        "transient_repeats": 3,
        "lost_share": 0.01,
        "lost_repeats": 2,
        "stall_after": 7,
        "stalled": {"next": 4},
    }
    got = admin.put("/_emulator/faults", json=doc).json()
    assert {k: got[k] for k in doc} == doc
    for bad in (
        {"transient_share": 1.5},
        {"lost_repeats": -1},
        {"stalled": {"x": "many"}},
        {"stall_after": 1.5},
    ):
        assert admin.put("/_emulator/faults", json=bad).status_code == 400, bad
    cleared = admin.delete("/_emulator/faults").json()
    assert cleared["transient_share"] == 0.0
    assert cleared["stall_after"] is None
    assert cleared["stalled"] == {}


# -- command line -----------------------------------------------------------------------------------------


def test_cli_flags_reach_config_and_faults(tmp_path: Any) -> None:
    args = build_parser().parse_args(
        [
            "--data-dir",
            str(tmp_path),
            "--transient-share",
            "0.1",
            "--transient-repeats",
            "2",
            "--lost-share",
            "0.02",
            "--lost-repeats",
            "3",
            "--stall-after",
            "50",
            "--price",
            f"{MODEL}=0.5,1.5",
            "--max-part-bytes",
            "1048576",
            "--max-upload-bytes",
            "10485760",
            "--upload-ttl",
            "60",
            "--fail-share",
            "0.05",
        ]
    )
    emulator = emulator_from_args(args)
    try:
        faults = emulator.faults.to_dict()
        assert faults["transient_share"] == 0.1
        assert faults["transient_repeats"] == 2
        assert faults["lost_share"] == 0.02
        assert faults["lost_repeats"] == 3
        assert faults["stall_after"] == 50
        assert faults["fail_share"] == 0.05
        config = emulator.config
        assert (config.max_part_bytes, config.max_upload_bytes, config.upload_ttl) == (
            1048576,
            10485760,
            60.0,
        )
        assert config.prices[MODEL]["realtime"] == {"input": 5e-7, "output": 1.5e-6}
        assert config.prices[MODEL]["asynchronous"]["24h"] == {"input": 2.5e-7, "output": 7.5e-7}
    finally:
        emulator.close()
    defaults = emulator_from_args(build_parser().parse_args(["--data-dir", str(tmp_path)]))
    try:
        assert defaults.faults.to_dict()["stall_after"] is None
        assert defaults.config.max_part_bytes == 64 * 1024 * 1024
        assert defaults.config.prices == {}
    finally:
        defaults.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["--price", "no-equals-sign"],
        ["--price", f"{MODEL}=1"],
        ["--transient-share", "2"],
        ["--lost-repeats", "-1"],
    ],
)
def test_cli_rejects_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
