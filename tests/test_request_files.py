"""Tests of building, writing and validating batch request files (no server involved)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import pathlib

import pytest

from airflow_provider_kluster.exceptions import KlusterRequestFileError
from airflow_provider_kluster.request_files import (
    BATCH_URL,
    DEFAULT_MAX_REQUESTS,
    MAX_FILE_BYTES,
    RequestFileSummary,
    build_request_lines,
    iter_custom_ids,
    validate_request_file,
    write_request_file,
)
from tests.helpers import FIXTURES

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def line(custom_id: str = "r-1", **overrides: object) -> dict:
    """Return a valid request line, with top-level keys overridden (``None`` removes a key)."""
    data: dict = {
        "custom_id": custom_id,
        "method": "POST",
        "url": BATCH_URL,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def with_body(custom_id: str = "r-1", **body: object) -> dict:
    """Return a valid request line whose body has keys overridden (``None`` removes a key)."""
    data = line(custom_id)
    data["body"].update(body)
    data["body"] = {key: value for key, value in data["body"].items() if value is not None}
    return data


def write_lines(path: pathlib.Path, *lines: dict | str | bytes) -> pathlib.Path:
    """Write lines (dicts as JSON, str/bytes verbatim) each followed by a newline."""
    chunks = []
    for item in lines:
        if isinstance(item, dict):
            item = json.dumps(item)
        chunks.append(item if isinstance(item, bytes) else item.encode())
    path.write_bytes(b"".join(chunk + b"\n" for chunk in chunks))
    return path


def problems_of(path: pathlib.Path, **kwargs: object) -> KlusterRequestFileError:
    with pytest.raises(KlusterRequestFileError) as info:
        validate_request_file(path, **kwargs)
    return info.value


# -- published examples and the summary ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "models"),
    [
        ("batch_input.jsonl", ("deepseek-ai/DeepSeek-R1",)),
        (
            "batch_input_multimodel.jsonl",
            (
                "Qwen/Qwen3-235B-A22B-FP8",
                "deepseek-ai/DeepSeek-V3-0324",
                "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8",
            ),
        ),
    ],
    ids=["single-model", "multi-model"],
)
def test_published_examples_validate(name, models):
    path = FIXTURES / name
    summary = validate_request_file(path)
    assert summary.requests == 3
    assert summary.models == models
    assert summary.bytes == path.stat().st_size


def test_summary_fields(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"), with_body("b", model="z-model"))
    summary = validate_request_file(path)
    assert summary == RequestFileSummary(
        path=str(path),
        requests=2,
        bytes=len(path.read_bytes()),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        models=(MODEL, "z-model"),
    )


def test_crlf_line_endings_are_accepted(tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_bytes(json.dumps(line("a")).encode() + b"\r\n" + json.dumps(line("b")).encode() + b"\r\n")
    assert validate_request_file(path).requests == 2


def test_last_line_without_newline_is_accepted(tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_text(json.dumps(line("a")) + "\n" + json.dumps(line("b")))
    assert validate_request_file(path).requests == 2


def test_object_storage_path_validates(tmp_path):
    from airflow.sdk import ObjectStoragePath

    write_lines(tmp_path / "req.jsonl", line("a"))
    summary = validate_request_file(ObjectStoragePath(f"file://{tmp_path}/req.jsonl"))
    assert summary.requests == 1


def test_uri_string_validates(tmp_path):
    write_lines(tmp_path / "req.jsonl", line("a"))
    assert validate_request_file(f"file://{tmp_path}/req.jsonl").requests == 1


# -- one test per problem --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"custom_id": "r-2", ', "line 2: invalid JSON (Expecting property name enclosed in double quotes"),
        ("[1, 2]", "line 2: expected a JSON object, got an array"),
        ('"just text"', "line 2: expected a JSON object, got a string"),
        (line(None), "line 2: missing custom_id"),
        (line(""), "line 2: custom_id must be a non-empty string, got ''"),
        (line(7), "line 2: custom_id must be a non-empty string, got 7"),
        (line("r-2", method="GET"), "line 2: method must be \"POST\", got 'GET'"),
        (line("r-2", method=None), 'line 2: method must be "POST", it is missing'),
        (
            line("r-2", url="/v1/embeddings"),
            'line 2: url must be "/v1/chat/completions" (the only endpoint kluster.ai batches accept), '
            "got '/v1/embeddings'",
        ),
        (line("r-2", body=None), "line 2: missing body"),
        (line("r-2", body="hello"), "line 2: body must be a JSON object, got a string"),
        (with_body("r-2", model=None), "line 2: missing body.model"),
        (with_body("r-2", model=""), "line 2: body.model must be a non-empty string, got ''"),
        (
            with_body("r-2", messages=None),
            "line 2: body.messages must be a non-empty list of messages, it is missing",
        ),
        (with_body("r-2", messages=[]), "line 2: body.messages must be a non-empty list of messages, got []"),
        (
            with_body("r-2", messages="Hi"),
            "line 2: body.messages must be a non-empty list of messages, got 'Hi'",
        ),
        (with_body("r-2", stream=True), "line 2: body.stream is true; batch requests cannot stream"),
    ],
    ids=[
        "invalid-json",
        "array-line",
        "string-line",
        "missing-custom-id",
        "empty-custom-id",
        "numeric-custom-id",
        "method-get",
        "method-missing",
        "url-not-chat",
        "body-missing",
        "body-not-object",
        "model-missing",
        "model-empty",
        "messages-missing",
        "messages-empty",
        "messages-not-list",
        "stream-true",
    ],
)
def test_invalid_line_is_reported_by_number(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "req.jsonl", line("r-1"), bad_line, line("r-3"))
    error = problems_of(path)
    assert len(error.errors) == 1, error.errors
    assert error.errors[0].startswith(expected), error.errors[0]
    assert str(error).startswith(f"Request file {path} has 1 problem; nothing was uploaded:\n  line 2: ")


def test_stream_false_is_accepted(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", with_body("a", stream=False))
    assert validate_request_file(path).requests == 1


@pytest.mark.parametrize(
    "param", ["n", "response_format", "store", "service_tier", "modalities", "stream_options"]
)
def test_unsupported_chat_param_is_reported(tmp_path, param):
    path = write_lines(tmp_path / "req.jsonl", with_body("a", **{param: 1}))
    error = problems_of(path)
    assert error.errors == [f"line 1: body.{param} is not supported by kluster.ai batch; remove it"]


def test_several_unsupported_params_in_one_problem(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", with_body("a", n=2, store=True))
    error = problems_of(path)
    assert error.errors == ["line 1: body.n, body.store are not supported by kluster.ai batch; remove it"]


def test_duplicate_custom_id_names_first_line(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"), line("b"), line("c"), line("b"))
    error = problems_of(path)
    assert error.errors == ["line 4: duplicate custom_id 'b' (first used on line 2)"]


def test_non_utf8_line_is_reported(tmp_path):
    bad = json.dumps(line("b")).encode().replace(b"Hi", b"H\xff")
    path = write_lines(tmp_path / "req.jsonl", line("a"), bad)
    error = problems_of(path)
    assert len(error.errors) == 1
    assert error.errors[0].startswith("line 2: not valid UTF-8 (byte 0xff at column")


def test_byte_order_mark_is_reported(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", b"\xef\xbb\xbf" + json.dumps(line("a")).encode())
    error = problems_of(path)
    assert error.errors == ["line 1: starts with a UTF-8 byte-order mark; save the file as UTF-8 without BOM"]


def test_blank_line_in_the_middle_is_reported(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"), "", line("b"))
    error = problems_of(path)
    assert error.errors == ["line 2: empty line; remove it (only a single newline may end the file)"]


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\n"], ids=["empty", "one-newline", "blank-lines"])
def test_file_without_requests_is_reported(tmp_path, content):
    path = tmp_path / "req.jsonl"
    path.write_bytes(content)
    error = problems_of(path)
    assert error.errors == ["the file has no requests (it is empty or holds only blank lines)"]
    assert str(error).startswith(f"Request file {path} has 1 problem; nothing was uploaded:")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(KlusterRequestFileError, match="does not exist; nothing was uploaded"):
        validate_request_file(tmp_path / "nope.jsonl")


def test_every_problem_is_listed_in_line_order(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"), line(None), "nope", line("d", method="GET"))
    error = problems_of(path)
    assert [problem.split(":")[0] for problem in error.errors] == ["line 2", "line 3", "line 4"]
    assert str(error).startswith(f"Request file {path} has 3 problems; nothing was uploaded:\n  line 2: ")


def test_errors_stop_at_max_errors(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", *["nope"] * 10)
    error = problems_of(path, max_errors=3)
    assert [problem.split(":")[0] for problem in error.errors] == ["line 1", "line 2", "line 3"]
    assert str(error).startswith(f"Request file {path} has more than 3 problems; nothing was uploaded:")
    assert str(error).endswith("\n  ...and more")


# -- what kluster's request schema refuses -------------------------------------------------------------

GOOD_LINE = json.dumps(line("r-2"))


def msgs(*messages: object) -> dict:
    return with_body("r-2", messages=list(messages))


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (
            GOOD_LINE.replace('"method": "POST"', '"method": "POST", "method": "POST"'),
            "line 2: duplicate key 'method' in one JSON object; name each key once",
        ),
        (
            GOOD_LINE.replace('"model":', '"model": "other", "model":'),
            "line 2: duplicate key 'model' in one JSON object",
        ),
        (
            GOOD_LINE.replace('"role": "user"', '"role": "user", "role": "system"'),
            "line 2: duplicate key 'role'",
        ),
        (
            GOOD_LINE.replace('"model":', '"temperature": NaN, "model":'),
            "line 2: NaN is not valid JSON (kluster.ai refuses it); write a finite number or null",
        ),
        (GOOD_LINE.replace('"model":', '"top_p": Infinity, "model":'), "line 2: Infinity is not valid JSON"),
        (GOOD_LINE.replace('"model":', '"seed": -Infinity, "model":'), "line 2: -Infinity is not valid JSON"),
        (
            msgs({"content": "Hi"}),
            "line 2: body.messages[0] has no role; give one of system, user, assistant, tool",
        ),
        (msgs({"role": None, "content": "Hi"}), "line 2: body.messages[0] has no role"),
        (
            msgs({"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hi"}),
            "line 2: body.messages[1] role must be one of system, user, assistant, tool, function, got 'bot'",
        ),
        (msgs({"role": "User", "content": "Hi"}), "line 2: body.messages[0] role must be one of"),
        (msgs({"role": "developer", "content": "Hi"}), "line 2: body.messages[0] role must be one of"),
        (msgs({"role": ["user"], "content": "Hi"}), "line 2: body.messages[0] role must be one of"),
        (msgs("Hi"), "line 2: body.messages[0] must be an object with a role and a content, got a string"),
        (msgs({"role": "user"}), "line 2: body.messages[0] has no content; give a string or an array"),
        (msgs({"role": "user", "content": None}), "line 2: body.messages[0] has no content"),
        (msgs({"role": "assistant"}), "line 2: body.messages[0] has no content"),
        (
            msgs({"role": "user", "content": 42}),
            "line 2: body.messages[0] content must be a string or an array of content parts, got a number",
        ),
        (
            with_body("r-2", max_completion_tokens=-1),
            "line 2: body.max_completion_tokens must be a whole number of at least 1 (or null), got -1",
        ),
        (
            with_body("r-2", max_completion_tokens=0),
            "line 2: body.max_completion_tokens must be a whole number",
        ),
        (
            with_body("r-2", max_completion_tokens="1000"),
            "line 2: body.max_completion_tokens must be a whole",
        ),
        (with_body("r-2", max_completion_tokens=True), "line 2: body.max_completion_tokens must be a whole"),
        (with_body("r-2", max_tokens=1.5), "line 2: body.max_tokens must be a whole number of at least 1"),
        (
            with_body("r-2", temperature="0.5"),
            "line 2: body.temperature must be a number (or null), got '0.5'",
        ),
        (with_body("r-2", top_p=False), "line 2: body.top_p must be a number"),
        (with_body("r-2", min_p=1.5), "line 2: body.min_p must be a number from 0 to 1 (or null), got 1.5"),
        (
            with_body("r-2", repetition_penalty=-1),
            "line 2: body.repetition_penalty must be a number of at least 0",
        ),
        (with_body("r-2", logprobs="yes"), "line 2: body.logprobs must be a boolean (true or false)"),
        (with_body("r-2", stream="no"), "line 2: body.stream must be a boolean"),
        (with_body("r-2", stop=5), "line 2: body.stop must be a string or an array of strings"),
        (with_body("r-2", stop=["a", 1]), "line 2: body.stop must be a string or an array of strings"),
        (with_body("r-2", tools={"type": "function"}), "line 2: body.tools must be an array"),
        (with_body("r-2", logit_bias=[1]), "line 2: body.logit_bias must be an object"),
    ],
    ids=[
        "duplicate-top-level-key",
        "duplicate-body-key",
        "duplicate-message-key",
        "nan",
        "infinity",
        "minus-infinity",
        "message-without-role",
        "message-with-null-role",
        "unknown-role",
        "role-in-capitals",
        "developer-role",
        "role-not-a-string",
        "message-not-an-object",
        "message-without-content",
        "message-with-null-content",
        "assistant-without-content-or-tool-calls",
        "content-a-number",
        "max-completion-tokens-negative",
        "max-completion-tokens-zero",
        "max-completion-tokens-a-string",
        "max-completion-tokens-a-boolean",
        "max-tokens-fractional",
        "temperature-a-string",
        "top-p-a-boolean",
        "min-p-over-one",
        "repetition-penalty-negative",
        "logprobs-a-string",
        "stream-a-string",
        "stop-a-number",
        "stop-with-a-number",
        "tools-not-an-array",
        "logit-bias-not-an-object",
    ],
)
def test_what_the_server_refuses_is_reported_by_line(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "req.jsonl", line("r-1"), bad_line, line("r-3"))
    error = problems_of(path)
    assert len(error.errors) == 1, error.errors
    assert error.errors[0].startswith(expected), error.errors[0]


@pytest.mark.parametrize(
    "good_line",
    [
        *[
            msgs({"role": role, "content": "Hi"})
            for role in ("system", "user", "assistant", "tool", "function")
        ],
        msgs({"role": "user", "content": [{"type": "text", "text": "Hi"}]}),
        msgs({"role": "user", "content": []}),
        msgs({"role": "user", "content": ""}),
        msgs({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {}}]}),
        msgs({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
        msgs({"role": "tool", "content": "42", "tool_call_id": "call-1", "name": None}),
        with_body("r-2", max_completion_tokens=1, max_tokens=1000.0),
        with_body("r-2", temperature=0, top_p=1, frequency_penalty=-2, presence_penalty=2.0, seed=42),
        with_body(
            "r-2", min_p=0, repetition_penalty=0, top_logprobs=5, logprobs=True, parallel_tool_calls=False
        ),
        with_body("r-2", stop="\n", user="me", tools=[], logit_bias={"50256": -100}),
        with_body("r-2", stop=["a", "b"]),
        GOOD_LINE.replace(
            '"model":', '"temperature": null, "max_tokens": null, "stop": null, "stream": null, "model":'
        ),
        with_body("r-2", future_parameter={"any": "thing"}, metadata={"k": 1}, tool_choice="auto"),
        with_body("r-2", messages=[{"role": "user", "content": "NaN and Infinity are fine in text"}]),
        msgs({"role": "system", "content": "a"}, {"role": "user", "content": "b"}),
        "  " + GOOD_LINE + "\t",
    ],
    ids=[
        "system",
        "user",
        "assistant",
        "tool",
        "function",
        "content-parts",
        "empty-content-parts",
        "empty-content",
        "assistant-tool-calls-without-content",
        "assistant-function-call-without-content",
        "tool-message",
        "token-limits-at-one-and-whole-float",
        "sampling-numbers",
        "more-numbers-and-switches",
        "stop-string-and-others",
        "stop-list",
        "nulls",
        "parameters-the-schema-leaves-open",
        "nan-in-text",
        "same-keys-in-different-objects",
        "json-whitespace-around",
    ],
)
def test_what_the_server_accepts_passes(tmp_path, good_line):
    path = write_lines(tmp_path / "req.jsonl", line("r-1"), good_line)
    assert validate_request_file(path).requests == 2


def test_invalid_json_column_counts_leading_whitespace(tmp_path):
    """The fast parse and the full decoder agree: the column is that of the line as written."""
    bad = '   {"custom_id": }'
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(bad)
    path = write_lines(tmp_path / "req.jsonl", bad)
    assert problems_of(path).errors == [
        f"line 1: invalid JSON ({expected.value.msg} at column {expected.value.colno})"
    ]


@pytest.mark.parametrize(
    "bad",
    ['{"custom_id": "a"} x', '{"custom_id": "a"}\x0c', "nul", "{}{}"],
    ids=["trailing", "form-feed", "nul", "two"],
)
def test_anything_but_one_json_value_is_invalid(tmp_path, bad):
    path = write_lines(tmp_path / "req.jsonl", bad)
    assert problems_of(path).errors[0].startswith("line 1: invalid JSON (")


def test_json_nested_too_deeply_is_a_problem_not_a_crash(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", "[" * 100_000)
    assert problems_of(path).errors == ["line 1: invalid JSON (nested too deeply to read)"]


def test_every_bad_message_of_a_line_is_listed(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", msgs({"content": "a"}, {"role": "user", "content": "b"}, "c"))
    assert problems_of(path).errors == [
        "line 1: body.messages[0] has no role; give one of system, user, assistant, tool, function",
        "line 1: body.messages[2] must be an object with a role and a content, got a string",
    ]


def test_a_directory_is_reported(tmp_path):
    with pytest.raises(
        KlusterRequestFileError, match="is a directory, not a JSONL file; nothing was uploaded"
    ):
        validate_request_file(tmp_path)


# -- models and limits -----------------------------------------------------------------------------------


def test_known_models_accepts_listed_models(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"))
    assert validate_request_file(path, known_models={MODEL, "other"}).models == (MODEL,)


def test_unknown_model_is_reported_with_available_ones(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"), with_body("b", model="gpt-9"))
    known = [f"model-{i}" for i in range(8)]
    error = problems_of(path, known_models=known + [MODEL])
    assert error.errors == [
        "line 2: model 'gpt-9' is not available on kluster.ai (available: "
        f"{MODEL}, model-0, model-1, model-2, model-3, ... (4 more)); "
        "pass check_models=False to the operator to skip this check"
    ]


def test_more_requests_than_max_requests_stops_early(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"), line("b"), line("c"), "not json at all")
    error = problems_of(path, max_requests=2)
    assert len(error.errors) == 1  # stopped before reading line 4
    assert error.errors[0].startswith("line 3: more than max_requests=2 requests; stopped reading here.")
    assert "Shard the file into several batches, or raise max_requests to your plan's" in error.errors[0]


@pytest.fixture(scope="module")
def one_over_the_default_limit(tmp_path_factory) -> pathlib.Path:
    """A valid request file holding one request more than the default ``max_requests``."""
    path = tmp_path_factory.mktemp("limit") / "req.jsonl"
    return write_lines(path, *[line(f"r{i}") for i in range(DEFAULT_MAX_REQUESTS + 1)])


def test_default_max_requests_is_the_core_plan_limit(one_over_the_default_limit):
    """Without ``max_requests`` the check still runs, at kluster's Core-plan limit of 100,000 requests."""
    assert DEFAULT_MAX_REQUESTS == 100_000
    error = problems_of(one_over_the_default_limit)
    assert len(error.errors) == 1
    assert error.errors[0].startswith(
        "line 100001: more than max_requests=100,000 requests; stopped reading here."
    )


