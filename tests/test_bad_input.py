"""Malformed input of every kind: one clear error each, before anything is uploaded or created."""

from __future__ import annotations

import datetime as dt
import json
import math
import re

import pytest

from airflow_provider_kluster.exceptions import (
    KlusterAuthError,
    KlusterConfigError,
    KlusterRequestFileError,
)
from airflow_provider_kluster.operators.kluster import (
    KlusterCancelBatchOperator,
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
    KlusterUploadFileOperator,
)
from airflow_provider_kluster.reattach import FINGERPRINT_KEY, IDENTITY_KEY
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
    # what kluster's request schema refuses, by line
    "message-without-role": (
        line(body__messages=[{"content": "hi"}]) + "\n",
        "line 1: body.messages[0] has no role",
    ),
    "message-with-unknown-role": (
        line(body__messages=[{"role": "bot", "content": "hi"}]) + "\n",
        "line 1: body.messages[0] role must be one of system, user, assistant, tool, function, got 'bot'",
    ),
    "message-without-content": (
        line(body__messages=[{"role": "user"}]) + "\n",
        "line 1: body.messages[0] has no content",
    ),
    "message-not-an-object": (
        line(body__messages=["hi"]) + "\n",
        "line 1: body.messages[0] must be an object",
    ),
    "duplicate-key": (
        line().replace('"method": "POST"', '"method": "POST", "method": "GET"') + "\n",
        "line 1: duplicate key 'method'",
    ),
    "nan": (
        line().replace('"model":', '"temperature": NaN, "model":') + "\n",
        "line 1: NaN is not valid JSON",
    ),
    "infinity": (line().replace('"model":', '"top_p": -Infinity, "model":') + "\n", "line 1: -Infinity"),
    "max-completion-tokens-negative": (
        line(body__max_completion_tokens=-1) + "\n",
        "line 1: body.max_completion_tokens must be a whole number of at least 1 (or null), got -1",
    ),
    "max-completion-tokens-a-string": (
        line(body__max_completion_tokens="1000") + "\n",
        "line 1: body.max_completion_tokens must be a whole number of at least 1 (or null), got '1000'",
    ),
    "max-tokens-zero": (line(body__max_tokens=0) + "\n", "line 1: body.max_tokens must be a whole number"),
    "temperature-a-string": (
        line(body__temperature="hot") + "\n",
        "line 1: body.temperature must be a number",
    ),
    "logprobs-a-string": (line(body__logprobs="true") + "\n", "line 1: body.logprobs must be a boolean"),
}


@pytest.fixture
def no_calls(emulator):
    yield
    counters = emulator.emulator.counters
    assert counters.get("POST /v1/files", 0) == 0, "something was uploaded"
    assert counters.get("POST /v1/batches", 0) == 0, "a batch was created"


