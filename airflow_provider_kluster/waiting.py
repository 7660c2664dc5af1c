"""What waiting for a batch produces: progress lines, the one trigger event, and the verdict drawn from it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch
from airflow_provider_kluster.exceptions import (
    KlusterBatchCancelledError,
    KlusterBatchError,
    KlusterBatchExpiredError,
    KlusterBatchFailedError,
    KlusterBatchTimeoutError,
    KlusterError,
)

#: Event status for each terminal batch status.
EVENT_STATUS = {
    BatchStatus.COMPLETED: "success",
    BatchStatus.FAILED: "failed",
    BatchStatus.EXPIRED: "expired",
    BatchStatus.CANCELLED: "cancelled",
}
EVENT_STATUSES = frozenset({"success", "failed", "expired", "cancelled", "timeout", "error"})

_ADVICE = {
    "failed": "Check kluster's errors above, fix the request file, and submit again.",
    "expired": "Its completion window passed first; results that finished are in its output file. "
    "Submit the rest with a longer completion_window.",
    "cancelled": "It was cancelled (by a user, on-call, or this provider on kill or timeout); "
    "requests that finished are in its output file.",
}


@dataclass
class Progress:
    """Turn successive polls of one batch into ``done/total, failed, rate, ETA`` lines."""

    first_done: int | None = None
    first_time: float = field(default_factory=time.monotonic)

    def describe(self, batch: KlusterBatch) -> str:
        """Return one progress line for the batch as just polled."""
        counts = batch.request_counts
        now = time.monotonic()
        if self.first_done is None:
            self.first_done, self.first_time = counts.done, now
        elapsed = now - self.first_time
        rate = (counts.done - self.first_done) / elapsed if elapsed > 0 else 0.0
        line = (
            f"Batch {batch.id} {batch.status_text}: {counts.done}/{counts.total} done, {counts.failed} failed"
        )
        if rate > 0:
            remaining = max(counts.total - counts.done, 0)
            line += f", {rate:.2f} req/s, ETA {_duration(remaining / rate)}"
        return line


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def make_event(
    status: str, batch_id: str, *, batch: KlusterBatch | None = None, message: str
) -> dict[str, Any]:
    """Build the JSON-native payload of the one event a wait ends with."""
    return {
        "status": status,
        "batch_id": batch_id,
        "batch_status": batch.status_text if batch else None,
        "request_counts": batch.request_counts.to_dict() if batch else None,
        "output_file_id": batch.output_file_id if batch else None,
        "error_file_id": batch.error_file_id if batch else None,
        "errors": list(batch.errors) if batch else [],
        "message": message,
    }


def event_for_batch(batch: KlusterBatch) -> dict[str, Any]:
    """Build the event for a batch that reached a terminal status."""
    status = EVENT_STATUS[batch.status]  # type: ignore[index]
    counts = batch.request_counts
    message = (
        f"Batch {batch.id} {batch.status_text}: {counts.completed} of {counts.total} requests succeeded, "
        f"{counts.failed} failed."
    )
    if batch.errors:
        message += " kluster errors: " + "; ".join(batch.errors[:5])
    if status in _ADVICE:
        message += " " + _ADVICE[status]
    return make_event(status, batch.id, batch=batch, message=message)


def validate_event(event: object, batch_id: str | None = None) -> dict[str, Any]:
    """Check a resumed event before anything trusts it; return it.

    :raises KlusterError: The event is not a dict with a known ``status``, a ``batch_id`` (the expected one
        when given) and a ``message``.
    """
    if not isinstance(event, dict):
        raise KlusterError(f"Batch {batch_id}: the wait resumed with no usable event ({event!r}).")
    status = event.get("status")
    if status not in EVENT_STATUSES or not event.get("batch_id") or "message" not in event:
        raise KlusterError(f"Batch {batch_id}: the wait resumed with a malformed event {event!r}.")
    if batch_id is not None and event["batch_id"] != batch_id:
        raise KlusterError(
            f"The wait for batch {batch_id} resumed with an event for batch {event['batch_id']}; refusing it."
        )
    return event


def raise_for_event(event: dict[str, Any]) -> None:
    """Raise the exception that an unsuccessful event stands for; return quietly on ``success``."""
    status = event["status"]
    if status == "success":
        return
    exc_class: type[KlusterBatchError] = {
        "failed": KlusterBatchFailedError,
        "expired": KlusterBatchExpiredError,
        "cancelled": KlusterBatchCancelledError,
        "timeout": KlusterBatchTimeoutError,
    }.get(status, KlusterBatchError)
    raise exc_class(
        event["message"],
        batch_id=event["batch_id"],
        status=event.get("batch_status") or status,
        errors=event.get("errors") or [],
    )