def test_max_requests_none_means_no_limit(one_over_the_default_limit):
    """``max_requests=None`` lifts the default limit: the same file that fails above validates in full."""
    assert (
        validate_request_file(one_over_the_default_limit, max_requests=None).requests
        == DEFAULT_MAX_REQUESTS + 1
    )


def test_file_over_max_bytes_is_rejected_from_its_size(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("a"), line("b"))
    size = path.stat().st_size
    error = problems_of(path, max_bytes=size - 1)
    assert error.errors == [
        f"the file is {size:,} bytes, over max_bytes={size - 1:,} bytes; 100 MB is kluster.ai's per-file "
        "upload limit: shard the requests into several files and batches"
    ]


def test_file_over_max_bytes_is_caught_while_streaming(tmp_path, monkeypatch):
    import airflow_provider_kluster.request_files as request_files

    monkeypatch.setattr(request_files, "_stat_size", lambda source: None)  # a store that cannot stat
    path = write_lines(tmp_path / "req.jsonl", line("a"), line("b"), line("c"))
    first = len(path.read_bytes().splitlines(keepends=True)[0])
    error = problems_of(path, max_bytes=first + 1)
    assert len(error.errors) == 1
    assert error.errors[0].endswith(
        "100 MB is kluster.ai's per-file upload limit: shard the requests into "
        "several files and batches (passed at line 2)"
    )


