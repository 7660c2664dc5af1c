"""Tests of reading result lines and joining output and error files to custom_ids (no server involved)."""

from __future__ import annotations

import json
import pathlib
import random

import pytest

from airflow_provider_kluster.results import ResultRecord, join_results, parse_result_line
from tests.helpers import FIXTURES

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def success(
    custom_id: str, content: str = "ok", prompt: int = 10, completion: int = 2, **extra: object
) -> dict:
    """Return an output line for a successful request."""
    return {
        "id": f"batch-req-{custom_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": f"req-{custom_id}",
            "body": {
                "object": "chat.completion",
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        },
        **extra,
    }


def http_failure(
    custom_id: str, status: int = 400, message: str = "bad request", code: str = "invalid"
) -> dict:
    """Return an error-file line in OpenAI's HTTP shape."""
    return {
        "id": f"batch-req-{custom_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": f"req-{custom_id}",
            "body": {"error": {"message": message, "type": "invalid_request_error", "code": code}},
        },
        "error": None,
    }


def coded_failure(custom_id: str, code: str = "timeout", message: str = "request timed out") -> dict:
    """Return a line for a request that failed outside HTTP: ``error: {code, message}``, no response."""
    return {
        "id": f"batch-req-{custom_id}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def jsonl(path: pathlib.Path, *lines: dict | str) -> pathlib.Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- parse_result_line -----------------------------------------------------------------------------------


def test_published_output_line():
    record = parse_result_line((FIXTURES / "batch_output_line.json").read_text())
    assert record == ResultRecord(
        custom_id="request-1",
        succeeded=True,
        content="The capital of Argentina is Buenos Aires.",
        finish_reason="stop",
        usage={"prompt_tokens": 48, "completion_tokens": 9, "total_tokens": 57},
        error=None,
        status_code=200,
        model=MODEL,
    )


def test_older_form_with_null_error_succeeds():
    record = parse_result_line(json.dumps(success("a", error=None)).encode())
    assert record.succeeded
    assert record.content == "ok"


def test_to_dict_is_json_native():
    record = parse_result_line(json.dumps(success("a", "hello")))
    assert record.to_dict() == {
        "custom_id": "a",
        "status": "succeeded",
        "content": "hello",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        "error": None,
        "status_code": 200,
        "model": MODEL,
    }
    assert json.loads(json.dumps(record.to_dict())) == record.to_dict()


@pytest.mark.parametrize(
    ("line", "status_code", "error"),
    [
        (
            http_failure("a", 429, "Rate limit reached", "rate_limit_exceeded"),
            429,
            "HTTP 429: Rate limit reached (rate_limit_exceeded)",
        ),
        (coded_failure("a", "timeout", "request timed out"), None, "request timed out (timeout)"),
        (
            {
                "custom_id": "a",
                "response": {"status_code": 500, "body": {"message": "boom", "errorCode": -1}},
            },
            500,
            "HTTP 500: boom (-1)",
        ),
        (
            {"custom_id": "a", "response": {"status_code": 502, "body": "Bad Gateway"}},
            502,
            "HTTP 502: Bad Gateway",
        ),
        ({"custom_id": "a", "response": None, "error": None}, None, "no response"),
    ],
    ids=["http-error-body", "error-code-message", "kluster-envelope", "text-body", "no-response"],
)
def test_failed_line_shapes(line, status_code, error):
    record = parse_result_line(json.dumps(line))
    assert record.custom_id == "a"
    assert not record.succeeded
    assert record.status_code == status_code
    assert record.error == error
    assert record.raw == line
    assert record.to_dict()["status"] == "failed"


def test_failed_line_without_message_keeps_raw_text_in_error():
    line = {"custom_id": "a", "response": {"status_code": 503, "body": {"weird": True}}}
    record = parse_result_line(json.dumps(line))
    assert (
        record.error
        == 'HTTP 503: no error message in {"custom_id": "a", "response": {"status_code": 503, "body": {"weird": true}}}'
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "unparseable result line: Expecting property name"),
        ("[1, 2]", "unparseable result line: expected a JSON object, got list"),
        (b"\xff\xfe{", "unparseable result line: "),
        (
            b'{"custom_id": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "unparseable result line: nested",
        ),
    ],
    ids=["broken-json", "not-object", "bad-bytes", "nested-too-deeply"],
)
def test_unparseable_line_never_raises(line, reason):
    record = parse_result_line(line)
    assert record.custom_id is None
    assert not record.succeeded
    assert record.error.startswith(reason)


