"""On-call cancellation: who may cancel a batch, and a cancel that, once decided, completes.

Airflow calls a task's ``on_kill`` (and, from 3.3, a trigger's) for more reasons than a person's action: a
triggerer that stalled past the HA hand-over has its triggers "cancelled by user action", a scheduler restart or
lost heartbeats stop a worker with SIGTERM. Only the task instance's state and try, read back from Airflow after
the kill, tell them apart, and :func:`judge_kill` turns them into a verdict: cancel (a person cleared the task; the task
instance failed, was skipped or removed — by a person's mark or by Airflow ending the run; marked success, when
asked) or leave the batch running for the next try to reattach to.

:class:`CancelAttempts` is the retry rule of the cancel itself (transient failures retried with backoff within a
bounded time); the trigger drives it on the event loop, shielded from Airflow's repeated kills, and the worker
drives it with blocking calls. Pure: no client, no Airflow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch
from airflow_provider_kluster.exceptions import KlusterAPIError, KlusterNotFoundError

#: The task instance's state could not be read (the API was unreachable): never a reason to cancel.
UNKNOWN_STATE = "<unknown>"
#: How long a cancel keeps retrying transient failures before it gives up and says so (seconds).
DEFAULT_CANCEL_BUDGET = 120.0
#: A worker is SIGKILLed 5 s after SIGTERM; the cancel it can still make inline must end before that.
WORKER_CANCEL_BUDGET = 3.5

# States a task instance is in after a clear: ``None`` until the scheduler picks it up (and ``restarting`` for one
# cleared while it ran) — Airflow gives neither any other way. Then it is scheduled, queued, running (deferred) again,
# states a try resumed by its trigger's event on another triggerer also goes through: those count as a clear only
# when the try moved past the stopped one (Airflow raises ``try_number`` when it schedules a cleared task instance,
# never when a trigger's event resumes one).
_CLEARED = frozenset({None, "none", "restarting"})
_AGAIN = frozenset({"scheduled", "queued", "running", "deferred"})
# Terminal states a person gives by marking the task (or its run) — and Airflow itself gives too: a run's
# dagrun_timeout fails its unfinished tasks, lost heartbeats with no retry left fail it, a deploy that drops the task
# removes it, the scheduler skips or upstream-fails it. Either way the run is over: its batch should not bill on.
_ENDED = frozenset({"failed", "upstream_failed", "skipped", "removed"})


class KillCause(str, enum.Enum):
    """Why a waiting task was stopped, as far as Airflow's records tell."""

    CLEARED = "cleared"
    ENDED = "ended"  # failed, skipped, upstream_failed or removed: by a person's mark, or by Airflow
    MARKED_SUCCESS = "marked success"
    TIMEOUT = "execution timeout"
    NOT_A_PERSON = "not a person"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class KillVerdict:
    """What to do with the batch of a task that was stopped: ``cancel`` it or not, and why (a sentence part)."""

    cancel: bool
    cause: KillCause
    reason: str