@pytest.fixture
def nothing_sent(no_calls, emulator):
    """A bad parameter is refused before any call at all (not even the model list or a batch lookup)."""
    yield
    assert emulator.emulator.counters == {}, "a call reached kluster"


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
        "completion_window must be one of 24h, 48h, 72h, asap",
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
    # numbers
    **{
        f"{name}-{value!r}": ({"requests": ["hi"], "model": MODEL, name: value}, KlusterConfigError, fragment)
        for name, value, fragment in [
            ("max_completion_tokens", -5, "max_completion_tokens must be a whole number greater than 0"),
            ("max_completion_tokens", 0, "max_completion_tokens must be a whole number greater than 0"),
            ("max_completion_tokens", "100", "max_completion_tokens must be a whole number"),
            ("max_completion_tokens", True, "max_completion_tokens must be a whole number"),
            ("poll_interval", 0, "poll_interval must be a number of seconds greater than 0; got 0."),
            ("poll_interval", -1, "poll_interval must be a number of seconds greater than 0; got -1."),
            ("poll_interval", math.nan, "poll_interval must be a number of seconds greater than 0"),
            ("timeout", -5, "timeout must be a number of seconds (or a timedelta) greater than 0"),
            ("timeout", 0, "timeout must be a number of seconds (or a timedelta) greater than 0"),
            ("timeout", dt.timedelta(seconds=-1), "timeout must be a number of seconds"),
            ("timeout", "abc", "timeout must be a number of seconds"),  # refused in execute, not at parse
            ("timeout", True, "timeout must be a number of seconds"),
            ("max_consecutive_errors", -1, "max_consecutive_errors must be a whole number of at least 0"),
            ("max_requests", 0, "max_requests must be a whole number greater than 0"),
            ("reattach_scan_limit", 0, "reattach_scan_limit must be a whole number greater than 0"),
        ]
    },
    # switches: a string "false" would be read as true
    **{
        f"{name}-not-a-boolean": (
            {"requests": ["hi"], "model": MODEL, name: "false"},
            KlusterConfigError,
            f"{name} must be True or False; got the string 'false'.",
        )
        for name in ("wait_for_completion", "deferrable", "cancel_on_kill", "check_models", "reattach")
    },
    "kluster-option-a-string": (
        {"requests": ["hi"], "model": MODEL, "kluster_options": {"greedy": "false"}},
        KlusterConfigError,
        "kluster_options['greedy'] must be True or False; got the string 'false'.",
    ),
    "kluster-options-not-a-dict": (
        {"requests": ["hi"], "model": MODEL, "kluster_options": "greedy"},
        KlusterConfigError,
        "kluster_options must be a dict",
    ),
    # metadata, counted with the provider's own two keys
    "metadata-a-string": (
        {"requests": ["hi"], "model": MODEL, "metadata": "a=b"},
        KlusterConfigError,
        "metadata must be a dict of string keys to string values, or None; got the string 'a=b'.",
    ),
    "metadata-number-value": (
        {"requests": ["hi"], "model": MODEL, "metadata": {"run": 3}},
        KlusterConfigError,
        "metadata['run'] must be a string",
    ),
    "metadata-14-keys": (
        {"requests": ["hi"], "model": MODEL, "metadata": {f"k{i}": "v" for i in range(14)}},
        KlusterConfigError,
        "metadata would have 17 keys (14 in metadata + the provider's own airflow_task_identity, "
        "airflow_input_fingerprint, airflow_max_tries), over kluster.ai's limit of 16; remove 1.",
    ),
    "metadata-13-keys-and-options": (
        {
            "requests": ["hi"],
            "model": MODEL,
            "metadata": {f"k{i}": "v" for i in range(13)},
            "kluster_options": {"greedy": True},
        },
        KlusterConfigError,
        "metadata would have 17 keys (13 in metadata + '@kluster.ai' for kluster_options",
    ),
    "metadata-key-too-long": (
        {"requests": ["hi"], "model": MODEL, "metadata": {"k" * 65: "v"}},
        KlusterConfigError,
        "is 65 characters long; kluster.ai allows keys of at most 64",
    ),
    "metadata-value-too-long": (
        {"requests": ["hi"], "model": MODEL, "metadata": {"team": "v" * 513}},
        KlusterConfigError,
        "metadata['team'] is 513 characters long; kluster.ai allows values of at most 512",
    ),
    "metadata-provider-key": (
        {"requests": ["hi"], "model": MODEL, "metadata": {IDENTITY_KEY: "mine"}},
        KlusterConfigError,
        f"metadata key '{IDENTITY_KEY}' is set by the provider itself",
    ),
    # empty strings
    "input-file-empty": ({"input_file": ""}, KlusterConfigError, "input_file must be the path or URI"),
    "input-file-blank": ({"input_file": "  "}, KlusterConfigError, "input_file must be the path or URI"),
    "input-file-id-empty": (
        {"input_file_id": ""},
        KlusterConfigError,
        "input_file_id must be a non-empty string",
    ),
    "input-file-id-too-long": (
        {"input_file_id": "f" * 257},
        KlusterConfigError,
        "input_file_id must be a non-empty string of at most 256 characters",
    ),
    "model-empty": (
        {"requests": ["hi"], "model": ""},
        KlusterConfigError,
        "model must be a non-empty string",
    ),
    "completion-window-empty": (
        {"requests": ["hi"], "model": MODEL, "completion_window": ""},
        KlusterConfigError,
        "completion_window must be one of",
    ),
    # body defaults, refused by name before any line is written
    "body-defaults-a-string": (
        {"requests": ["hi"], "model": MODEL, "body_defaults": "temperature=0"},
        KlusterConfigError,
        "body_defaults must be a dict",
    ),
    "body-defaults-negative-max-tokens": (
        {"requests": ["hi"], "model": MODEL, "body_defaults": {"max_tokens": -1}},
        KlusterConfigError,
        "body_defaults['max_tokens'] must be a whole number of at least 1 (or None), got -1.",
    ),
    "body-defaults-unsupported": (
        {"requests": ["hi"], "model": MODEL, "body_defaults": {"n": 2}},
        KlusterConfigError,
        "body_defaults['n'] is a chat parameter kluster.ai batches do not support",
    ),
    # request items, refused by line before anything is sent
    "request-without-role": (
        {"requests": [{"messages": [{"content": "hi"}]}], "model": MODEL},
        KlusterRequestFileError,
        "line 1: body.messages[0] has no role",
    ),
    "request-with-nan": (
        {
            "requests": [{"messages": [{"role": "user", "content": "hi"}], "temperature": math.nan}],
            "model": MODEL,
        },
        KlusterRequestFileError,
        "line 1: holds NaN or Infinity",
    ),
    "request-with-a-date": (
        {
            "requests": [
                {"messages": [{"role": "user", "content": "hi"}], "metadata": {"d": dt.date(2025, 1, 1)}}
            ],
            "model": MODEL,
        },
        KlusterRequestFileError,
        "line 1: cannot be written as JSON",
    ),
    "request-max-tokens-a-string": (
        {"requests": [{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}], "model": MODEL},
        KlusterRequestFileError,
        "line 1: body.max_tokens must be a whole number of at least 1 (or null), got '5'",
    ),
}