# -- join_results ----------------------------------------------------------------------------------------


def test_out_of_order_lines_join_to_their_ids(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("c", "C"), success("a", "A"), success("b", "B"))
    manifest = join_results(output_path=output, expected_ids=["a", "b", "c"], return_records=3)
    assert {r["custom_id"]: r["content"] for r in manifest["records"]} == {"a": "A", "b": "B", "c": "C"}
    assert manifest["succeeded"] == 3
    assert manifest["missing"] == 0


def test_a_lone_surrogate_in_an_answer_does_not_stop_the_join(tmp_path):
    """A ``\\ud800`` escape is valid JSON but no UTF-8: the records file keeps it escaped and reads back the same."""
    lone = (
        b'{"custom_id": "a", "response": {"status_code": 200, "body": {"choices": [{"message": {"content": '
        b'"x\\ud800y"}, "finish_reason": "stop"}]}}}\n'
    )
    failed = (
        b'{"custom_id": "b", "response": {"status_code": 500, "body": {"error": {"message": "\\udfff"}}}}\n'
    )
    (tmp_path / "out.jsonl").write_bytes(lone + failed)
    records = tmp_path / "records.jsonl"
    manifest = join_results(output_path=tmp_path / "out.jsonl", expected_ids=["a", "b"], records_path=records)
    assert (manifest["succeeded"], manifest["failed"]) == (1, 1)
    read = [json.loads(line) for line in records.read_bytes().decode("utf-8").splitlines()]
    assert [r["custom_id"] for r in read] == ["a", "b"]
    assert read[0]["content"] == "x\ud800y"