def test_default_max_bytes_is_the_100_mb_upload_limit(tmp_path):
    """Without ``max_bytes`` a file over 100 MB is refused from its size alone, before a byte is read."""
    path = tmp_path / "req.jsonl"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: 100 MB + 1 byte of NULs that would fail if they were read
    error = problems_of(path)
    assert len(error.errors) == 1, error.errors  # the size alone: the NULs were never read as lines
    assert error.errors[0].startswith("the file is ")
    assert f"{MAX_FILE_BYTES + 1:,} bytes" in error.errors[0]
    assert f"over max_bytes={MAX_FILE_BYTES:,} bytes;" in error.errors[0]
    assert error.errors[0].endswith(
        "100 MB is kluster.ai's per-file upload limit: shard the requests into several files and batches"
    )
    assert MAX_FILE_BYTES == 100 * 1024 * 1024


def test_max_bytes_none_means_no_limit(tmp_path, monkeypatch):
    """``max_bytes=None`` lifts the default size limit: a file whose size reads over 100 MB validates."""
    import airflow_provider_kluster.request_files as request_files

    monkeypatch.setattr(request_files, "_stat_size", lambda source: MAX_FILE_BYTES + 1)
    path = write_lines(tmp_path / "req.jsonl", line("a"))
    assert f"over max_bytes={MAX_FILE_BYTES:,} bytes" in problems_of(path).errors[0]  # the default applies
    assert validate_request_file(path, max_bytes=None).requests == 1