@pytest.mark.parametrize(("kwargs", "error", "fragment"), PARAMETERS.values(), ids=PARAMETERS.keys())
def test_bad_parameters(kluster_conn, nothing_sent, kwargs, error, fragment):
    """Each bad argument raises its own class (a config mistake vs. unusable request items), naming the problem."""
    with pytest.raises(error, match=re.escape(fragment)) as info:
        submit(**kwargs)
    assert type(info.value) is error


def test_input_file_that_is_a_directory(kluster_conn, no_calls, tmp_path):
    with pytest.raises(
        KlusterRequestFileError, match="is a directory, not a JSONL file; nothing was uploaded"
    ):
        submit(input_file=str(tmp_path))


UPLOAD_PARAMETERS = {
    "input-file-empty": ({"input_file": ""}, "input_file must be the path or URI"),
    "max-completion-tokens-negative": (
        {"requests": ["hi"], "model": MODEL, "max_completion_tokens": -1},
        "max_completion_tokens must be a whole number greater than 0",
    ),
    "max-requests-a-string": ({"requests": ["hi"], "model": MODEL, "max_requests": "10"}, "max_requests"),
    "reattach-not-a-boolean": (
        {"requests": ["hi"], "model": MODEL, "reattach": "no"},
        "reattach must be True or False",
    ),
    "check-models-not-a-boolean": (
        {"requests": ["hi"], "model": MODEL, "check_models": 0},
        "check_models must be True or False",
    ),
    "body-defaults-bad-temperature": (
        {"requests": ["hi"], "model": MODEL, "body_defaults": {"temperature": "0.2"}},
        "body_defaults['temperature'] must be a number",
    ),
    "requests-not-a-list": ({"requests": "hi", "model": MODEL}, "requests must be a list"),
}


@pytest.mark.parametrize(("kwargs", "fragment"), UPLOAD_PARAMETERS.values(), ids=UPLOAD_PARAMETERS.keys())
def test_bad_upload_parameters(kluster_conn, nothing_sent, kwargs, fragment):
    with pytest.raises(KlusterConfigError, match=re.escape(fragment)) as info:
        KlusterUploadFileOperator(task_id="upload", **kwargs).execute(make_context())
    assert type(info.value) is KlusterConfigError


