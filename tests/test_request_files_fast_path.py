"""The validator's fast path (``_LineChecker.check_common``) changes speed, never a verdict.

Every line is checked both ways — with the fast path, and with it switched off so that only the strict parse
(duplicate-key hook, every problem worded) runs — and the two must give the same problems. The lines are the
shapes the fast path takes, each broken in the ways its counting must not miss: duplicate keys at every level
(the same value or another, with quotes and escapes around them), ``\\u0022`` and other escapes, non-finite
numbers, trailing data, whitespace, wrong types and unsupported parameters.
"""

from __future__ import annotations

import json
import random

import pytest

from airflow_provider_kluster import request_files
from airflow_provider_kluster.exceptions import KlusterRequestFileError
from airflow_provider_kluster.request_files import validate_request_file

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def _line(n: int, **body_extra: object) -> dict:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"{n}: summarise"},
        ],
        "max_tokens": 50,
    }
    body.update(body_extra)
    return {"custom_id": f"r-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def _dump(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _with_duplicate(text: str, anchor: str, duplicate: str) -> str:
    """Insert ``duplicate`` (``"key":value,``) just before the first ``anchor`` of ``text``."""
    at = text.index(anchor)
    return text[:at] + duplicate + text[at:]


def _variants() -> list[str]:
    base = _dump(_line(0))
    tricky = _dump(_line(1, user='he said "hi": \\ ok'))
    lines = [
        base,
        tricky,
        _dump(_line(2, temperature=0.5, stop="\n", seed=3)),
        # duplicate keys, same and different values, at each level
        _with_duplicate(base, '"method"', '"custom_id":"r-0",'),
        _with_duplicate(base, '"method"', '"custom_id":"other",'),
        _with_duplicate(base, '"max_tokens"', '"model":"' + MODEL + '",'),
        _with_duplicate(base, '"max_tokens"', '"max_tokens":50,'),
        _with_duplicate(base, '"max_tokens"', '"max_tokens":null,'),
        _with_duplicate(base, '"content":"You', '"role":"system",'),
        _with_duplicate(base, '"content":"You', '"content":"x",'),
        _with_duplicate(base, '"content":"You', '"content":"a \\"quoted\\" one",'),
        _with_duplicate(tricky, '"max_tokens"', '"user":"dup",'),
        _with_duplicate(base, '"max_tokens"', '"a\\"b":1,"a\\"b":1,'),
        # a duplicate whose lost quote an escape could stand in for
        _with_duplicate(base, '"max_tokens"', '"stop":"\\u0022",'),
        _with_duplicate(base, '"max_tokens"', '"stop":"x","stop":"\\u0022\\u0022",'),
        _with_duplicate(base, '"max_tokens"', '"stop":"\\"","stop":"\\"",'),
        _with_duplicate(base, '"max_tokens"', '"stop":"x","stop":"\\u0022\\u0022\\u0022\\u0022",'),
        base.replace("terse.", "terse \\u0022really\\u0022."),
        base.replace("terse.", "terse \\u003a \\n \\t \\\\ \\/."),
        # not finite, not complete, not alone
        base.replace('"max_tokens":50', '"max_tokens":NaN'),
        base.replace('"max_tokens":50', '"temperature":Infinity'),
        base + " ",
        " " + base,
        base + "\r",
        base + "{}",
        base[:-1],
        base.replace("}}", "}} // comment"),
        # wrong types and values the fast path passes on
        base.replace('"POST"', '"GET"'),
        base.replace('"/v1/chat/completions"', '"/v1/completions"'),
        base.replace('"max_tokens":50', '"max_tokens":0'),
        base.replace('"max_tokens":50', '"max_tokens":"50"'),
        base.replace('"max_tokens":50', '"max_tokens":true'),
        base.replace('"max_tokens":50', '"stream":true'),
        base.replace('"max_tokens":50', '"stream":false'),
        base.replace('"max_tokens":50', '"n":2'),
        base.replace('"max_tokens":50', '"tools":[{"type":"function"}]'),
        base.replace('"max_tokens":50', '"logit_bias":{"1":2,"1":3}'),
        base.replace('{"role":"system","content":"You are terse."}', '"hi"'),
        base.replace(
            '{"role":"system","content":"You are terse."}', '{"role":"user","content":"a","name":"b"}'
        ),
        base.replace('"role":"system"', '"role":"robot"'),
        base.replace('"role":"system"', '"role":["system"]'),
        base.replace('"content":"You are terse."', '"content":[{"type":"text","text":"hi","text":"x"}]'),
        base.replace('"content":"You are terse."', '"content":null'),
        base.replace('"r-0"', '""'),
        base.replace('"r-0"', "7"),
        base.replace(MODEL, ""),
        base.replace(',"max_tokens":50', ',"name":"x"').replace('"body":{', '"body":{"extra":1,'),
        '{"custom_id":"r-9","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}',
        '{"custom_id":"r-9","method":"POST","url":"/v1/chat/completions","extra":1,"body":{}}',
        "[]",
        '"text"',
    ]
    # One custom_id per line: a repeated id alone would send a line down the strict path.
    return [line.replace('"r-0"', f'"v-{index}"') for index, line in enumerate(lines)]


def _mutations(seed: int, count: int) -> list[str]:
    """Random lines: a valid line with a random duplicate key, escape or quote put somewhere in it."""
    rng = random.Random(seed)
    pieces = [
        '"',
        '\\"',
        "\\u0022",
        ":",
        '"k":1,',
        '"model":"m",',
        '"role":"user",',
        '"content":"c",',
        "\\\\",
    ]
    out = []
    for n in range(count):
        text = _dump(_line(n, user=rng.choice(["a", 'q"q', "x:y", "\\"])))
        starts = [i for i, ch in enumerate(text) if ch in '{,"']
        at = rng.choice(starts) + 1
        out.append(text[:at] + rng.choice(pieces) + text[at:])
    return out


def _problems(tmp_path, lines: list[str], name: str) -> list[str]:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    try:
        validate_request_file(path, max_requests=None, max_bytes=None, max_errors=10_000)
    except KlusterRequestFileError as exc:
        return list(exc.errors)
    return []


@pytest.fixture
def strict_only(monkeypatch):
    def switch_off():
        monkeypatch.setattr(request_files._LineChecker, "check_common", lambda self, raw: False)

    return switch_off


def _compare(tmp_path, strict_only, lines):
    fast = _problems(tmp_path, lines, "fast.jsonl")
    strict_only()
    strict = _problems(tmp_path, lines, "strict.jsonl")
    assert fast == strict
    return fast


def test_every_variant_gets_the_strict_verdict(tmp_path, strict_only):
    lines = _variants()
    problems = _compare(tmp_path, strict_only, lines)
    # The comparison means something only if the variants hold both kinds of line.
    flagged = {int(p.split(":")[0].removeprefix("line ")) for p in problems}
    assert flagged.isdisjoint({1, 2, 3, 14})  # valid lines, one with a \u0022 escape
    assert {4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17} <= flagged  # every duplicate key is refused


def test_random_duplicates_and_escapes_get_the_strict_verdict(tmp_path, strict_only):
    lines = _mutations(seed=20261204, count=3000)
    problems = _compare(tmp_path, strict_only, lines)
    assert 0 < len(problems) < len(lines)


def test_the_fast_path_takes_the_common_lines(tmp_path):
    """A speed property, checked by counting, not timing: the common shape is not sent to the strict parse."""
    checker = request_files._LineChecker(known_models=None, max_errors=20)
    raws = [(_dump(_line(n, temperature=0.2, user='a "b": c')) + "\n").encode() for n in range(50)]
    raws += [
        (_dump(_line(n)).replace("terse.", 'terse, \\"really\\"') + "\n").encode() for n in range(50, 60)
    ]
    assert all(checker.check_common(raw) for raw in raws)
    assert checker.models == {MODEL}
    # ... and a duplicate id is left to the strict path, which words it.
    assert not checker.check_common(raws[0])


def test_a_duplicate_id_found_fast_is_named_with_its_first_line(tmp_path):
    lines = [_dump(_line(n)) for n in range(5)] + [_dump(_line(2))]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(KlusterRequestFileError) as info:
        validate_request_file(path)
    assert info.value.errors == ["line 6: duplicate custom_id 'r-2' (first used on line 3)"]


# -- building: after one prompt line passed every check, the others get only their ids checked --------------


def _write_problems(tmp_path, items, name, **kwargs) -> list[str]:
    try:
        request_files.write_request_file(items, tmp_path / name, model=MODEL, **kwargs)
    except KlusterRequestFileError as exc:
        return list(exc.errors)
    return []


@pytest.mark.parametrize(
    ("items", "kwargs"),
    [
        (["a", "b", {"custom_id": "request-3", "messages": [{"role": "user", "content": "c"}]}, "d"], {}),
        (["a", {"messages": [{"role": "user", "content": "x"}], "custom_id": "request-0"}, "b"], {}),
        (["a", "b", "c"], {"body_defaults": {"temperature": "hot", "n": 2}}),
        (["a", {"custom_id": "x", "body": {"messages": []}}, "b", "c"], {}),
        (
            ["a", {"custom_id": "-2", "messages": [{"role": "user", "content": "x"}]}, "b"],
            {"custom_id_prefix": ""},
        ),
        ([f"p{i}" for i in range(30)], {"body_defaults": {"stream": True}, "max_errors": 5}),
    ],
)
def test_building_gets_the_full_checks_verdict(tmp_path, monkeypatch, items, kwargs):
    fast = _write_problems(tmp_path, items, "fast.jsonl", **kwargs)
    built = request_files._built_lines
    monkeypatch.setattr(
        request_files, "_built_lines", lambda *args: ((line, False) for line, _ in built(*args))
    )
    full = _write_problems(tmp_path, items, "full.jsonl", **kwargs)
    assert fast == full
    assert fast  # every case holds a problem
    assert not list(tmp_path.iterdir())  # nothing written either way


def test_built_prompt_lines_are_the_lines_build_request_lines_gives(tmp_path):
    items = ["a", {"messages": [{"role": "user", "content": "x"}], "temperature": 1}, "b"]
    kwargs = {
        "model": MODEL,
        "body_defaults": {"temperature": 0.2, "model": "ignored", "messages": "ignored"},
    }
    path = tmp_path / "built.jsonl"
    request_files.write_request_file(items, path, **kwargs)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == list(request_files.build_request_lines(items, **kwargs))
    assert written[0]["body"] == {
        "messages": [{"role": "user", "content": "a"}],
        "model": MODEL,
        "temperature": 0.2,
    }
