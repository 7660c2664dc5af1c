"""The job's pure rules: shards, what is retryable, settling attempts into one record per request, stalls."""

from __future__ import annotations

import io
import json

import pytest

from airflow_provider_kluster import jobs
from airflow_provider_kluster.batches import KlusterBatch
from airflow_provider_kluster.exceptions import KlusterRequestFileError, KlusterTransientAPIError
from airflow_provider_kluster.jobs import (
    BatchFiles,
    JobWatch,
    parse_part_label,
    part_label,
    settle,
    write_shards,
)
from airflow_provider_kluster.results import parse_result_line
from tests.helpers import MODEL, request_lines


def raw_lines(n: int, prefix: str = "r") -> list[bytes]:
    return [(json.dumps(line) + "\n").encode() for line in request_lines(n, prefix=prefix)]


def ok(custom_id: str, tokens: int = 10) -> dict:
    return {
        "id": f"line-{custom_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "body": {
                "model": MODEL,
                "choices": [{"message": {"role": "assistant", "content": f"answer {custom_id}"}}],
                "usage": {"prompt_tokens": tokens, "completion_tokens": tokens, "total_tokens": 2 * tokens},
            },
        },
    }


def failed(custom_id: str, status: int, code: str = "server_error") -> dict:
    return {
        "id": f"line-{custom_id}",
        "custom_id": custom_id,
        "response": {"status_code": status, "body": {"error": {"message": f"HTTP {status}", "code": code}}},
    }


