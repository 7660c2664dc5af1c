"""The waiting policy on its own: every status, every error kind, the deadline's edges — no HTTP at all.

The end-to-end tests (trigger, sensor, operators against the emulator) show the loops drive this policy; these
tables pin down what each input means.
"""

from __future__ import annotations

import json
import logging

import pytest

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch
from airflow_provider_kluster.exceptions import (
    KlusterAPIError,
    KlusterAuthError,
    KlusterBadRequestError,
    KlusterBatchCancelledError,
    KlusterBatchError,
    KlusterBatchExpiredError,
    KlusterBatchFailedError,
    KlusterBatchTimeoutError,
    KlusterConfigError,
    KlusterError,
    KlusterNotFoundError,
    KlusterTransientAPIError,
    KlusterWaitError,
)
from airflow_provider_kluster.waiting import (
    EVENT_STATUS,
    EVENT_STATUSES,
    WaitOutcome,
    WaitPolicy,
    event_for_batch,
    make_event,
    poll_once,
    raise_for_event,
    run_sync_wait,
    validate_event,
)

NOW = 1_800_000_000.0
LOG = logging.getLogger("test_waiting")


def batch(status: str, *, total: int = 10, completed: int = 4, failed: int = 1, **extra) -> KlusterBatch:
    return KlusterBatch.from_api(
        {
            "id": "b1",
            "status": status,
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            **extra,
        }
    )


def api_error(status_code: int | None) -> KlusterAPIError:
    cls = {
        401: KlusterAuthError,
        403: KlusterAuthError,
        404: KlusterNotFoundError,
        400: KlusterBadRequestError,
    }
    return cls.get(status_code, KlusterTransientAPIError)(
        f"kluster.ai get batch b1 failed with HTTP {status_code}", call="get batch", status_code=status_code
    )


def policy(**kwargs) -> WaitPolicy:
    kwargs.setdefault("poll_interval", 60.0)
    return WaitPolicy(batch_id="b1", **kwargs)


# -- batches -----------------------------------------------------------------------------------------------

TERMINAL = [
    ("completed", "success"),
    ("failed", "failed"),
    ("expired", "expired"),
    ("cancelled", "cancelled"),
    ("Completed", "success"),  # PascalCase and other spellings of the wire
    ("CANCELLED", "cancelled"),
]


@pytest.mark.parametrize(("status", "outcome"), TERMINAL)
@pytest.mark.parametrize(
    "deadline", [None, NOW + 100, NOW, NOW - 100], ids=["none", "ahead", "now", "passed"]
)
def test_a_terminal_batch_ends_the_wait_with_its_outcome_even_past_the_deadline(status, outcome, deadline):
    decision = policy(deadline=deadline).after_batch(batch(status), NOW)
    assert decision.done
    assert decision.event["status"] == outcome
    assert decision.event["batch_status"] == status.lower()


RUNNING = [
    "pre_schedule",
    "validating",
    "in_progress",
    "InProgress",
    "finalizing",
    "cancelling",
    "some_new_status",
]


@pytest.mark.parametrize("status", RUNNING)
def test_a_running_or_unknown_batch_is_polled_again_after_the_interval(status):
    decision = policy(poll_interval=30).after_batch(batch(status), NOW)
    assert not decision.done
    assert decision.delay == 30
    assert "5/10 done, 1 failed" in decision.log_line


@pytest.mark.parametrize("status", RUNNING)
@pytest.mark.parametrize(("deadline", "timed_out"), [(NOW, True), (NOW - 1, True), (NOW + 0.001, False)])
def test_a_running_batch_at_or_past_the_deadline_times_out(status, deadline, timed_out):
    decision = policy(deadline=deadline).after_batch(batch(status), NOW)
    assert decision.done is timed_out
    if timed_out:
        assert decision.event["status"] == "timeout"
        assert decision.event["batch_status"] == batch(status).status_text
        assert "still" in decision.event["message"]


@pytest.mark.parametrize(
    ("poll_interval", "deadline", "delay"),
    [
        (60, None, 60),
        (60, NOW + 3, 3),
        (60, NOW + 60, 60),
        (60, NOW + 61, 60),
        (0, NOW + 5, 0),
        (-5, None, 0),
    ],
)
def test_no_delay_runs_past_the_deadline(poll_interval, deadline, delay):
    decision = policy(poll_interval=poll_interval, deadline=deadline).after_batch(batch("in_progress"), NOW)
    assert decision.delay == pytest.approx(delay)


# -- errors -----------------------------------------------------------------------------------------------

TRANSIENT = [None, 408, 409, 429, 500, 502, 503, 504]
PERMANENT = [400, 401, 403, 404, 422]


@pytest.mark.parametrize("status_code", TRANSIENT)
def test_a_transient_error_is_tolerated_with_backoff(status_code):
    p = policy(poll_interval=60, max_consecutive_errors=5)
    delays = [p.after_error(api_error(status_code), NOW).delay for _ in range(5)]
    assert delays == [2, 4, 8, 16, 32]
    decision = p.after_error(api_error(status_code), NOW)
    assert decision.done
    assert decision.event["status"] == "error"
    assert "6 failures in a row" in decision.event["message"]


