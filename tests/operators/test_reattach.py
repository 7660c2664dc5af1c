"""Retries never pay twice: a new try of the same task finds the batch (and file) an earlier try left."""

from __future__ import annotations

import contextlib

import pytest

from airflow_provider_kluster.exceptions import KlusterInputChangedError
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.operators.kluster import (
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
    KlusterUploadFileOperator,
)
from airflow_provider_kluster.reattach import (
    FINGERPRINT_KEY,
    IDENTITY_KEY,
    identity_from_context,
    task_identity,
)
from tests.helpers import MODEL, make_context, run_deferred, wait_for

PROMPTS = ["What is 1+1?", "Name a colour.", "Say hi."]
RUN = "manual__2026-01-01T00:00:00+00:00"


class SimulatedCrash(BaseException):
    """The worker process dying: nothing in the operator may catch it."""


def attempt(**kwargs):
    """One try of the same task instance (same dag, task, run and map index; XComs cleared as Airflow does)."""
    kwargs.setdefault("requests", PROMPTS)
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("poll_interval", 0.05)
    map_index = kwargs.pop("map_index", -1)
    op = KlusterSubmitBatchOperator(task_id="submit", **kwargs)
    return op, make_context("submit", run_id=RUN, map_index=map_index)


def created(emulator) -> int:
    return emulator.emulator.counters.get("batches_created", 0)


def uploaded(emulator) -> int:
    return emulator.emulator.counters.get("files_uploaded", 0)


def test_batch_carries_identity_and_fingerprint(kluster_conn, emulator):
    op, context = attempt()
    batch_id = op.execute(context)
    metadata = emulator.emulator.get_batch_raw(batch_id)["metadata"]
    assert metadata[IDENTITY_KEY] == task_identity("test_dag", "submit", RUN, -1)
    assert len(metadata[FINGERPRINT_KEY]) == 32


def test_identity_ignores_the_try_number_but_not_the_map_index():
    """Two tries of one task instance share an identity; other map indexes, runs, tasks and DAGs do not."""
    first_try, second_try = make_context(run_id="r1"), make_context(run_id="r1")
    second_try["ti"].try_number = 2
    assert identity_from_context(first_try) == identity_from_context(second_try)
    assert task_identity("d", "t", "r", 0) != task_identity("d", "t", "r", 1)
    assert task_identity("d", "t", "r", None) == task_identity("d", "t", "r", -1)
    others = {
        task_identity("d", "t", "r2", 0),
        task_identity("d", "t2", "r", 0),
        task_identity("d2", "t", "r", 0),
    }
    assert task_identity("d", "t", "r", 0) not in others
    assert len(others) == 3


def test_a_retry_reattaches_to_the_running_batch(kluster_conn, emulator, caplog, capsys):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    first = attempt()[0].execute(attempt()[1])
    op, context = attempt()
    second = op.execute(context)
    assert second == first
    assert context["ti"].xcom["batch_id"] == first  # XCom set as if just submitted
    assert (created(emulator), uploaded(emulator)) == (1, 1)
    assert "REATTACHING" in caplog.text + capsys.readouterr().out


def test_a_retry_reattaches_to_a_completed_batch_and_waits_no_more(kluster_conn, emulator):
    op, context = attempt(wait_for_completion=True)
    first = op.execute(context)
    op, context = attempt(wait_for_completion=True, deferrable=True)
    assert run_deferred(op, context) == first
    assert created(emulator) == 1


@pytest.mark.parametrize("status", ["failed", "expired", "cancelled"])
def test_an_unsuccessful_earlier_batch_is_replaced(kluster_conn, emulator, status):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op, context = attempt()
    first = op.execute(context)
    wait_for(KlusterHook(kluster_conn), first, until=lambda b: b.status_text == "in_progress")
    emulator.emulator.set_batch_status(first, status)
    op, context = attempt()
    second = op.execute(context)
    assert second != first
    assert created(emulator) == 2
    assert uploaded(emulator) == 1  # the same content: the earlier upload is reused


def test_a_batch_being_cancelled_is_replaced_not_reattached(kluster_conn, emulator):
    """Clearing a deferred task cancels its batch: the re-run must not wait on the batch being cancelled."""
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op, context = attempt()
    first = op.execute(context)
    emulator.emulator.config.cancel_delay = 30  # stays "cancelling" for the rest of the test
    KlusterHook(kluster_conn).cancel_batch(first)
    assert emulator.emulator.get_batch_raw(first)["status"] == "cancelling"
    op, context = attempt()
    assert op.execute(context) != first
    assert created(emulator) == 2