def write(path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_part_labels_round_trip():
    assert part_label(2, 7) == "a2s0007"
    assert parse_part_label("a2s0007") == (2, 7)
    assert parse_part_label("a12s10000") == (12, 10000)
    for bad in (None, "", "x1s1", "a1", "as1", "a1s", "a-1s2", 7):
        assert parse_part_label(bad) is None


@pytest.mark.parametrize(
    ("n", "max_requests", "max_bytes", "expected"),
    [
        (25, 10, None, [10, 10, 5]),
        (10, 10, None, [10]),
        (1, 10, None, [1]),
        (9, None, None, [9]),
    ],
)
def test_shards_respect_the_request_limit(tmp_path, n, max_requests, max_bytes, expected):
    shards = write_shards(raw_lines(n), tmp_path, attempt=1, max_requests=max_requests, max_bytes=max_bytes)
    assert [s.requests for s in shards] == expected
    assert [s.label for s in shards] == [part_label(1, i) for i in range(len(expected))]
    joined = b"".join(open(s.path, "rb").read() for s in shards)
    assert joined == b"".join(raw_lines(n)), "shards keep every line, byte for byte, in order"


def test_shards_respect_the_byte_limit_and_refuse_a_line_too_big(tmp_path):
    lines = raw_lines(20)
    limit = sum(len(x) for x in lines[:3]) + 1  # three lines fit, four do not
    shards = write_shards(lines, tmp_path, attempt=1, max_requests=None, max_bytes=limit)
    assert all(s.bytes <= limit for s in shards)
    assert sum(s.requests for s in shards) == 20
    assert [s.requests for s in shards][:2] == [3, 3]
    with pytest.raises(KlusterRequestFileError, match=r"line 1 alone is \d+ bytes"):
        write_shards(lines, tmp_path / "x", attempt=1, max_requests=None, max_bytes=len(lines[0]) - 1)


def test_shard_digest_is_of_its_bytes(tmp_path):
    import hashlib

    (shard,) = write_shards(raw_lines(3), tmp_path, attempt=1, max_requests=None, max_bytes=None)
    assert shard.sha256 == hashlib.sha256(open(shard.path, "rb").read()).hexdigest()


@pytest.mark.parametrize(
    ("line", "retryable"),
    [
        (failed("x", 500), True),
        (failed("x", 503, "service_unavailable"), True),
        (failed("x", 429, "rate_limit_exceeded"), True),
        (failed("x", 408, "timeout"), True),
        (failed("x", 400, "invalid_request_error"), False),
        (failed("x", 404, "model_not_found"), False),
        (failed("x", 401, "invalid_api_key"), False),
        ({"custom_id": "x", "error": {"code": "batch_expired", "message": "expired"}}, True),
        ({"custom_id": "x", "error": {"code": "invalid_request", "message": "bad"}}, False),
        ({"custom_id": "x", "error": {"message": "something broke"}}, True),
    ],
)
def test_what_is_retryable(line, retryable):
    assert jobs.is_retryable(parse_result_line(json.dumps(line))) is retryable


def test_a_success_is_never_retryable():
    assert not jobs.is_retryable(parse_result_line(json.dumps(ok("x"))))


def settle_now(tmp_path, n, ended, *, attempts_done, max_attempts=3):
    records, retry = io.StringIO(), io.BytesIO()
    tally = settle(
        raw_lines(n),
        sum(len(x) for x in raw_lines(n)),
        ended,
        attempts_done=attempts_done,
        max_attempts=max_attempts,
        workdir=tmp_path,
        records=records,
        retry=retry,
    )
    out = [json.loads(line) for line in records.getvalue().splitlines()]
    again = [json.loads(line)["custom_id"] for line in retry.getvalue().splitlines()]
    return tally, {r["custom_id"]: r for r in out}, out, again


def test_settle_follows_each_request_through_its_attempts(tmp_path):
    """r-0..r-9: attempt 1 answers most; 500s and a lost one go again; a 400 is final; attempt 2 fixes the rest."""
    first = [ok(f"r-{i}") for i in range(6)] + [failed("r-6", 500), failed("r-7", 429, "rate_limit_exceeded")]
    errors = [failed("r-8", 400, "invalid_request_error")]  # r-9: never came back
    a1 = BatchFiles("b1", 1, write(tmp_path / "b1.out", first), write(tmp_path / "b1.err", errors))
    tally, by_id, out, again = settle_now(tmp_path, 10, [a1], attempts_done=1)
    assert sorted(again) == ["r-6", "r-7", "r-9"]
    assert (tally.succeeded, tally.failed_permanent, tally.failed_retryable, tally.missing) == (6, 1, 2, 1)
    assert tally.to_retry == 3
    # attempt 2 held exactly those: r-6 succeeds, r-7 fails again (retryable), r-9 is answered
    a2 = BatchFiles(
        "b2",
        2,
        write(tmp_path / "b2.out", [ok("r-6"), ok("r-9"), failed("r-7", 503)]),
        None,
    )
    tally, by_id, out, again = settle_now(tmp_path, 10, [a1, a2], attempts_done=2, max_attempts=2)
    assert len(out) == len(by_id) == 10, "exactly one record per custom_id"
    assert again == [], "no attempts left"
    assert by_id["r-6"]["status"] == "succeeded"
    assert by_id["r-6"]["attempts"] == 2
    assert by_id["r-6"]["batch_id"] == "b2"
    assert by_id["r-0"]["attempts"] == 1
    assert by_id["r-0"]["batch_id"] == "b1"
    assert by_id["r-8"]["status"] == "failed"
    assert by_id["r-8"]["retryable"] is False
    assert by_id["r-8"]["attempts"] == 1, "a permanent failure is not sent again"
    assert by_id["r-7"]["status"] == "failed"
    assert by_id["r-7"]["retryable"] is True
    assert by_id["r-7"]["attempts"] == 2
    assert tally.total == tally.succeeded + tally.failed + tally.missing == 10
    assert (tally.succeeded, tally.failed, tally.missing) == (8, 2, 0)
    assert tally.ended_at_attempt == {"1": 7, "2": 3}


def test_settle_success_wins_over_a_failure_of_the_same_attempt_and_counts_duplicates(tmp_path):
    a1 = BatchFiles(
        "b1",
        1,
        write(tmp_path / "o", [ok("r-0"), ok("r-0"), failed("r-1", 500)]),
        write(tmp_path / "e", [failed("r-0", 500), ok("r-1")]),
    )
    tally, by_id, _, again = settle_now(tmp_path, 2, [a1], attempts_done=1)
    assert by_id["r-0"]["status"] == by_id["r-1"]["status"] == "succeeded"
    assert again == []
    assert tally.duplicates == 3  # r-0 twice more, r-1 once more


def test_settle_counts_unexpected_and_unparseable_lines_but_never_records_them(tmp_path):
    out = tmp_path / "o"
    out.write_text(json.dumps(ok("r-0")) + "\nnot json\n" + json.dumps(ok("stranger")) + "\n")
    tally, by_id, records, _ = settle_now(tmp_path, 1, [BatchFiles("b1", 1, str(out))], attempts_done=1)
    assert list(by_id) == ["r-0"]
    assert len(records) == 1
    assert tally.unexpected == 1
    assert tally.unparseable == 1


def test_settle_usage_counts_every_answer_paid_for(tmp_path):
    a1 = BatchFiles("b1", 1, write(tmp_path / "1", [ok("r-0", 5), failed("r-1", 500)]))
    a2 = BatchFiles("b2", 2, write(tmp_path / "2", [ok("r-1", 7)]))
    tally, *_ = settle_now(tmp_path, 2, [a1, a2], attempts_done=2)
    assert tally.usage_by_model[MODEL]["prompt_tokens"] == 12
    assert tally.usage["total_tokens"] == 24


def test_settle_with_many_buckets_gives_the_same_records(tmp_path, monkeypatch):
    first = [ok(f"r-{i}") for i in range(0, 300, 2)] + [failed(f"r-{i}", 500) for i in range(1, 300, 4)]
    a1 = BatchFiles("b1", 1, write(tmp_path / "o", first))
    one = settle_now(tmp_path, 300, [a1], attempts_done=1)
    monkeypatch.setattr(jobs, "BUCKET_BYTES", 2_000)
    assert jobs.bucket_count(60_000) > 10
    many = settle_now(tmp_path, 300, [a1], attempts_done=1)
    listed = ("failed_ids", "missing_ids")  # the first few, in bucket order
    assert {k: v for k, v in one[0].to_dict().items() if k not in listed} == {
        k: v for k, v in many[0].to_dict().items() if k not in listed
    }
    assert one[1] == many[1], "the same record per id, whatever the number of buckets"
    assert sorted(one[3]) == sorted(many[3])
    assert len(many[2]) == 300
    assert not list(tmp_path.glob("settle-*")), "bucket files are removed"


def batch(batch_id: str, status: str = "in_progress", done: int = 0, total: int = 100) -> KlusterBatch:
    return KlusterBatch.from_api(
        {
            "id": batch_id,
            "status": status,
            "request_counts": {"total": total, "completed": done, "failed": 0},
            "created_at": 1_700_000_000,
        }
    )


def test_watch_fires_once_all_ended():
    watch = JobWatch(["a", "b"], poll_interval=5, deadline=None, max_consecutive_errors=3)
    event, delay = watch.observe({"a": batch("a", "completed", 100), "b": batch("b", done=10)}, 1000.0)
    assert event is None
    assert delay == 5
    assert watch.pending == ["b"]
    event, _ = watch.observe({"b": batch("b", "failed")}, 1005.0)
    assert event is not None
    assert event["status"] == "ended"
    assert set(event["batches"]) == {"a", "b"}
    assert event["running"] == []
    json.dumps(event)


def test_watch_fires_on_first_end_when_shards_wait_for_a_slot():
    watch = JobWatch(
        ["a", "b"], poll_interval=5, deadline=None, max_consecutive_errors=3, fire_on_first_end=True
    )
    event, _ = watch.observe({"a": batch("a", "completed", 100), "b": batch("b", done=10)}, 1000.0)
    assert event["status"] == "ended"
    assert event["running"] == ["b"]


def test_watch_catches_a_stall_only_while_in_progress_and_carries_the_clock():
    watch = JobWatch(["a"], poll_interval=5, deadline=None, max_consecutive_errors=3, stall_timeout=60)
    assert watch.observe({"a": batch("a", done=10)}, 1000.0)[0] is None
    assert watch.observe({"a": batch("a", done=20)}, 1030.0)[0] is None  # moved: the clock restarts
    assert watch.observe({"a": batch("a", done=20)}, 1089.0)[0] is None
    event, _ = watch.observe({"a": batch("a", done=20)}, 1090.0)
    assert event["status"] == "stalled"
    assert event["stalled"] == ["a"]
    assert event["progress"]["a"] == [20, 1030.0]
    # validating or finalizing never stalls
    slow = JobWatch(["v"], poll_interval=5, deadline=None, max_consecutive_errors=3, stall_timeout=60)
    for t in range(0, 600, 50):
        assert slow.observe({"v": batch("v", "finalizing", done=100)}, float(t))[0] is None
    # a new wait started from the carried progress keeps the clock
    again = JobWatch(
        ["a"],
        poll_interval=5,
        deadline=None,
        max_consecutive_errors=3,
        stall_timeout=60,
        progress={"a": [20, 1030.0]},
    )
    assert again.observe({"a": batch("a", done=20)}, 1091.0)[0]["status"] == "stalled"


def test_watch_without_stall_timeout_never_stalls():
    watch = JobWatch(["a"], poll_interval=5, deadline=None, max_consecutive_errors=3)
    for t in range(0, 100_000, 5_000):
        assert watch.observe({"a": batch("a", done=1)}, float(t))[0] is None


def test_watch_gives_up_after_consecutive_errors_and_at_the_deadline():
    watch = JobWatch(["a"], poll_interval=1, deadline=None, max_consecutive_errors=2)
    boom = KlusterTransientAPIError("HTTP 503", call="get batch", resource_id="a", status_code=503)
    assert watch.observe({"a": boom}, 0.0)[0] is None
    assert watch.observe({"a": boom}, 1.0)[0] is None
    event, _ = watch.observe({"a": boom}, 2.0)
    assert event["status"] == "error"
    assert event["running"] == ["a"]
    late = JobWatch(["a"], poll_interval=1, deadline=100.0, max_consecutive_errors=2)
    event, _ = late.observe({"a": batch("a", done=1)}, 101.0)
    assert event["status"] == "timeout"


def test_progress_line_describes_the_whole_job():
    watch = JobWatch(
        ["a", "b"],
        poll_interval=1,
        deadline=None,
        max_consecutive_errors=2,
        job_total=1000,
        job_done_before=100,
    )
    watch.observe({"a": batch("a", done=0), "b": batch("b", done=0)}, 0.0)
    watch.describe(0.0)
    watch.observe({"a": batch("a", done=200), "b": batch("b", done=100)}, 10.0)
    line = watch.describe(10.0)
    assert "400 of 1,000 requests done (40%)" in line
    assert "2 of 2 batch(es) running" in line
    assert "ETA" in line


def test_watch_event_shape_is_checked():
    with pytest.raises(ValueError, match="unexpected job wait event"):
        jobs.check_watch_event({"status": "success"})
    assert jobs.check_watch_event({"status": "ended"})["status"] == "ended"


def test_duplicate_ids_are_found_on_disk_in_any_number_of_buckets(tmp_path, monkeypatch):
    lines = raw_lines(500)
    lines[300] = lines[7]  # line 301 repeats line 8's id
    lines[450] = lines[7]
    size = sum(len(x) for x in lines)
    expected = [
        "line 301: duplicate custom_id 'r-7' (first used on line 8)",
        "line 451: duplicate custom_id 'r-7' (first used on line 8)",
    ]
    assert jobs.duplicate_ids(lines, size, tmp_path) == expected
    monkeypatch.setattr(jobs, "BUCKET_BYTES", 100)
    assert jobs.bucket_count(size // 4) > 50
    assert jobs.duplicate_ids(lines, size, tmp_path) == expected
    assert jobs.duplicate_ids(raw_lines(500), size, tmp_path) == []
    assert not list(tmp_path.glob("ids-*"))