@pytest.mark.parametrize("status_code", PERMANENT)
def test_a_permanent_error_ends_the_wait_at_once(status_code):
    decision = policy(max_consecutive_errors=5).after_error(api_error(status_code), NOW)
    assert decision.done
    assert decision.event["status"] == "error"
    assert "a permanent error" in decision.event["message"]
    assert decision.log_level == logging.ERROR


@pytest.mark.parametrize(
    ("limit", "failures"),
    [(limit, f) for limit in (0, 1, 2, 3, 5) for f in ("N-1", "N", "N+1") if not (limit == 0 and f == "N-1")],
)
def test_max_consecutive_errors_are_tolerated_and_one_more_ends_the_wait(limit, failures):
    """``max_consecutive_errors=N`` tolerates N failures in a row; the (N+1)-th ends the wait."""
    n = {"N-1": limit - 1, "N": limit, "N+1": limit + 1}[failures]
    p = policy(max_consecutive_errors=limit)
    decisions = [p.after_error(api_error(503), NOW) for _ in range(n)]
    ended = [d.done for d in decisions]
    assert ended == [False] * min(n, limit) + [True] * (n - limit if n > limit else 0)
    if failures == "N+1":
        assert f"{limit + 1} failures in a row" in decisions[-1].event["message"]


def test_a_successful_poll_starts_the_count_again():
    p = policy(max_consecutive_errors=2)
    assert not any(p.after_error(api_error(503), NOW).done for _ in range(2))
    assert not p.after_batch(batch("in_progress"), NOW).done
    assert not any(p.after_error(api_error(503), NOW).done for _ in range(2))
    assert p.after_error(api_error(503), NOW).done


def test_a_negative_limit_means_none_tolerated():
    assert policy(max_consecutive_errors=-3).after_error(api_error(503), NOW).done


def test_backoff_is_capped_by_the_poll_interval_and_the_deadline():
    p = policy(poll_interval=5, max_consecutive_errors=10, deadline=NOW + 3.5)
    assert [p.after_error(api_error(503), NOW).delay for _ in range(3)] == [2, 3.5, 3.5]
    p = policy(poll_interval=5, max_consecutive_errors=10)
    assert [p.after_error(api_error(503), NOW).delay for _ in range(4)] == [2, 4, 5, 5]


def test_a_tolerated_error_past_the_deadline_times_out_with_the_last_batch_seen():
    p = policy(deadline=NOW + 10)
    p.after_batch(batch("in_progress"), NOW)
    decision = p.after_error(api_error(503), NOW + 10)
    assert decision.event["status"] == "timeout"
    assert decision.event["batch_status"] == "in_progress"


def test_the_error_event_carries_the_last_batch_seen():
    p = policy()
    p.after_batch(batch("in_progress", completed=7), NOW)
    event = p.after_error(api_error(404), NOW).event
    assert event["batch_status"] == "in_progress"
    assert event["request_counts"] == {"total": 10, "completed": 7, "failed": 1}


def test_decide_dispatches_on_the_result():
    p = policy()
    assert p.decide(api_error(404), NOW).event["status"] == "error"
    assert p.decide(batch("completed"), NOW).event["status"] == "success"


# -- events -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        event_for_batch(batch("completed", output_file_id="o1", errors=["x"])),
        policy(deadline=NOW).after_batch(batch("in_progress"), NOW).event,
        policy().after_error(api_error(401), NOW).event,
        make_event(WaitOutcome.ERROR, "b1", message="m"),
    ],
    ids=["batch", "timeout", "error", "bare"],
)
def test_every_event_is_json_native_with_plain_string_status(event):
    assert json.loads(json.dumps(event)) == event
    assert type(event["status"]) is str
    assert validate_event(event, "b1") is event


def test_event_statuses_are_the_outcomes():
    assert EVENT_STATUSES == {"success", "failed", "expired", "cancelled", "timeout", "error"}
    assert set(EVENT_STATUS) == BatchStatus.terminal()


def test_event_for_a_running_batch_is_refused():
    with pytest.raises(ValueError, match="not terminal"):
        event_for_batch(batch("in_progress"))


@pytest.mark.parametrize(
    ("status", "exc_class"),
    [
        ("failed", KlusterBatchFailedError),
        ("expired", KlusterBatchExpiredError),
        ("cancelled", KlusterBatchCancelledError),
        ("timeout", KlusterBatchTimeoutError),
        ("error", KlusterWaitError),
    ],
)
def test_each_unsuccessful_outcome_raises_its_own_exception(status, exc_class):
    event = make_event(status, "b1", batch=batch("in_progress"), message=f"it {status}")
    with pytest.raises(exc_class, match=f"it {status}") as info:
        raise_for_event(event)
    assert type(info.value) is exc_class
    assert info.value.batch_id == "b1"


def test_a_broken_off_wait_is_neither_a_config_error_nor_an_ended_batch():
    assert not issubclass(KlusterWaitError, (KlusterConfigError, KlusterBatchError))