def test_changed_input_resubmits_and_cancels_the_old_batch(kluster_conn, emulator):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    old = attempt()[0].execute(attempt()[1])
    op, context = attempt(requests=["A different question"])
    new = op.execute(context)
    assert new != old
    assert emulator.emulator.get_batch_raw(old)["status"] in ("cancelling", "cancelled")
    assert created(emulator) == 2


def test_changed_input_fails_when_told_to(kluster_conn, emulator):
    old = attempt()[0].execute(attempt()[1])
    op, context = attempt(requests=["A different question"], on_changed_input="fail")
    with pytest.raises(KlusterInputChangedError, match=f"batch {old}"):
        op.execute(context)
    assert created(emulator) == 1


def test_a_changed_setting_is_a_changed_input(kluster_conn, emulator):
    first = attempt()[0].execute(attempt()[1])
    op, context = attempt(completion_window="48h")
    assert op.execute(context) != first
    assert created(emulator) == 2


def test_reattach_false_submits_again(kluster_conn, emulator):
    attempt(reattach=False)[0].execute(attempt()[1])
    attempt(reattach=False)[0].execute(attempt()[1])
    assert created(emulator) == 2


def test_mapped_instances_are_separate_tasks(kluster_conn, emulator):
    a = attempt(map_index=0)
    b = attempt(map_index=1)
    assert a[0].execute(a[1]) != b[0].execute(b[1])
    assert created(emulator) == 2


def test_upload_operator_retry_reuses_its_file(kluster_conn, emulator):
    ids = {
        KlusterUploadFileOperator(task_id="up", requests=PROMPTS, model=MODEL).execute(
            make_context("up", run_id=RUN)
        )
        for _ in range(2)
    }
    assert len(ids) == 1
    assert uploaded(emulator) == 1


def test_orphaned_upload_of_a_changed_input_is_deleted(kluster_conn, emulator):
    op, context = attempt()
    with crash_on_create(times=1), pytest.raises(SimulatedCrash):
        op.execute(context)
    (orphan,) = [f.id for f in emulator.emulator.list_files()]
    op, context = attempt(requests=["A different question"])
    op.execute(context)
    assert emulator.emulator.get_file(orphan) is None
    assert len(emulator.emulator.list_files()) == 1


@contextlib.contextmanager
def crash_on_create(*, times: int, after: bool = False):
    """Kill the 'worker' just before (or just after) the batch is created, ``times`` times."""
    original = KlusterHook.create_batch
    left = {"n": times}

    def create_batch(self, *args, **kwargs):
        if left["n"] > 0:
            left["n"] -= 1
            if after:
                original(self, *args, **kwargs)
            raise SimulatedCrash("worker killed")
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KlusterHook, "create_batch", create_batch)
        yield


def test_three_crashes_one_batch_complete_results(kluster_conn, emulator, tmp_path):
    """Crash after upload, after create, and during the wait: the fourth try finishes with one batch."""
    emulator.emulator.config.requests_per_second = 20
    prompts = [f"Question {i}?" for i in range(30)]

    # Try 1: dies after uploading, before creating.
    op, context = attempt(requests=prompts, wait_for_completion=True)
    with crash_on_create(times=1), pytest.raises(SimulatedCrash):
        op.execute(context)
    assert (uploaded(emulator), created(emulator)) == (1, 0)

    # Try 2: dies right after creating.
    op, context = attempt(requests=prompts, wait_for_completion=True)
    with crash_on_create(times=1, after=True), pytest.raises(SimulatedCrash):
        op.execute(context)
    assert (uploaded(emulator), created(emulator)) == (1, 1)

    # Try 3: dies while waiting on the worker (its first poll of the batch).
    def dying_poll(self, batch_id):
        raise SimulatedCrash("killed mid-wait")

    op, context = attempt(requests=prompts, wait_for_completion=True, deferrable=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KlusterHook, "get_batch", dying_poll)
        with pytest.raises(SimulatedCrash):
            op.execute(context)
    assert (uploaded(emulator), created(emulator)) == (1, 1)

    # Try 4: reattaches and finishes.
    op, context = attempt(requests=prompts, wait_for_completion=True, deferrable=True)
    batch_id = run_deferred(op, context)
    assert (uploaded(emulator), created(emulator)) == (1, 1)
    manifest = KlusterGetBatchResultsOperator(
        task_id="results", batch_id=batch_id, destination=str(tmp_path)
    ).execute(make_context("results"))
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"]) == (30, 0, 0)