def test_manifest_shape(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"))
    errors = jsonl(tmp_path / "err.jsonl", http_failure("b"))
    manifest = join_results(output_path=output, error_path=errors, expected_ids=["a", "b", "c"])
    assert manifest == {
        "succeeded": 1,
        "failed": 1,
        "missing": 1,
        "total": 3,
        "unexpected": 0,
        "duplicates": 0,
        "unparseable": 0,
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        "failed_ids": ["b"],
        "missing_ids": ["c"],
        "unexpected_ids": [],
        "first_errors": ["HTTP 400: bad request (invalid)"],
        "records_path": None,
    }
    assert json.loads(json.dumps(manifest)) == manifest


def test_duplicate_successes_count_once_and_first_wins(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a", "first"), success("b"), success("a", "second"))
    manifest = join_results(output_path=output, return_records=5)
    assert manifest["succeeded"] == 2
    assert manifest["duplicates"] == 1
    assert [r["content"] for r in manifest["records"] if r["custom_id"] == "a"] == ["first"]
    assert manifest["usage"]["total_tokens"] == 24


def test_later_success_supersedes_failure(tmp_path):
    output = jsonl(
        tmp_path / "out.jsonl", http_failure("a", 500, "overloaded"), success("b"), success("a", "retried")
    )
    errors = jsonl(tmp_path / "err.jsonl", coded_failure("b"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(output_path=output, error_path=errors, records_path=records)
    assert (manifest["succeeded"], manifest["failed"], manifest["duplicates"]) == (2, 0, 2)
    assert manifest["first_errors"] == []
    assert [(r["custom_id"], r["status"], r["content"]) for r in read_records(records)] == [
        ("b", "succeeded", "ok"),
        ("a", "succeeded", "retried"),
    ]


def test_success_in_error_file_supersedes_failure_in_output(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", http_failure("a"))
    errors = jsonl(tmp_path / "err.jsonl", success("a", "late"))
    manifest = join_results(output_path=output, error_path=errors, return_records=5)
    assert (manifest["succeeded"], manifest["failed"]) == (1, 0)
    assert manifest["records"][0]["content"] == "late"


def test_duplicate_failures_keep_the_first(tmp_path):
    errors = jsonl(tmp_path / "err.jsonl", http_failure("a", 400, "first"), http_failure("a", 400, "second"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(error_path=errors, records_path=records)
    assert (manifest["failed"], manifest["duplicates"]) == (1, 1)
    assert [r["error"] for r in read_records(records)] == ["HTTP 400: first (invalid)"]


def test_missing_ids_are_listed_and_capped(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("r1"))
    expected = [f"r{i}" for i in range(1, 31)]
    manifest = join_results(output_path=output, expected_ids=iter(expected), max_listed_ids=5)
    assert manifest["missing"] == 29
    assert manifest["missing_ids"] == ["r2", "r3", "r4", "r5", "r6"]
    assert manifest["total"] == 30


def test_absent_error_file_is_fine(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"))
    manifest = join_results(
        output_path=output, error_path=tmp_path / "never-downloaded.jsonl", expected_total=1
    )
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"]) == (1, 0, 0)


def test_no_files_at_all_means_everything_missing():
    manifest = join_results(expected_ids=["a", "b"])
    assert (manifest["missing"], manifest["missing_ids"], manifest["total"]) == (2, ["a", "b"], 2)


@pytest.mark.parametrize(
    "line",
    [
        http_failure("a", 422, "messages is required", "missing"),
        coded_failure("a", "missing", "messages is required"),
    ],
    ids=["http-shape", "error-shape"],
)
def test_error_file_line_counts_as_failed(tmp_path, line):
    errors = jsonl(tmp_path / "err.jsonl", line)
    manifest = join_results(error_path=errors, expected_ids=["a"])
    assert (manifest["failed"], manifest["failed_ids"]) == (1, ["a"])
    assert "messages is required (missing)" in manifest["first_errors"][0]


def test_coded_failure_in_output_file_counts_as_failed(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"), coded_failure("b", "server_error", "worker lost"))
    manifest = join_results(output_path=output)
    assert (manifest["succeeded"], manifest["failed"], manifest["failed_ids"]) == (1, 1, ["b"])
    assert manifest["first_errors"] == ["worker lost (server_error)"]


def test_unparseable_lines_are_counted_not_joined(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"), "{truncated", "", success("b"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(output_path=output, records_path=records)
    assert (manifest["succeeded"], manifest["unparseable"]) == (2, 1)
    assert manifest["first_errors"][0].startswith("unparseable result line: ")
    assert [r["custom_id"] for r in read_records(records)] == ["a", "b"]


def test_first_errors_are_distinct_and_at_most_five(tmp_path):
    lines = [http_failure(f"x{i}", 400, f"problem {i % 7}") for i in range(20)]
    manifest = join_results(error_path=jsonl(tmp_path / "err.jsonl", *lines))
    assert manifest["first_errors"] == [f"HTTP 400: problem {i} (invalid)" for i in range(5)]


def test_usage_sums_winning_records_only(tmp_path):
    output = jsonl(
        tmp_path / "out.jsonl",
        success("a", prompt=5, completion=1),
        success("b", prompt=7, completion=3),
        success("a", prompt=100, completion=100),  # duplicate: not counted
    )
    manifest = join_results(output_path=output)
    assert manifest["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}


def test_return_records_limits_manifest_records(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", *[success(f"r{i}", f"answer {i}") for i in range(10)])
    manifest = join_results(output_path=output, return_records=3)
    assert [r["content"] for r in manifest["records"]] == ["answer 0", "answer 1", "answer 2"]


def test_no_records_in_manifest_by_default(tmp_path):
    """The manifest goes to XCom, so by default it holds counts only, never the records (which can be huge)."""
    manifest = join_results(output_path=jsonl(tmp_path / "out.jsonl", success("a")))
    assert "records" not in manifest


def test_records_file_has_one_line_per_id_including_missing(tmp_path):
    output = jsonl(
        tmp_path / "out.jsonl", success("b", "B"), http_failure("c", 500, "boom"), success("b", "again")
    )
    errors = jsonl(tmp_path / "err.jsonl", coded_failure("d"))
    records = tmp_path / "nested" / "records.jsonl"
    manifest = join_results(
        output_path=output, error_path=errors, expected_ids=["a", "b", "c", "d"], records_path=records
    )
    joined = read_records(records)
    assert [(r["custom_id"], r["status"]) for r in joined] == [
        ("b", "succeeded"),
        ("c", "failed"),
        ("d", "failed"),
        ("a", "missing"),
    ]
    assert joined[0]["content"] == "B"
    assert joined[1]["raw"] == http_failure("c", 500, "boom")  # failed records keep kluster's line
    assert joined[3]["error"] == "no result in the output or error file"
    assert manifest["records_path"] == str(records)
    assert list(records.parent.iterdir()) == [records]  # no temporary file left


def test_expected_total_fallback_counts_missing_without_ids(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"), success("a"))
    errors = jsonl(tmp_path / "err.jsonl", http_failure("b"))
    manifest = join_results(output_path=output, error_path=errors, expected_total=5)
    assert (manifest["missing"], manifest["missing_ids"], manifest["total"]) == (3, [], 5)


def test_expected_total_below_seen_gives_no_missing(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"), success("b"))
    assert join_results(output_path=output, expected_total=1)["missing"] == 0


def test_object_storage_paths(tmp_path):
    from airflow.sdk import ObjectStoragePath

    jsonl(tmp_path / "out.jsonl", success("a", "A"))
    jsonl(tmp_path / "err.jsonl", http_failure("b"))
    records = ObjectStoragePath(f"file://{tmp_path}/results/records.jsonl")
    manifest = join_results(
        output_path=ObjectStoragePath(f"file://{tmp_path}/out.jsonl"),
        error_path=f"file://{tmp_path}/err.jsonl",
        expected_ids=["a", "b", "c"],
        records_path=records,
    )
    assert manifest["records_path"] == str(records)
    joined = [json.loads(line) for line in records.read_text().splitlines()]
    assert [(r["custom_id"], r["status"]) for r in joined] == [
        ("a", "succeeded"),
        ("b", "failed"),
        ("c", "missing"),
    ]
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["records.jsonl"]


# -- accounting against the input (issue #8) -------------------------------------------------------------


def test_unrequested_success_is_counted_apart(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"), success("stranger", prompt=1000), success("b"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(
        output_path=output, expected_ids=["a", "b"], records_path=records, return_records=5
    )
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"], manifest["total"]) == (2, 0, 0, 2)
    assert (manifest["unexpected"], manifest["unexpected_ids"]) == (1, ["stranger"])
    assert manifest["duplicates"] == 0
    assert manifest["usage"] == {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}
    assert [r["custom_id"] for r in read_records(records)] == ["a", "b"]
    assert [r["custom_id"] for r in manifest["records"]] == ["a", "b"]


def test_unrequested_failures_are_counted_apart(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", http_failure("x", 500, "from output"), success("a"))
    errors = jsonl(tmp_path / "err.jsonl", coded_failure("y", "timeout", "from errors"), http_failure("b"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(
        output_path=output, error_path=errors, expected_ids=["a", "b"], records_path=records
    )
    assert (manifest["succeeded"], manifest["failed"], manifest["total"]) == (1, 1, 2)
    assert manifest["failed_ids"] == ["b"]
    assert (manifest["unexpected"], manifest["unexpected_ids"]) == (2, ["x", "y"])
    assert manifest["first_errors"] == ["HTTP 400: bad request (invalid)"]  # not the unrequested ids' errors
    assert [(r["custom_id"], r["status"]) for r in read_records(records)] == [
        ("a", "succeeded"),
        ("b", "failed"),
    ]


def test_unexpected_counts_distinct_ids_and_lists_them_capped(tmp_path):
    strangers = [success(f"s{i}") for i in range(8)]
    output = jsonl(tmp_path / "out.jsonl", *strangers, *strangers, success("a"))
    errors = jsonl(tmp_path / "err.jsonl", http_failure("s0"), http_failure("s9"))
    manifest = join_results(output_path=output, error_path=errors, expected_ids=["a"], max_listed_ids=3)
    assert (manifest["unexpected"], manifest["unexpected_ids"]) == (9, ["s0", "s1", "s2"])
    assert (manifest["succeeded"], manifest["total"], manifest["duplicates"]) == (1, 1, 0)


def test_every_line_unexpected_when_nothing_was_requested(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(output_path=output, expected_ids=[], records_path=records)
    assert (manifest["succeeded"], manifest["total"], manifest["unexpected"]) == (0, 0, 1)
    assert records.read_text() == ""


def test_ids_listed_twice_in_the_input_count_once(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"))
    errors = jsonl(tmp_path / "err.jsonl", http_failure("b"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(
        output_path=output,
        error_path=errors,
        expected_ids=iter(["a", "b", "c", "a", "c", "b", "c"]),
        records_path=records,
    )
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"], manifest["total"]) == (1, 1, 1, 3)
    assert manifest["missing_ids"] == ["c"]
    assert [r["custom_id"] for r in read_records(records)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("output_lines", "error_lines"),
    [
        ([success("a", "win")], [http_failure("a")]),
        ([http_failure("a")], [success("a", "win")]),
        ([http_failure("a"), success("a", "win")], []),
        ([success("a", "win"), http_failure("a")], []),
        ([], [coded_failure("a"), success("a", "win"), http_failure("a")]),
    ],
    ids=[
        "output-success-error-failure",
        "output-failure-error-success",
        "failure-then-success",
        "success-then-failure",
        "all-in-errors",
    ],
)
def test_success_and_failure_for_one_id_keep_the_success(tmp_path, output_lines, error_lines):
    output = jsonl(tmp_path / "out.jsonl", *output_lines)
    errors = jsonl(tmp_path / "err.jsonl", *error_lines)
    records = tmp_path / "records.jsonl"
    manifest = join_results(output_path=output, error_path=errors, expected_ids=["a"], records_path=records)
    assert (manifest["succeeded"], manifest["failed"], manifest["total"]) == (1, 0, 1)
    assert manifest["duplicates"] == len(output_lines) + len(error_lines) - 1
    assert manifest["failed_ids"] == manifest["first_errors"] == []
    assert [(r["custom_id"], r["status"], r["content"]) for r in read_records(records)] == [
        ("a", "succeeded", "win")
    ]


def test_two_failures_for_one_id_keep_the_first_read(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", http_failure("a", 500, "in output"))
    errors = jsonl(tmp_path / "err.jsonl", http_failure("a", 400, "in errors"))
    records = tmp_path / "records.jsonl"
    manifest = join_results(output_path=output, error_path=errors, expected_ids=["a"], records_path=records)
    assert (manifest["failed"], manifest["duplicates"], manifest["total"]) == (1, 1, 1)
    assert manifest["first_errors"] == ["HTTP 500: in output (invalid)"]
    assert [r["error"] for r in read_records(records)] == ["HTTP 500: in output (invalid)"]


def test_without_expected_ids_nothing_is_unexpected(tmp_path):
    output = jsonl(tmp_path / "out.jsonl", success("a"), success("b"))
    manifest = join_results(output_path=output)
    assert (manifest["succeeded"], manifest["total"], manifest["unexpected"], manifest["unexpected_ids"]) == (
        2,
        2,
        0,
        [],
    )


def test_expected_total_fallback_total_is_never_below_the_ids_read(tmp_path, caplog):
    output = jsonl(tmp_path / "out.jsonl", success("a"), success("b"))
    errors = jsonl(tmp_path / "err.jsonl", http_failure("c"))
    manifest = join_results(output_path=output, error_path=errors, expected_total=2)
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"], manifest["total"]) == (2, 1, 0, 3)
    assert manifest["unexpected"] == 0  # which ids are extra cannot be known without the input
    assert "the batch had 2 requests" in caplog.text


def _random_case(rng: random.Random) -> tuple[list[str], list[dict | str], list[dict | str], dict]:
    """Return expected ids (with repeats), output and error lines, and what the join must make of them."""
    requested = [f"r{i}" for i in range(rng.randint(0, 30))]
    strangers = [f"u{i}" for i in range(rng.randint(0, 6))]
    expected = requested + rng.choices(requested, k=rng.randint(0, 5)) if requested else []
    rng.shuffle(expected)
    lines: list[tuple[str, dict | str]] = []  # (file, line), in the order they will be written
    serial = 0
    for custom_id in requested + strangers:
        kind = rng.choice(["succeeded", "failed", "missing", "mixed", "duplicate"])
        count = {"succeeded": 1, "failed": 1, "missing": 0}.get(kind, rng.randint(2, 4))
        for _ in range(count):
            serial += 1
            ok = (
                kind == "succeeded"
                or (kind == "duplicate" and rng.random() < 0.8)
                or (kind == "mixed" and rng.random() < 0.4)
            )
            line = (
                success(custom_id, f"answer {serial}", prompt=serial, completion=1)
                if ok
                else http_failure(custom_id, 500, f"problem {serial}")
            )
            lines.append((rng.choice(["output", "errors"]), line))
    rng.shuffle(lines)
    unparseable = rng.randint(0, 2)
    for _ in range(unparseable):
        lines.insert(rng.randint(0, len(lines)), (rng.choice(["output", "errors"]), "{truncated"))
    output = [line for where, line in lines if where == "output"]
    errors = [line for where, line in lines if where == "errors"]
    # The oracle: read the output file, then the error file; per id the first success, else the first failure.
    winner: dict[str, dict] = {}
    read = [line for line in output + errors if isinstance(line, dict)]
    for line in read:
        custom_id, ok = line["custom_id"], line["response"]["status_code"] == 200
        if custom_id not in winner or (ok and winner[custom_id]["response"]["status_code"] != 200):
            winner[custom_id] = line
    wanted = set(requested)
    answered = [cid for cid in winner if cid in wanted]
    truth = {
        "status": {
            cid: (
                "missing"
                if cid not in winner
                else "succeeded"
                if winner[cid]["response"]["status_code"] == 200
                else "failed"
            )
            for cid in requested
        },
        "winner": winner,
        "unexpected": len({cid for cid in winner if cid not in wanted}),
        "duplicates": sum(1 for line in read if line["custom_id"] in wanted) - len(answered),
        "unparseable": unparseable,
        "prompt_tokens": sum(
            winner[cid]["response"]["body"]["usage"]["prompt_tokens"]
            for cid in answered
            if winner[cid]["response"]["status_code"] == 200
        ),
    }
    return expected, output, errors, truth


@pytest.mark.parametrize("seed", range(40))
def test_every_requested_id_has_exactly_one_record(tmp_path, seed):
    rng = random.Random(seed)
    expected, output_lines, error_lines, truth = _random_case(rng)
    output = jsonl(tmp_path / "out.jsonl", *output_lines)
    errors = jsonl(tmp_path / "err.jsonl", *error_lines)
    records_path = tmp_path / "records.jsonl"
    manifest = join_results(
        output_path=output,
        error_path=errors,
        expected_ids=iter(expected),  # one pass only
        records_path=records_path,
        max_listed_ids=1000,
    )
    records = read_records(records_path) if records_path.read_text() else []
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(expected)
    assert {r["custom_id"]: r["status"] for r in records} == truth["status"]
    for record in records:
        if record["status"] == "succeeded":
            assert (
                record["content"]
                == truth["winner"][record["custom_id"]]["response"]["body"]["choices"][0]["message"][
                    "content"
                ]
            )
        elif record["status"] == "failed":
            assert record["raw"] == truth["winner"][record["custom_id"]]
    statuses = list(truth["status"].values())
    for key in ("succeeded", "failed", "missing"):
        assert manifest[key] == statuses.count(key)
    assert manifest["succeeded"] + manifest["failed"] + manifest["missing"] == manifest["total"]
    assert manifest["total"] == len(set(expected))
    assert manifest["unexpected"] == truth["unexpected"] == len(manifest["unexpected_ids"])
    assert not set(manifest["unexpected_ids"]) & set(expected)
    assert manifest["duplicates"] == truth["duplicates"]
    assert manifest["unparseable"] == truth["unparseable"]
    assert manifest["usage"]["prompt_tokens"] == truth["prompt_tokens"]
    assert sorted(manifest["failed_ids"]) == sorted(c for c, s in truth["status"].items() if s == "failed")
    assert sorted(manifest["missing_ids"]) == sorted(c for c, s in truth["status"].items() if s == "missing")