# -- iter_custom_ids -------------------------------------------------------------------------------------


def test_iter_custom_ids_streams_ids_in_file_order(tmp_path):
    path = write_lines(tmp_path / "req.jsonl", line("z"), line("a"), line("m"))
    assert list(iter_custom_ids(path)) == ["z", "a", "m"]


# -- build_request_lines ---------------------------------------------------------------------------------


def test_build_from_prompt_string():
    lines = list(build_request_lines(["What is 2 + 2?"], model=MODEL, body_defaults={"temperature": 0.2}))
    assert lines == [
        {
            "custom_id": "request-0",
            "method": "POST",
            "url": "/v1/chat/completions",  # the only endpoint kluster.ai batches accept
            "body": {
                "messages": [{"role": "user", "content": "What is 2 + 2?"}],
                "model": MODEL,
                "temperature": 0.2,
            },
        }
    ]


def test_build_from_chat_body_moves_custom_id_to_line():
    body = {"custom_id": "q1", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 5}
    [built] = build_request_lines([body], model=MODEL)
    assert built == {
        "custom_id": "q1",
        "method": "POST",
        "url": BATCH_URL,
        "body": {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 5, "model": MODEL},
    }
    assert "custom_id" in body  # the caller's mapping is left alone


def test_build_from_full_line_fills_method_url_and_model():
    [built] = build_request_lines(
        [{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "Hi"}]}}], model=MODEL
    )
    assert built["method"] == "POST"
    assert built["url"] == BATCH_URL
    assert built["body"]["model"] == MODEL
    assert built["custom_id"] == "x"