def judge_kill(
    state: str | None,
    *,
    where: str,
    cancel_on_mark_success: bool = False,
    execution_timeout: bool = False,
    own_try: int | None = None,
    current_try: int | None = None,
) -> KillVerdict:
    """Decide whether the kill of a waiting task cancels its batch.

    :param state: The task instance's state read from Airflow *after* the kill (``None``: no state, i.e.
        cleared), or :data:`UNKNOWN_STATE` when it could not be read.
    :param where: ``"triggerer"`` (the deferred task's trigger was cancelled) or ``"worker"`` (the task process
        got SIGTERM while it polled).
    :param cancel_on_mark_success: Whether marking the task success cancels the batch.
    :param execution_timeout: The worker's ``execution_timeout`` fired (Airflow calls ``on_kill`` itself).
    :param own_try: The try that was stopped (the trigger's or the task's ``try_number``).
    :param current_try: The task instance's try number read from Airflow after the kill (``None``: unknown).
        When known, scheduled, queued, running or deferred count as a clear only when it is past ``own_try``;
        when not, deferred never does, running does only in the triggerer, scheduled and queued do.
    """
    if execution_timeout:
        return KillVerdict(True, KillCause.TIMEOUT, "the task passed its execution_timeout")
    if state == UNKNOWN_STATE:
        return KillVerdict(
            False,
            KillCause.UNKNOWN,
            "Airflow could not say what happened to the task (its state could not be read)",
        )
    if state in _ENDED:
        return KillVerdict(
            True,
            KillCause.ENDED,
            f"the task instance is now {state} — a person marked it, or Airflow ended the run (dagrun_timeout, "
            "lost heartbeats with no retry left, a task removed from the DAG)",
        )
    if state == "success":
        if cancel_on_mark_success:
            return KillVerdict(True, KillCause.MARKED_SUCCESS, "the task was marked success")
        return KillVerdict(
            False,
            KillCause.MARKED_SUCCESS,
            "the task was marked success (cancel_on_mark_success=False keeps its batch running; fetch its "
            "results later, or cancel it with KlusterCancelBatchOperator)",
        )
    if state == "up_for_retry":
        return KillVerdict(
            False,
            KillCause.NOT_A_PERSON,
            "the task is up for retry (Airflow failed this try, e.g. for missed heartbeats); the retry reattaches",
        )
    if state in _CLEARED:
        return KillVerdict(
            True, KillCause.CLEARED, f"the task was cleared (its state is now {state or 'none'!r})"
        )
    if state in _AGAIN:
        if own_try is not None and current_try is not None and current_try > own_try:
            return KillVerdict(
                True,
                KillCause.CLEARED,
                f"the task was cleared (it is {state} again, in try {current_try}; this was try {own_try})",
            )
        if own_try is None or current_try is None:
            # The try cannot be read (the triggerer's channel to Airflow has no such question; Airflow 3.1):
            # judge by the state alone. A deferred task's trigger moved to another triggerer. In the triggerer,
            # scheduled/queued/running means cleared; the one look-alike, another triggerer's event resuming the
            # task, comes once the batch has ended, when a cancel changes nothing. On the worker, running is
            # Airflow stopping this process; scheduled or queued again means cleared.
            if state == "deferred" or (where == "worker" and state == "running"):
                return KillVerdict(
                    False,
                    KillCause.NOT_A_PERSON,
                    f"the task is still {state}: "
                    + (
                        "its trigger moved to another triggerer"
                        if where == "triggerer"
                        else "Airflow stopped this process (a worker or scheduler shutdown, lost heartbeats), "
                        "not a person"
                    ),
                )
            return KillVerdict(
                True,
                KillCause.CLEARED,
                f"the task was cleared (it is {state} again; its try could not be read)",
            )
        if where == "triggerer":
            return KillVerdict(
                False,
                KillCause.NOT_A_PERSON,
                f"the task is {state} in the same try ({current_try}): its trigger moved to another triggerer"
                + ("" if state == "deferred" else ", whose event resumed it"),
            )
        return KillVerdict(
            False,
            KillCause.NOT_A_PERSON,
            f"the task is still {state} in the same try ({current_try}): Airflow stopped this process (a worker or "
            "scheduler shutdown, lost heartbeats), not a person",
        )
    return KillVerdict(False, KillCause.UNKNOWN, f"the task is in an unexpected state {state!r}")


def state_in(states: Any, run_id: str, task_id: str, map_index: int) -> str | None:
    """Pick one task instance's state out of Airflow's ``get_task_states`` answer (``UNKNOWN_STATE`` if absent).

    The answer maps run id → task key → state, the key being ``<task_id>_<map_index>`` for a mapped task.
    """
    key = task_id if map_index < 0 else f"{task_id}_{map_index}"
    run_states = (states or {}).get(run_id) or {}
    if key not in run_states:
        return UNKNOWN_STATE
    value = run_states[key]
    return None if value is None else str(getattr(value, "value", value))


def cancel_done(batch: KlusterBatch) -> bool:
    """Tell whether a batch needs no (further) cancel: cancelling, cancelled, or ended some other way."""
    return batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED) or batch.is_terminal


@dataclass
class CancelAttempts:
    """The retry rule of one cancel: transient failures are retried with backoff until ``budget`` seconds pass.

    Call :meth:`after_failure` with each failed attempt's error and the current (monotonic) time: it answers
    the seconds to wait before the next attempt, or ``None`` when the cancel has failed for good (a permanent
    error, or the budget is spent).
    """

    started: float
    budget: float = DEFAULT_CANCEL_BUDGET
    first_delay: float = 1.0
    max_delay: float = 15.0
    attempts: int = 0
    errors: list[str] = field(default_factory=list)

    def after_failure(self, error: KlusterAPIError, now: float) -> float | None:
        self.attempts += 1
        self.errors.append(str(error))
        if isinstance(error, KlusterNotFoundError) or not error.is_transient:
            return None
        delay = min(self.max_delay, self.first_delay * 2 ** (self.attempts - 1))
        remaining = self.started + self.budget - now
        if remaining <= 0:
            return None
        return min(delay, remaining)

    @property
    def last_error(self) -> str:
        return self.errors[-1] if self.errors else "no answer"


def not_cancelled_message(batch_id: str, reason: str, attempts: CancelAttempts, where: str) -> str:
    """The ERROR a cancel that could not be sent leaves: which batch, that it may still run, what to do."""
    return (
        f"Could NOT cancel batch {batch_id} ({reason}) after {attempts.attempts} attempt(s) in the {where}: "
        f"{attempts.last_error.rstrip('.')}. The batch may still be running and billing: cancel it by hand "
        "(KlusterCancelBatchOperator, or the kluster.ai console)."
    )
