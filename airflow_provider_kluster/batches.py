"""The batch object as kluster.ai returns it, normalized: statuses, timestamps, errors, counts.

Also the batch API's wire constants (endpoint, completion windows, kluster's own metadata options), one
definition each, for the hook and the pure modules alike.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

#: The only endpoint kluster.ai accepts for batches (and the ``url`` of every request line).
BATCH_ENDPOINT = "/v1/chat/completions"
#: The completion windows kluster.ai accepts (its request schema's enum; ``asap``: as soon as possible).
COMPLETION_WINDOWS = ("24h", "48h", "72h", "asap")
#: The metadata key under which kluster.ai reads its own batch options.
KLUSTER_METADATA_KEY = "@kluster.ai"
#: kluster's own batch options (sent under :data:`KLUSTER_METADATA_KEY`).
KLUSTER_OPTIONS = frozenset({"greedy", "strict_completion_window", "remove_input_after_processing"})

TIMESTAMP_FIELDS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class BatchStatus(str, Enum):
    """Lifecycle status of a kluster.ai batch."""

    PRE_SCHEDULE = "pre_schedule"
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @classmethod
    def parse(cls, value: object) -> BatchStatus | None:
        """Match a wire status case-insensitively, also in PascalCase (``InProgress``); ``None`` if unknown."""
        if isinstance(value, BatchStatus):
            return value
        if not isinstance(value, str):
            return None
        key = (
            re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", value.strip()).replace("-", "_").replace(" ", "_").lower()
        )
        try:
            return cls(key)
        except ValueError:
            return None

    @classmethod
    def terminal(cls) -> frozenset[BatchStatus]:
        """Return the statuses a batch never leaves."""
        return frozenset({cls.COMPLETED, cls.FAILED, cls.EXPIRED, cls.CANCELLED})

    def is_terminal(self) -> bool:
        """Tell whether the batch has stopped for good."""
        return self in self.terminal()


def parse_timestamp(value: object) -> dt.datetime | None:
    """Turn a wire timestamp into an aware UTC datetime.

    Accepts epoch seconds as an int or float, a numeric string (``"1733832777"``), an ISO-8601 string with
    nanoseconds (``"2024-10-07T12:45:38.109049154Z"``), ``None`` or an empty string. Anything else is logged
    and read as ``None`` rather than failing a long wait on one odd field.
    """
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return _from_epoch(float(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            return _from_epoch(float(text))
        except ValueError:
            pass
        # Python's fromisoformat takes at most microseconds: trim longer fractions.
        text = re.sub(r"(\.\d{6})\d+", r"\1", text)
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            log.warning("Ignoring unreadable timestamp %r", value)
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.timezone.utc)
        return parsed.astimezone(dt.timezone.utc)
    log.warning("Ignoring unreadable timestamp %r", value)
    return None


def _from_epoch(seconds: float) -> dt.datetime:
    if seconds > 1e11:  # milliseconds
        seconds /= 1000.0
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def parse_errors(value: object) -> list[str]:
    """Flatten the four wire shapes of ``errors`` into a list of messages.

    ``null``, ``[]``, a list of strings, or ``{"object": "list", "data": [{code, message, param, line}]}``.
    """
    if value is None:
        return []
    if isinstance(value, dict):
        items = value.get("data")
        if items is None:
            items = [value] if ("message" in value or "code" in value) else []
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return [str(value)]
    messages = []
    for item in items or ():
        if isinstance(item, dict):
            text = str(item.get("message") or item.get("code") or item)
            if item.get("line") is not None:
                text = f"line {item['line']}: {text}"
            if item.get("code") and item.get("message"):
                text = f"{text} ({item['code']})"
            messages.append(text)
        elif item is not None:
            messages.append(str(item))
    return messages


@dataclass(frozen=True)
class RequestCounts:
    """How many requests a batch holds and how many finished each way."""

    total: int = 0
    completed: int = 0
    failed: int = 0

    @classmethod
    def parse(cls, value: object) -> RequestCounts:
        """Read ``request_counts`` from the wire, tolerating a missing object or numeric strings."""
        if not isinstance(value, dict):
            return cls()

        def num(key: str) -> int:
            try:
                return int(value.get(key) or 0)
            except (TypeError, ValueError):
                return 0

        return cls(total=num("total"), completed=num("completed"), failed=num("failed"))

    @property
    def done(self) -> int:
        """Return how many requests have finished, successfully or not."""
        return self.completed + self.failed

    def to_dict(self) -> dict[str, int]:
        """Return a JSON-native dict."""
        return {"total": self.total, "completed": self.completed, "failed": self.failed}


@dataclass(frozen=True)
class KlusterBatch:
    """A kluster.ai batch, normalized from whichever wire form the API used.

    ``status`` is a :class:`BatchStatus`, or ``None`` when the API sent a status this provider does not know
    (``raw_status`` keeps it); an unknown status is treated as still running, never as success.
    """

    id: str
    status: BatchStatus | None
    raw_status: str | None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    endpoint: str | None = None
    completion_window: str | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    errors: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: dt.datetime | None = None
    in_progress_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    finalizing_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    failed_at: dt.datetime | None = None
    expired_at: dt.datetime | None = None
    cancelling_at: dt.datetime | None = None
    cancelled_at: dt.datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_api(cls, payload: dict[str, Any]) -> KlusterBatch:
        """Build the view from a batch object as the API returned it."""
        raw_status = payload.get("status")
        status = BatchStatus.parse(raw_status)
        if status is None:
            log.warning(
                "Batch %s has a status this provider does not know: %r", payload.get("id"), raw_status
            )
        metadata = payload.get("metadata")
        return cls(
            id=str(payload.get("id") or ""),
            status=status,
            raw_status=None if raw_status is None else str(raw_status),
            input_file_id=payload.get("input_file_id") or None,
            output_file_id=payload.get("output_file_id") or None,
            error_file_id=payload.get("error_file_id") or None,
            endpoint=payload.get("endpoint"),
            completion_window=payload.get("completion_window"),
            request_counts=RequestCounts.parse(payload.get("request_counts")),
            errors=parse_errors(payload.get("errors")),
            metadata=dict(metadata) if isinstance(metadata, dict) else {},
            raw=dict(payload),
            **{name: parse_timestamp(payload.get(name)) for name in TIMESTAMP_FIELDS},
        )

    @property
    def timestamps(self) -> dict[str, dt.datetime | None]:
        """Return every lifecycle timestamp by its wire name (``created_at``, …), ``None`` where unset."""
        return {name: getattr(self, name) for name in TIMESTAMP_FIELDS}

    @property
    def status_text(self) -> str:
        """Return the status as a string: the known value, or what the API sent."""
        return self.status.value if self.status else (self.raw_status or "unknown")

    @property
    def is_terminal(self) -> bool:
        """Tell whether the batch has stopped for good (an unknown status is not terminal)."""
        return self.status is not None and self.status.is_terminal()

    @property
    def is_running(self) -> bool:
        """Tell whether the batch may still change: not terminal, including unknown statuses."""
        return not self.is_terminal

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-native summary, fit for XCom and trigger events (timestamps as ISO-8601)."""
        return {
            "id": self.id,
            "status": self.status_text,
            "input_file_id": self.input_file_id,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "completion_window": self.completion_window,
            "request_counts": self.request_counts.to_dict(),
            "errors": list(self.errors),
            "metadata": self.metadata,
            **{name: (ts.isoformat() if ts else None) for name, ts in self.timestamps.items()},
        }