def test_success_raises_nothing():
    assert raise_for_event(event_for_batch(batch("completed"))) is None


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (None, "no usable event"),
        ("success", "no usable event"),
        ({"status": "weird", "batch_id": "b1", "message": "m"}, "malformed"),
        ({"status": "success", "message": "m"}, "malformed"),
        ({"status": "success", "batch_id": "b1"}, "malformed"),
        ({"status": "success", "batch_id": "other", "message": "m"}, "for batch other"),
    ],
)
def test_a_bad_resumed_event_is_refused(event, match):
    with pytest.raises(KlusterError, match=match):
        validate_event(event, "b1")


# -- the sync loops ---------------------------------------------------------------------------------------


class Script:
    """A poll that returns (or raises) each scripted result in turn, on a fake clock advanced by sleeps."""

    def __init__(self, *results):
        self.results = list(results)
        self.now = NOW
        self.sleeps: list[float] = []
        self.polls_at: list[float] = []

    def poll(self):
        self.polls_at.append(self.now)
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_the_worker_wait_polls_at_once_then_every_interval():
    script = Script(batch("pre_schedule"), api_error(503), batch("in_progress"), batch("completed"))
    event = run_sync_wait(
        policy(poll_interval=10), script.poll, log=LOG, sleep=script.sleep, clock=script.clock
    )
    assert event["status"] == "success"
    assert script.polls_at[0] == NOW  # no first-poll spread on a worker
    assert script.sleeps == [10, 2, 10]


def test_the_worker_wait_times_out_at_the_deadline():
    script = Script(*[batch("in_progress")] * 10)
    event = run_sync_wait(
        policy(poll_interval=10, deadline=NOW + 25),
        script.poll,
        log=LOG,
        sleep=script.sleep,
        clock=script.clock,
    )
    assert event["status"] == "timeout"
    assert script.sleeps == [10, 10, 5]


def test_poll_once_retries_errors_and_returns_at_the_first_batch():
    script = Script(api_error(503), api_error(None), batch("in_progress"), batch("completed"))
    decision = poll_once(
        policy(max_consecutive_errors=3), script.poll, log=LOG, sleep=script.sleep, clock=script.clock
    )
    assert not decision.done
    assert len(script.polls_at) == 3
    assert script.sleeps == [2, 4]


def test_poll_once_gives_up_at_the_limit():
    script = Script(*[api_error(503)] * 5)
    decision = poll_once(
        policy(max_consecutive_errors=3), script.poll, log=LOG, sleep=script.sleep, clock=script.clock
    )
    assert decision.event["status"] == "error"
    assert len(script.polls_at) == 4


def test_other_exceptions_are_not_polls_that_failed():
    script = Script(RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        run_sync_wait(policy(), script.poll, log=LOG, sleep=script.sleep, clock=script.clock)


def test_the_loops_log_what_the_policy_says(caplog):
    script = Script(api_error(503), batch("completed"))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        run_sync_wait(policy(), script.poll, log=LOG, sleep=script.sleep, clock=script.clock)
    levels = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records]
    assert levels == [
        (logging.WARNING, "Polling batch b1 failed (1 of 5 in a row tolerated); next try in 2s"),
        (logging.INFO, "Batch b1 completed"),
    ]


# -- progress lines are paced, not one per poll ------------------------------------------------------------------


def _lines(polls: list[tuple[float, KlusterBatch]]) -> list[float]:
    """Times (seconds after NOW) at which a wait polling ``polls`` writes a line."""
    policy = WaitPolicy(batch_id="b1", poll_interval=5.0)
    return [t for t, b in polls if policy.decide(b, NOW + t).log_line]


def test_a_wait_where_nothing_moves_writes_a_line_every_five_minutes():
    polls = [(t * 5.0, batch("in_progress")) for t in range(0, 125)]  # 620 s
    assert _lines(polls) == [0.0, 300.0, 600.0]


def test_moving_counts_write_at_most_a_line_a_minute():
    polls = [
        (t * 5.0, batch("in_progress", total=1000, completed=t, failed=0)) for t in range(0, 37)
    ]  # 180 s
    assert _lines(polls) == [0.0, 60.0, 120.0, 180.0]


def test_a_new_status_is_logged_at_once_and_the_end_always():
    polls = [
        (0.0, batch("validating", completed=0, failed=0)),
        (5.0, batch("validating", completed=0, failed=0)),
        (10.0, batch("in_progress", completed=0, failed=0)),
        (15.0, batch("in_progress", completed=1, failed=0)),
        (20.0, batch("finalizing", completed=10, failed=0)),
        (25.0, batch("completed", completed=10, failed=0, output_file_id="o1")),
    ]
    assert _lines(polls) == [0.0, 10.0, 20.0, 25.0]


def test_a_tolerated_failed_poll_is_always_logged():
    policy = WaitPolicy(batch_id="b1", poll_interval=5.0)
    assert policy.decide(batch("in_progress"), NOW).log_line
    assert policy.decide(api_error(503), NOW + 5).log_line
    assert not policy.decide(batch("in_progress"), NOW + 10).log_line