def test_build_never_overrides_what_an_item_sets():
    item = line("keep", url="/custom", method="PUT")
    item["body"].update(model="own-model", temperature=0.9)
    [built] = build_request_lines(
        [item], model=MODEL, body_defaults={"temperature": 0.2, "max_completion_tokens": 9}
    )
    assert built["url"] == "/custom"
    assert built["method"] == "PUT"
    assert built["body"]["model"] == "own-model"
    assert built["body"]["temperature"] == 0.9
    assert built["body"]["max_completion_tokens"] == 9


def test_build_does_not_mutate_items():
    item = {"body": {"messages": [{"role": "user", "content": "Hi"}]}}
    list(build_request_lines([item], model=MODEL, body_defaults={"temperature": 0.2}))
    assert item == {"body": {"messages": [{"role": "user", "content": "Hi"}]}}


def test_generated_ids_are_stable_and_positional():
    items = ["a", {"custom_id": "mine", "messages": [{"role": "user", "content": "b"}]}, "c"]
    first = [built["custom_id"] for built in build_request_lines(items, model=MODEL, custom_id_prefix="q")]
    second = [built["custom_id"] for built in build_request_lines(items, model=MODEL, custom_id_prefix="q")]
    assert first == second == ["q-0", "mine", "q-2"]


