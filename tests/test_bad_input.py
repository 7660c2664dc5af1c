"""Malformed input of every kind: one clear error each, before anything is uploaded or created."""

from __future__ import annotations

import json
import re

import pytest

from airflow_provider_kluster.exceptions import (
    KlusterAuthError,
    KlusterConfigError,
    KlusterRequestFileError,
)
from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator
from tests.conftest import conn_json
from tests.helpers import MODEL, make_context

try:
    from airflow.sdk.exceptions import AirflowNotFoundException
except ImportError:  # Airflow 3.1: the connection lookup raises the core class
    from airflow.exceptions import AirflowNotFoundException

GOOD = {
    "custom_id": "a",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
}


def line(**changes) -> str:
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        target, _, field = key.rpartition("__")
        holder = data["body"] if target == "body" else data
        name = field or key
        if value is None:
            holder.pop(name, None)
        else:
            holder[name] = value
    return json.dumps(data)


FILES = {
    "invalid-json": ("{not json\n", "line 1"),
    "not-an-object": ("[1, 2]\n", "line 1"),
    "missing-custom-id": (line(custom_id=None) + "\n", "custom_id"),
    "duplicate-custom-id": (line() + "\n" + line() + "\n", "duplicate custom_id"),
    "method-not-post": (line(method="GET") + "\n", "method"),
    "wrong-url": (line(url="/v1/embeddings") + "\n", "/v1/chat/completions"),
    "missing-model": (line(body__model=None) + "\n", "model"),
    "missing-messages": (line(body__messages=None) + "\n", "messages"),
    "empty-messages": (line(body__messages=[]) + "\n", "messages"),
    "empty-file": ("", "no requests"),
    "blank-line": (line() + "\n\n" + line(custom_id="b") + "\n", "line 2"),
    "unsupported-param": (line(body__n=2) + "\n", "not supported"),
    "stream-true": (line(body__stream=True) + "\n", "stream"),
    "unknown-model": (line(body__model="nobody/no-model") + "\n", "nobody/no-model"),
}


@pytest.fixture
def no_calls(emulator):
    yield
    counters = emulator.emulator.counters
    assert counters.get("POST /v1/files", 0) == 0, "something was uploaded"
    assert counters.get("POST /v1/batches", 0) == 0, "a batch was created"


def submit(**kwargs) -> None:
    KlusterSubmitBatchOperator(task_id="submit", **kwargs).execute(make_context())


@pytest.mark.parametrize(("content", "fragment"), FILES.values(), ids=FILES.keys())
def test_malformed_request_file(kluster_conn, no_calls, tmp_path, content, fragment):
    path = tmp_path / "requests.jsonl"
    path.write_text(content)
    with pytest.raises(KlusterRequestFileError, match="nothing was uploaded") as info:
        submit(input_file=str(path))
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_non_utf8_file(kluster_conn, no_calls, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(line().encode() + b"\n" + line(custom_id="b").encode().replace(b"hi", b"h\xff") + b"\n")
    with pytest.raises(KlusterRequestFileError, match="line 2") as info:
        submit(input_file=str(path))
    assert "UTF-8" in str(info.value)


def test_more_requests_than_the_plan_allows(kluster_conn, no_calls, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(line(custom_id=f"r{i}") + "\n" for i in range(5)))
    with pytest.raises(KlusterRequestFileError, match="(?i)shard") as info:
        submit(input_file=str(path), max_requests=2)
    assert "max_requests" in str(info.value)


def test_missing_file(kluster_conn, no_calls, tmp_path):
    with pytest.raises(KlusterRequestFileError, match="does not exist"):
        submit(input_file=str(tmp_path / "nope.jsonl"))


PARAMETERS = {
    "requests-not-a-list": (
        {"requests": "What is 2+2?", "model": MODEL},
        KlusterConfigError,
        "must be a list",
    ),
    "request-item-not-usable": ({"requests": [42], "model": MODEL}, KlusterRequestFileError, "item 0"),
    "prompt-without-model": ({"requests": ["hi"]}, KlusterRequestFileError, "model="),
    "unknown-completion-window": (
        {"requests": ["hi"], "model": MODEL, "completion_window": "2h"},
        KlusterConfigError,
        "24h, 48h, 72h",
    ),
    "no-input": ({}, KlusterConfigError, "exactly one of"),
    "two-inputs": (
        {"requests": ["hi"], "input_file_id": "f", "model": MODEL},
        KlusterConfigError,
        "exactly one of",
    ),
    "unknown-kluster-option": (
        {"requests": ["hi"], "model": MODEL, "kluster_options": {"turbo": True}},
        KlusterConfigError,
        "turbo",
    ),
    "bad-on-changed-input": (
        {"requests": ["hi"], "model": MODEL, "on_changed_input": "ignore"},
        KlusterConfigError,
        "on_changed_input",
    ),
}


@pytest.mark.parametrize(("kwargs", "error", "fragment"), PARAMETERS.values(), ids=PARAMETERS.keys())
def test_bad_parameters(kluster_conn, no_calls, kwargs, error, fragment):
    """Each bad argument raises its own class (a config mistake vs. unusable request items), naming the problem."""
    with pytest.raises(error, match=re.escape(fragment)) as info:
        submit(**kwargs)
    assert type(info.value) is error


def test_missing_connection(emulator, no_calls):
    with pytest.raises(AirflowNotFoundException, match="The conn_id `no_such_conn` isn't defined"):
        submit(requests=["hi"], model=MODEL, kluster_conn_id="no_such_conn")


def test_connection_without_a_key(emulator, no_calls, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOKEY", json.dumps({"conn_type": "kluster", "host": emulator.base_url}))
    with pytest.raises(KlusterConfigError, match="no API key"):
        submit(requests=["hi"], model=MODEL, kluster_conn_id="nokey")


def test_wrong_key_fails_before_any_upload(emulator, no_calls, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_BADKEY", conn_json(emulator.base_url, api_key="kl-wrong-000000000"))
    with pytest.raises(KlusterAuthError, match="401") as info:
        submit(requests=["hi"], model=MODEL, kluster_conn_id="badkey")
    assert "kl-wrong-000000000" not in str(info.value)
