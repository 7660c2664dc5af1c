"""Waiting for a batch, decided in one place: what each poll (or failed poll) means, and the event a wait ends with.

:class:`WaitPolicy` holds every rule and does no I/O: it is given a batch or an API error and the time, and
answers with a :class:`Decision` — poll again after so many seconds, or end with this event. Two small loops drive
it: the trigger's async loop (in the triggerer) and :func:`run_sync_wait` (on a worker: the submit operator's
non-deferred wait, the sensor's pokes, the cancel operator's wait for ``cancelled``). So a batch, an error or a
deadline means the same thing wherever the wait runs, and the event it ends with has the same form.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch
from airflow_provider_kluster.exceptions import (
    KlusterAPIError,
    KlusterBatchCancelledError,
    KlusterBatchError,
    KlusterBatchExpiredError,
    KlusterBatchFailedError,
    KlusterBatchTimeoutError,
    KlusterError,
    KlusterWaitError,
)

#: How many failed polls in a row are tolerated; one more ends the wait (each poll already retries inside the
#: client).
DEFAULT_MAX_CONSECUTIVE_ERRORS = 5
#: Seconds between progress lines of a wait while its progress moves: at most one line a minute, however often
#: it polls (a new status is logged at once).
PROGRESS_EVERY = 60.0
#: Seconds between progress lines while nothing changes: one every five minutes shows the wait is alive.
QUIET_PROGRESS_EVERY = 300.0


class WaitOutcome(str, Enum):
    """How a wait ended: the ``status`` of its event (a ``str``, so it compares equal to the wire value)."""

    SUCCESS = "success"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


#: The outcome for each terminal batch status.
EVENT_STATUS: Mapping[BatchStatus, WaitOutcome] = {
    BatchStatus.COMPLETED: WaitOutcome.SUCCESS,
    BatchStatus.FAILED: WaitOutcome.FAILED,
    BatchStatus.EXPIRED: WaitOutcome.EXPIRED,
    BatchStatus.CANCELLED: WaitOutcome.CANCELLED,
}
#: Every event status a wait can end with.
EVENT_STATUSES: frozenset[WaitOutcome] = frozenset(WaitOutcome)

_ADVICE = {
    WaitOutcome.FAILED: "Check kluster's errors above, fix the request file, and submit again.",
    WaitOutcome.EXPIRED: "Its completion window passed first; results that finished are in its output file. "
    "Submit the rest with a longer completion_window.",
    WaitOutcome.CANCELLED: "It was cancelled while this task waited, not by this task: in the kluster.ai console "
    "or API, by another task, or by an earlier try of this one (whose log says 'Cancelling batch <id> because "
    "<who>'). Requests that finished are in its output file.",
}

_RAISES: Mapping[WaitOutcome, type[KlusterBatchError]] = {
    WaitOutcome.FAILED: KlusterBatchFailedError,
    WaitOutcome.EXPIRED: KlusterBatchExpiredError,
    WaitOutcome.CANCELLED: KlusterBatchCancelledError,
    WaitOutcome.TIMEOUT: KlusterBatchTimeoutError,
}


_NOTHING_LOGGED = object()


@dataclass
class ProgressPace:
    """Decide when a wait's progress is worth a line in the task log — not at every poll.

    A line when the wait starts and when ``urgent`` (a new status); while the progress moves (``key`` differs
    from the last line's), at most one per ``every`` seconds; while it stands still, one per ``quiet_every``
    seconds. A thousand waits polling every few seconds then write a line each when something happens, not
    one per poll.
    """

    every: float = PROGRESS_EVERY
    quiet_every: float = QUIET_PROGRESS_EVERY
    last_key: Hashable = field(default=_NOTHING_LOGGED, repr=False)
    last_at: float = 0.0

    def due(self, key: Hashable, now: float, *, urgent: bool = False) -> bool:
        """Tell whether to write a line now (``now`` in seconds, any fixed origin); if so, remember it."""
        if self.last_key is _NOTHING_LOGGED or urgent:
            due = True
        else:
            due = now - self.last_at >= (self.every if key != self.last_key else self.quiet_every)
        if due:
            self.last_key, self.last_at = key, now
        return due


@dataclass
class Progress:
    """Turn successive polls of one batch into ``done/total, failed, rate, ETA`` lines, and pace them."""

    first_done: int | None = None
    first_time: float = field(default_factory=time.monotonic)
    pace: ProgressPace = field(default_factory=ProgressPace)

    def line_due(self, batch: KlusterBatch, now: float) -> str:
        """Return the progress line if one is due at this poll (see :class:`ProgressPace`), else ``""``."""
        counts = batch.request_counts
        key = (batch.status_text, counts.total, counts.completed, counts.failed)
        last = self.pace.last_key
        new_status = isinstance(last, tuple) and last[0] != key[0]
        if not self.pace.due(key, now, urgent=new_status):
            return ""
        return self.describe(batch, now)

    def describe(self, batch: KlusterBatch, now: float | None = None) -> str:
        """Return one progress line for the batch as just polled (``now`` in seconds, any fixed origin)."""
        counts = batch.request_counts
        now = time.monotonic() if now is None else now
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


# -- events ----------------------------------------------------------------------------------------------


def make_event(
    status: WaitOutcome | str, batch_id: str, *, batch: KlusterBatch | None = None, message: str
) -> dict[str, Any]:
    """Build the JSON-native payload of the one event a wait ends with."""
    return {
        "status": WaitOutcome(status).value,
        "batch_id": batch_id,
        "batch_status": batch.status_text if batch else None,
        "request_counts": batch.request_counts.to_dict() if batch else None,
        "output_file_id": batch.output_file_id if batch else None,
        "error_file_id": batch.error_file_id if batch else None,
        "errors": list(batch.errors) if batch else [],
        "message": message,
    }


def event_for_batch(batch: KlusterBatch) -> dict[str, Any]:
    """Build the event for a batch that reached a terminal status.

    :raises ValueError: The batch is not terminal.
    """
    status = EVENT_STATUS.get(batch.status) if batch.status is not None else None
    if status is None:
        raise ValueError(f"Batch {batch.id} is {batch.status_text}, not terminal: no event to build yet.")
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
    """Raise the exception that an unsuccessful event stands for; return quietly on ``success``.

    A batch that ended without completing raises a :class:`KlusterBatchError` subclass; a wait that broke off
    while the batch may still run (``error``) raises :class:`KlusterWaitError`.
    """
    status = WaitOutcome(event["status"])
    if status is WaitOutcome.SUCCESS:
        return
    if status is WaitOutcome.ERROR:
        raise KlusterWaitError(event["message"], batch_id=event["batch_id"], status=event.get("batch_status"))
    raise _RAISES[status](
        event["message"],
        batch_id=event["batch_id"],
        status=event.get("batch_status") or status.value,
        errors=event.get("errors") or [],
    )


# -- the policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What to do after one poll: poll again after ``delay`` seconds, or end with ``event``.

    ``log_line`` says what the poll showed (a progress line when one is due, or why a failed poll is
    tolerated), at ``log_level``; empty when the poll showed nothing worth a line.
    """

    delay: float = 0.0
    event: dict[str, Any] | None = None
    log_line: str = ""
    log_level: int = logging.INFO

    @property
    def done(self) -> bool:
        """Tell whether the wait is over (``event`` is set)."""
        return self.event is not None

    def log_to(self, logger: logging.Logger | logging.LoggerAdapter[Any] | Any) -> None:
        """Write ``log_line`` to ``logger`` (nothing when empty)."""
        if self.log_line:
            logger.log(self.log_level, "%s", self.log_line)


@dataclass
class WaitPolicy:
    """Every rule of waiting for one batch, with no I/O: feed it each poll's result and the time.

    * A terminal batch ends the wait with its event (``success``, ``failed``, ``expired``, ``cancelled``) —
      even past the deadline: a batch that finished just in time is not timed out.
    * A running batch (or one with a status this provider does not know) is polled again after
      ``poll_interval``; once ``deadline`` (epoch seconds) has passed, the wait ends with ``timeout``.
    * A transient API error is tolerated, polled again after ``min(poll_interval, 2 ** errors_in_a_row)``
      seconds: ``max_consecutive_errors`` failed polls in a row are tolerated, the next one ends the wait with
      ``error``; a permanent one (rejected key, batch gone, bad request) ends it at once. A successful poll
      resets the count.
    * No delay runs past the deadline.
    * Progress lines are paced (:class:`ProgressPace`): the first poll, every new status and the end are logged;
      moving counts at most once a minute; a wait where nothing changes once every five minutes.

    :param batch_id: The batch waited for (named in every event and line).
    :param poll_interval: Seconds between polls of a running batch.
    :param deadline: Epoch seconds after which a running batch ends the wait with ``timeout``; ``None``: none.
    :param max_consecutive_errors: Failed polls in a row tolerated (``0``: the first one ends the wait).
    """

    batch_id: str
    poll_interval: float
    deadline: float | None = None
    max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS
    errors_in_a_row: int = field(default=0, init=False)
    last: KlusterBatch | None = field(default=None, init=False)
    progress: Progress = field(default_factory=Progress, init=False, repr=False)

    def __post_init__(self) -> None:
        self.poll_interval = max(0.0, float(self.poll_interval))
        self.max_consecutive_errors = max(0, int(self.max_consecutive_errors))

    def clamp(self, seconds: float, now: float) -> float:
        """Return ``seconds``, shortened so that a sleep of it ends no later than the deadline (never < 0)."""
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - now)
        return max(0.0, seconds)

    def decide(self, result: KlusterBatch | KlusterAPIError, now: float) -> Decision:
        """Decide on one poll's result — the batch, or the API error the poll raised — at epoch ``now``."""
        if isinstance(result, KlusterAPIError):
            return self.after_error(result, now)
        return self.after_batch(result, now)

    def after_batch(self, batch: KlusterBatch, now: float) -> Decision:
        """Decide on a successful poll."""
        self.errors_in_a_row = 0
        self.last = batch
        if batch.is_terminal:
            return Decision(event=event_for_batch(batch), log_line=self.progress.describe(batch, now))
        if self._past_deadline(now):
            return Decision(event=self.timeout_event(), log_line=self.progress.describe(batch, now))
        # Logged when the status or the counts change, or now and then (ProgressPace), not at every poll.
        line = self.progress.line_due(batch, now)
        return Decision(delay=self.clamp(self.poll_interval, now), log_line=line)

    def after_error(self, exc: KlusterAPIError, now: float) -> Decision:
        """Decide on a poll that raised ``exc`` (its message is already free of the key)."""
        self.errors_in_a_row += 1
        if not exc.is_transient or self.errors_in_a_row > self.max_consecutive_errors:
            reason = (
                "a permanent error" if not exc.is_transient else f"{self.errors_in_a_row} failures in a row"
            )
            message = f"Stopped waiting for batch {self.batch_id} after {reason}: {exc}"
            event = make_event(WaitOutcome.ERROR, self.batch_id, batch=self.last, message=message)
            return Decision(event=event, log_line=message, log_level=logging.ERROR)
        if self._past_deadline(now):
            return Decision(event=self.timeout_event())
        delay = self.clamp(min(self.poll_interval, 2.0**self.errors_in_a_row), now)
        line = (
            f"Polling batch {self.batch_id} failed ({self.errors_in_a_row} of {self.max_consecutive_errors} "
            f"in a row tolerated); next try in {delay:.0f}s: {exc}"
        )
        return Decision(delay=delay, log_line=line, log_level=logging.WARNING)

    def timeout_event(self) -> dict[str, Any]:
        """Return the event of a wait whose deadline passed while the batch ran."""
        status = self.last.status_text if self.last else "unknown"
        return make_event(
            WaitOutcome.TIMEOUT,
            self.batch_id,
            batch=self.last,
            message=(
                f"Batch {self.batch_id} was still {status} when the wait's deadline passed; "
                "it will be cancelled. Raise the timeout or the completion window for batches this large."
            ),
        )

    def _past_deadline(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def poll_once(
    policy: WaitPolicy,
    poll: Callable[[], KlusterBatch],
    *,
    log: logging.Logger | logging.LoggerAdapter[Any] | Any,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> Decision:
    """Poll until one poll succeeds or the policy ends the wait; return that decision.

    A failed poll is retried after the policy's backoff, so the error count lives only as long as this call
    (one sensor poke needs nothing kept between pokes). Only :class:`KlusterAPIError` counts as a failed poll;
    anything else ``poll`` raises propagates.
    """
    while True:
        try:
            batch = poll()
        except KlusterAPIError as exc:
            decision = policy.after_error(exc, clock())
            decision.log_to(log)
            if decision.done:
                return decision
            sleep(decision.delay)
            continue
        decision = policy.after_batch(batch, clock())
        decision.log_to(log)
        return decision


def run_sync_wait(
    policy: WaitPolicy,
    poll: Callable[[], KlusterBatch],
    *,
    log: logging.Logger | logging.LoggerAdapter[Any] | Any,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Drive ``policy`` with a blocking ``poll`` until it ends the wait; return the event.

    For a worker: no event loop and no random first-poll delay (those are the triggerer's).
    """
    while True:
        decision = poll_once(policy, poll, log=log, sleep=sleep, clock=clock)
        if decision.event is not None:
            return decision.event
        sleep(decision.delay)