@pytest.mark.parametrize(
    "item", [42, None, ["Hi"], {"prompt": "Hi"}], ids=["int", "none", "list", "unknown-dict"]
)
def test_build_rejects_unknown_item_naming_its_index(item):
    with pytest.raises(KlusterRequestFileError, match=r"^Request item 1 is .*expected a prompt string"):
        list(build_request_lines(["ok", item], model=MODEL))


def test_build_without_model_asks_for_model():
    with pytest.raises(KlusterRequestFileError, match=r"^Request item 0 has no model: .*pass model="):
        list(build_request_lines(["Hi"]))


# -- write_request_file ----------------------------------------------------------------------------------


def test_write_local_file_is_compact_utf8_and_valid(tmp_path):
    path = tmp_path / "out" / "req.jsonl"
    summary = write_request_file(
        ["¿Qué tal?", "Hi"], path, model=MODEL, body_defaults={"max_completion_tokens": 5}
    )
    data = path.read_bytes()
    assert data.decode("utf-8").splitlines()[0] == (
        '{"custom_id":"request-0","method":"POST","url":"/v1/chat/completions","body":'
        '{"messages":[{"role":"user","content":"¿Qué tal?"}],"model":"'
        + MODEL
        + '","max_completion_tokens":5}}'
    )
    assert summary == validate_request_file(path)
    assert summary.sha256 == hashlib.sha256(data).hexdigest()
    assert summary.bytes == len(data)
    assert summary.requests == 2
    assert list(tmp_path.joinpath("out").iterdir()) == [path]


