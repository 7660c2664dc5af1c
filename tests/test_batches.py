"""The normalized batch view: every wire quirk of kluster.ai's batch object."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch, parse_errors, parse_timestamp
from tests.helpers import FIXTURES

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 12, 10, 12, 12, 57, tzinfo=UTC)  # 1733832777


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (1733832777, T0),
        ("1733832777", T0),
        (1733832777000, T0),
        (1733832777.0, T0),
        ("2024-12-10T12:12:57Z", T0),
        ("2024-12-10T12:12:57.109049154Z", T0.replace(microsecond=109049)),
        ("2024-12-10T14:12:57+02:00", T0),
        ("2024-12-10T12:12:57", T0),
        (None, None),
        ("", None),
        ("not a time", None),
        (True, None),
    ],
    ids=[
        "int",
        "numeric-string",
        "milliseconds",
        "float",
        "iso-z",
        "iso-nanoseconds",
        "iso-offset",
        "iso-naive-is-utc",
        "null",
        "empty",
        "garbage",
        "bool",
    ],
)
def test_timestamps_in_every_wire_form(wire, expected):
    parsed = parse_timestamp(wire)
    assert parsed == expected
    if parsed is not None:
        assert parsed.tzinfo is not None


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("in_progress", BatchStatus.IN_PROGRESS),
        ("InProgress", BatchStatus.IN_PROGRESS),
        ("IN_PROGRESS", BatchStatus.IN_PROGRESS),
        ("Validating", BatchStatus.VALIDATING),
        ("pre_schedule", BatchStatus.PRE_SCHEDULE),
        ("PreSchedule", BatchStatus.PRE_SCHEDULE),
        ("Completed", BatchStatus.COMPLETED),
        ("cancelled", BatchStatus.CANCELLED),
        ("queued_somewhere_new", None),
        (None, None),
    ],
    ids=lambda v: str(v),
)
def test_status_matching(wire, expected):
    assert BatchStatus.parse(wire) is expected


def test_terminal_statuses():
    terminal = {s for s in BatchStatus if s.is_terminal()}
    assert terminal == {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}


def test_unknown_status_is_kept_and_running_never_success():
    batch = KlusterBatch.from_api({"id": "b1", "status": "Rebalancing"})
    assert batch.status is None
    assert batch.raw_status == "Rebalancing"
    assert batch.status_text == "Rebalancing"
    assert batch.is_running
    assert not batch.is_terminal


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (None, []),
        ([], []),
        (["bad line 3", "bad line 9"], ["bad line 3", "bad line 9"]),
        (
            {
                "object": "list",
                "data": [{"code": "invalid_json", "message": "Bad JSON", "param": None, "line": 3}],
            },
            ["line 3: Bad JSON (invalid_json)"],
        ),
        ({"object": "list", "data": []}, []),
        ({"message": "boom"}, ["boom"]),
    ],
    ids=["null", "empty-list", "strings", "openai-list", "openai-empty", "single-object"],
)
def test_errors_in_every_wire_shape(wire, expected):
    assert parse_errors(wire) == expected


def test_absent_keys_and_null_metadata():
    batch = KlusterBatch.from_api({"id": "b1", "status": "in_progress", "metadata": None})
    assert batch.output_file_id is None
    assert batch.error_file_id is None
    assert batch.cancelled_at is None
    assert batch.metadata == {}
    assert batch.request_counts.total == 0


def test_to_dict_is_json_native():
    batch = KlusterBatch.from_api(
        {
            "id": "67533f6d1d7be1b5a7507be5",
            "status": "InProgress",
            "created_at": "1733832777",
            "request_counts": {"total": 4, "completed": "2", "failed": 1},
            "errors": ["x"],
            "metadata": {"k": "v"},
        }
    )
    data = json.loads(json.dumps(batch.to_dict()))
    assert data["status"] == "in_progress"
    assert data["created_at"] == T0.isoformat()
    assert data["request_counts"] == {"total": 4, "completed": 2, "failed": 1}
    assert batch.request_counts.done == 3


@pytest.mark.parametrize(
    ("name", "status", "created_at", "expires_at", "counts", "output_file_id"),
    [
        ("batch_object.json", BatchStatus.VALIDATING, 1733832777, 1733919177, (0, 0, 0), None),
        ("batches_create.response.json", BatchStatus.VALIDATING, 1733832777, 1733919177, (0, 0, 0), None),
        (
            "batches_retrieve.response.json",
            BatchStatus.COMPLETED,
            1733832777,
            1733919177,
            (4, 4, 0),
            "myfile-123-output",
        ),
        (
            "batches_cancel.response.json",
            BatchStatus.CANCELLING,
            1730821906,
            1730821906,
            (3, 3, 0),
            "myfile-123-output",
        ),
    ],
)
def test_published_batch_examples_parse(name, status, created_at, expires_at, counts, output_file_id):
    """kluster's own examples (integer and numeric-string timestamps, explicit nulls) read as the values they print."""
    batch = KlusterBatch.from_api(json.loads((FIXTURES / name).read_text()))
    assert batch.id == "mybatch-123"
    assert batch.status is status
    assert batch.created_at == dt.datetime.fromtimestamp(created_at, UTC)
    assert batch.expires_at == dt.datetime.fromtimestamp(expires_at, UTC)
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == counts
    assert batch.output_file_id == output_file_id
    assert batch.error_file_id is None
    assert batch.errors == []
    assert batch.metadata == {}
    assert batch.input_file_id == "myfile-123"