CANCEL_PARAMETERS = {
    "batch-id-empty": ({"batch_id": ""}, "batch_id is empty"),
    "poll-interval-zero": (
        {"batch_id": "b", "poll_interval": 0},
        "poll_interval must be a number of seconds",
    ),
    "timeout-negative": (
        {"batch_id": "b", "timeout": -1},
        "timeout must be a number of seconds greater than 0",
    ),
    "timeout-none": (
        {"batch_id": "b", "timeout": None},
        "timeout must be a number of seconds greater than 0",
    ),
    "wait-not-a-boolean": (
        {"batch_id": "b", "wait_for_cancellation": "yes"},
        "wait_for_cancellation must be True or False",
    ),
}


@pytest.mark.parametrize(("kwargs", "fragment"), CANCEL_PARAMETERS.values(), ids=CANCEL_PARAMETERS.keys())
def test_bad_cancel_parameters(kluster_conn, nothing_sent, kwargs, fragment):
    with pytest.raises(KlusterConfigError, match=re.escape(fragment)):
        KlusterCancelBatchOperator(task_id="cancel", **kwargs).execute(make_context())


RESULTS_PARAMETERS = {
    "batch-id-empty": ({"batch_id": ""}, "batch_id is empty"),
    "destination-empty": ({"destination": ""}, "destination must be a directory"),
    "max-failed-ratio-over-one": (
        {"max_failed_ratio": 1.5},
        "max_failed_ratio must be a number from 0.0 to 1.0",
    ),
    "return-records-negative": (
        {"return_records": -1},
        "return_records must be a whole number of at least 0",
    ),
    "allow-unfinished-not-a-boolean": (
        {"allow_unfinished": "true"},
        "allow_unfinished must be True or False",
    ),
}


@pytest.mark.parametrize(("kwargs", "fragment"), RESULTS_PARAMETERS.values(), ids=RESULTS_PARAMETERS.keys())
def test_bad_results_parameters(kluster_conn, nothing_sent, tmp_path, kwargs, fragment):
    kwargs = {"batch_id": "b", "destination": str(tmp_path), **kwargs}
    with pytest.raises(KlusterConfigError, match=re.escape(fragment)):
        KlusterGetBatchResultsOperator(task_id="results", **kwargs).execute(make_context())


# -- nothing kluster accepts is refused --------------------------------------------------------------------

ACCEPTED = {
    "completion-window-asap": ({"completion_window": "asap"}, {"completion_window": "asap"}),
    "16-metadata-keys-with-the-provider's": ({"metadata": {f"k{i}": "v" for i in range(13)}}, {}),
    "16-metadata-keys-with-options": (
        {"metadata": {f"k{i}": "v" for i in range(12)}, "kluster_options": {"greedy": False}},
        {},
    ),
    "longest-metadata-key-and-value": ({"metadata": {"k" * 64: "v" * 512}}, {}),
    "option-false-stays-false": (
        {"kluster_options": {"greedy": False, "strict_completion_window": True}},
        {"options": {"greedy": False, "strict_completion_window": True}},
    ),
    "no-tolerated-poll-errors": ({"max_consecutive_errors": 0}, {}),
    "one-token": ({"max_completion_tokens": 1}, {}),
}


@pytest.mark.parametrize(("kwargs", "expected"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_what_kluster_accepts_is_sent(kluster_conn, emulator, kwargs, expected):
    batch_id = KlusterSubmitBatchOperator(task_id="submit", requests=["hi"], model=MODEL, **kwargs).execute(
        make_context()
    )
    raw = emulator.emulator.get_batch_raw(batch_id)
    assert raw["completion_window"] == expected.get("completion_window", "24h")
    metadata = raw["metadata"]
    assert len(metadata) <= 16
    assert {IDENTITY_KEY, FINGERPRINT_KEY} <= set(metadata)
    for key, value in kwargs.get("metadata", {}).items():
        assert metadata[key] == value
    if "options" in expected:
        assert metadata["@kluster.ai"] == expected["options"]


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