def test_write_object_storage_path(tmp_path):
    from airflow.sdk import ObjectStoragePath

    dest = ObjectStoragePath(f"file://{tmp_path}/x.jsonl")
    summary = write_request_file(["Hi"], dest, model=MODEL)
    assert summary.path == str(dest)
    assert summary.sha256 == hashlib.sha256((tmp_path / "x.jsonl").read_bytes()).hexdigest()
    assert list(iter_custom_ids(dest)) == ["request-0"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_write_consumes_a_generator(tmp_path):
    summary = write_request_file((f"Question {i}" for i in range(3)), tmp_path / "req.jsonl", model=MODEL)
    assert summary.requests == 3


def test_write_rejects_duplicate_ids_and_leaves_nothing(tmp_path):
    items = [{"custom_id": "same", "messages": [{"role": "user", "content": str(i)}]} for i in range(2)]
    with pytest.raises(KlusterRequestFileError) as info:
        write_request_file(items, tmp_path / "req.jsonl", model=MODEL)
    assert info.value.errors == ["line 2: duplicate custom_id 'same' (first used on line 1)"]
    assert "nothing was written" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_generated_id_colliding_with_given_one(tmp_path):
    items = [{"custom_id": "request-1", "messages": [{"role": "user", "content": "a"}]}, "b"]
    with pytest.raises(KlusterRequestFileError, match="duplicate custom_id 'request-1'"):
        write_request_file(items, tmp_path / "req.jsonl", model=MODEL)


def test_write_rejects_unsupported_params(tmp_path):
    with pytest.raises(KlusterRequestFileError, match="body.n is not supported by kluster.ai batch"):
        write_request_file(["Hi"], tmp_path / "req.jsonl", model=MODEL, body_defaults={"n": 2})
    assert list(tmp_path.iterdir()) == []


def test_write_bad_item_leaves_nothing_behind(tmp_path):
    with pytest.raises(KlusterRequestFileError, match="Request item 1"):
        write_request_file(["Hi", 3], tmp_path / "req.jsonl", model=MODEL)
    assert list(tmp_path.iterdir()) == []


def test_write_keeps_existing_file_when_it_fails(tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_text("old")
    with pytest.raises(KlusterRequestFileError):
        write_request_file(["Hi"], path)  # no model
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_write_empty_list_is_rejected(tmp_path):
    with pytest.raises(KlusterRequestFileError, match="No requests to write"):
        write_request_file([], tmp_path / "req.jsonl", model=MODEL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"messages": [{"content": "Hi"}]}, "line 2: body.messages[0] has no role"),
        (
            {"messages": [{"role": "user", "content": "Hi"}], "temperature": math.nan},
            "line 2: holds NaN or Infinity",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}], "top_p": math.inf},
            "line 2: holds NaN or Infinity",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}], "metadata": {"day": dt.date(2025, 1, 1)}},
            "line 2: cannot be written as JSON (Object of type date is not JSON serializable)",
        ),
        (
            {"messages": [{"role": "user", "content": "\ud800"}]},
            "line 2: holds text that cannot be written as UTF-8",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -3},
            "line 2: body.max_tokens must be",
        ),
    ],
    ids=["no-role", "nan", "infinity", "not-json", "lone-surrogate", "negative-max-tokens"],
)
def test_write_refuses_what_the_server_refuses_and_leaves_nothing(tmp_path, item, expected):
    with pytest.raises(KlusterRequestFileError, match="nothing was written") as info:
        write_request_file(["fine", item], tmp_path / "req.jsonl", model=MODEL)
    assert len(info.value.errors) == 1, info.value.errors
    assert info.value.errors[0].startswith(expected), info.value.errors[0]
    assert list(tmp_path.iterdir()) == []
