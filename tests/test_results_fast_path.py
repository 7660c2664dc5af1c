"""The join's fast reader of successful lines agrees with :func:`parse_result_line` on every line, odd or not.

The results join reads the usual success without decoding its answer (the literal is copied to the records file
as the line holds it) and hands every other line to ``parse_result_line``. These cases are built to trip that
shortcut — escapes, surrogates, a ``"content"`` key elsewhere, a ``NaN`` of the line's own, odd types, odd
whitespace, broken JSON — and each must give the same record as the slow path, byte for byte once parsed.
"""

from __future__ import annotations

import json
import random

import pytest

from airflow_provider_kluster import results
from airflow_provider_kluster.results import ResultRecord, parse_result_line


def success(content: object = "Hi.", **over: object) -> dict:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }
    line = {
        "id": "r1",
        "custom_id": "req-1",
        "response": {"status_code": 200, "request_id": "q", "body": body},
    }
    for key, value in over.items():
        target, _, name = key.rpartition("__")
        node: dict = line
        for part in filter(None, target.split("__")):
            node = node[part] if not part.isdigit() else node[int(part)]  # type: ignore[index]
        node[name] = value
    return line


def dumps(data: object, **kwargs: object) -> bytes:
    return (json.dumps(data, **kwargs) + "\n").encode()  # type: ignore[arg-type]


CASES: dict[str, bytes] = {
    "plain": dumps(success()),
    "compact": dumps(success(), separators=(",", ":")),
    "crlf and trailing spaces": dumps(success())[:-1] + b"  \r\n",
    "no newline": dumps(success())[:-1],
    "escapes": dumps(success('a "quoted"\nline\\ with\ttabs \u00e9 \u2028')),
    "non-ascii raw": dumps(success("café 日本 😀"), ensure_ascii=False),
    "non-ascii escaped": dumps(success("café 日本 😀")),
    "surrogate pair escaped": b'{"custom_id": "req-1", "response": {"status_code": 200, "body": {"model": "m", '
    b'"choices": [{"message": {"content": "\\ud83d\\ude00"}, "finish_reason": "stop"}]}}}\n',
    "lone surrogate": b'{"custom_id": "req-1", "response": {"status_code": 200, "body": {"model": "m", '
    b'"choices": [{"message": {"content": "x\\ud800y"}, "finish_reason": "stop"}]}}}\n',
    "content null": dumps(success(None)),
    "content empty": dumps(success("")),
    "content a list": dumps(success([{"type": "text", "text": "hi"}])),
    "content a number": dumps(success(7)),
    "content key in the id": dumps(success(custom_id='x"content": "y')),
    "content key earlier in the body": dumps(success(response__body__id='"content": "decoy"')),
    "content key before message": b'{"custom_id": "req-1", "content": "decoy", "response": {"status_code": 200, '
    b'"body": {"model": "m", "choices": [{"message": {"content": "real"}, "finish_reason": "stop"}]}}}\n',
    "escaped content key": b'{"custom_id": "a\\"content\\": \\"b", "response": {"status_code": 200, "body": '
    b'{"model": "m", "choices": [{"message": {"content": "real"}, "finish_reason": "stop"}]}}}\n',
    "NaN of its own": dumps(success(response__body__usage={"prompt_tokens": float("nan")})),
    "Infinity elsewhere": dumps(success(response__body__x=float("inf"))),
    "two choices": dumps(
        success(
            response__body__choices=[
                {"message": {"content": "one"}, "finish_reason": "stop"},
                {"message": {"content": "two"}, "finish_reason": "length"},
            ]
        )
    ),
    "tool call then content": b'{"custom_id": "req-1", "response": {"status_code": 200, "body": {"model": "m", '
    b'"choices": [{"message": {"tool_calls": [{"content": "inner"}], "content": "outer"}, '
    b'"finish_reason": "stop"}]}}}\n',
    "no usage": dumps(success(response__body__usage=None)),
    "usage floats": dumps(success(response__body__usage={"prompt_tokens": 1.0, "completion_tokens": 2})),
    "usage strings": dumps(success(response__body__usage={"prompt_tokens": "5"})),
    "usage zero and none": dumps(
        success(response__body__usage={"prompt_tokens": 0, "completion_tokens": None})
    ),
    "usage bool": dumps(success(response__body__usage={"prompt_tokens": True})),
    "no finish reason": dumps(success(response__body__choices=[{"message": {"content": "x"}}])),
    "model a number": dumps(success(response__body__model=3)),
    "no choices": dumps(success(response__body__choices=[])),
    "choices not a list": dumps(success(response__body__choices={"0": 1})),
    "body as text": dumps(success(response__body=json.dumps(success()["response"]["body"]))),
    "status 201": dumps(success(response__status_code=201)),
    "status as text": dumps(success(response__status_code="200")),
    "status 500": dumps(success(response__status_code=500)),
    "status bool": dumps(success(response__status_code=True)),
    "error set": dumps(success(error={"code": "x", "message": "y"})),
    "error false": dumps(success(error=False)),
    "custom id a number": dumps(success(custom_id=17)),
    "custom id missing": dumps({"response": success()["response"]}),
    "error-file line": dumps(
        {"custom_id": "req-1", "response": None, "error": {"code": "500", "message": "x"}}
    ),
    "not an object": b'["custom_id", "content"]\n',
    "truncated": dumps(success())[:-20] + b"\n",
    "trailing garbage": dumps(success())[:-1] + b' {"x": 1}\n',
    "not utf-8": dumps(success("x")).replace(b'"x"', b'"\xff\xfe"'),
    "bom": b"\xef\xbb\xbf" + dumps(success()),
    "blank": b"   \n",
    "nested deeply": b'{"custom_id": "req-1", "content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    "duplicate content key": b'{"custom_id": "req-1", "response": {"status_code": 200, "body": {"model": "m", '
    b'"choices": [{"message": {"content": "first", "content": "second"}, "finish_reason": "stop"}]}}}\n',
}


def fast_record(raw: bytes) -> object:
    """What the join's fast reader makes of ``raw``, as the records file line's data (or ``None``)."""
    got = results._LineReader().read(raw)
    if got is None:
        return None
    if isinstance(got, ResultRecord):
        return json.loads(results._record_line(got))
    return json.loads(results._success_line(got))


def slow_record(raw: bytes) -> object:
    if not raw.strip():
        return None
    return json.loads(results._record_line(parse_result_line(raw)))


@pytest.mark.parametrize("raw", list(CASES.values()), ids=list(CASES))
def test_the_fast_reader_agrees_with_parse_result_line(raw):
    assert fast_record(raw) == slow_record(raw)


def test_the_fast_reader_takes_the_usual_success_without_decoding_it():
    """The shortcut is really taken for the usual shapes (else this file would test the slow path twice)."""
    for name in ("plain", "compact", "escapes", "non-ascii raw", "content null", "no usage"):
        assert not isinstance(results._LineReader().read(CASES[name]), ResultRecord), name


def test_random_answers_agree():
    rng = random.Random(7)
    alphabet = [
        '"',
        "\\",
        "\n",
        "\t",
        "é",
        "日",
        "😀",
        "\u2028",
        "\x00",
        "\x7f",
        " ",
        "a",
        "{",
        "}",
        ":",
        ",",
    ]
    reader = results._LineReader()
    for _ in range(2_000):
        content = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        raw = dumps(success(content), ensure_ascii=rng.random() < 0.5)
        got = reader.read(raw)
        assert not isinstance(got, ResultRecord)
        assert json.loads(results._success_line(got)) == slow_record(raw)  # type: ignore[arg-type]
