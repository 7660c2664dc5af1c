"""KlusterBatchJobOperator against the emulator over HTTP: shards, retries, stalls, budget, crashes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from airflow_provider_kluster.exceptions import KlusterBudgetError, KlusterRequestFileError
from airflow_provider_kluster.jobs import JOB_PART_KEY
from airflow_provider_kluster.operators.job import KlusterBatchJobOperator
from tests.conftest import TEST_API_KEY
from tests.helpers import MODEL, make_context, request_lines, write_jsonl
from tests.test_on_call import airflow_kills, deferred_ti, needs_33

try:
    from airflow.sdk.exceptions import TaskDeferred
except ImportError:  # Airflow < 3.2
    from airflow.exceptions import TaskDeferred

RUN = "manual__2026-02-02T00:00:00+00:00"


class SimulatedCrash(BaseException):
    """The worker dying: nothing in the operator may catch it."""


def job(tmp_path, **kwargs) -> KlusterBatchJobOperator:
    kwargs.setdefault("destination", str(tmp_path / "out"))
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("deferrable", True)
    kwargs.setdefault("check_models", False)
    return KlusterBatchJobOperator(task_id="job", **kwargs)


def context():
    return make_context("job", run_id=RUN)


def trigger_event(deferred: TaskDeferred, timeout: float = 120.0) -> dict:
    """Run the deferred trigger as the triggerer would: rebuilt from its serialized kwargs."""
    _, kwargs = deferred.trigger.serialize()
    trigger = type(deferred.trigger)(**json.loads(json.dumps(kwargs)))

    async def first():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first(), timeout))


def run_to_end(operator, ctx, *, max_waits: int = 500, on_wait=None):
    """Execute, then run each trigger and resume, until the job returns; count the deferrals."""
    call = lambda: operator.execute(ctx)  # noqa: E731
    for waits in range(max_waits):
        try:
            return call(), waits
        except TaskDeferred as deferred:
            assert deferred.timeout is None  # noqa: PT017
            if on_wait is not None:
                on_wait(waits, deferred)
            event = trigger_event(deferred)
            call = lambda event=event, deferred=deferred: getattr(operator, deferred.method_name)(  # noqa: E731
                ctx, event=event, **(deferred.kwargs or {})
            )
    raise AssertionError("the job never ended")


def records(manifest) -> list[dict]:
    with open(manifest["records_path"]) as fh:
        return [json.loads(line) for line in fh]


def counters(emulator) -> tuple[int, int]:
    c = emulator.emulator.counters
    return c.get("files_uploaded", 0), c.get("batches_created", 0)


@pytest.fixture
def fast(emulator):
    emulator.emulator.config.requests_per_second = 50_000
    return emulator


def test_25000_requests_run_as_three_batches_and_merge(kluster_conn, fast, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(25_000))
    manifest, _ = run_to_end(job(tmp_path, input_file=str(source), max_requests=10_000), context())
    assert counters(fast) == (3, 3)
    assert [b["requests"] for b in manifest["batches"]] == [10_000, 10_000, 5_000]
    assert [b["part"] for b in manifest["batches"]] == ["a1s0000", "a1s0001", "a1s0002"]
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (
        25_000,
        25_000,
        0,
        0,
    )
    got = records(manifest)
    assert len(got) == 25_000
    assert sorted(r["custom_id"] for r in got) == sorted(f"request-{i}" for i in range(25_000))
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in got)
    assert {r["batch_id"] for r in got} == {b["id"] for b in manifest["batches"]}
    on_disk = json.loads(open(manifest["manifest_path"]).read())
    assert on_disk["succeeded"] == 25_000
    for batch in manifest["batches"]:
        assert fast.emulator.get_batch_raw(batch["id"])["metadata"][JOB_PART_KEY] == batch["part"]


def test_transient_failures_and_lost_requests_are_sent_again_permanent_ones_are_not(
    kluster_conn, fast, tmp_path
):
    fast.emulator.faults.transient_share = 0.10
    fast.emulator.faults.lost_share = 0.02
    lines = request_lines(3_000)
    for i in range(0, 3_000, 500):  # six requests no model serves: a 400, never retried
        lines[i]["body"]["model"] = "no-such-model"
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    manifest, _ = run_to_end(
        job(tmp_path, input_file=str(source), max_requests=1_000, max_attempts=3), context()
    )
    got = {r["custom_id"]: r for r in records(manifest)}
    assert len(got) == 3_000 == manifest["total"]
    assert manifest["failed"] == manifest["failed_permanent"] == 6
    assert manifest["missing"] == 0
    assert manifest["succeeded"] == 2_994
    bad = [got[f"request-{i}"] for i in range(0, 3_000, 500)]
    assert all(r["status"] == "failed" and r["retryable"] is False and r["attempts"] == 1 for r in bad)
    retried = [r for r in got.values() if r["attempts"] > 1]
    assert 250 < len(retried) < 450, "about 12 % came back failed or not at all, and were sent again"
    assert all(r["status"] == "succeeded" for r in retried)
    attempts = {b["part"][:2] for b in manifest["batches"]}
    assert attempts == {"a1", "a2"}
    # attempt 2 holds exactly the retried requests: one small batch
    assert sum(b["requests"] for b in manifest["batches"] if b["part"].startswith("a2")) == len(retried)


def test_a_stuck_batch_is_cancelled_after_stall_timeout_and_its_requests_answered_by_a_follow_up(
    kluster_conn, fast, tmp_path
):
    fast.emulator.config.requests_per_second = 2_000
    fast.emulator.faults.stall_batch("next", after=100)  # the first batch created stops at 100 done
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(600))
    op = job(tmp_path, input_file=str(source), max_requests=300, stall_timeout=1.0, max_attempts=2)
    manifest, _ = run_to_end(op, context())
    statuses = {b["part"]: b["status"] for b in manifest["batches"]}
    assert statuses["a1s0000"] == "cancelled"
    assert statuses["a1s0001"] == "completed"
    assert manifest["succeeded"] == 600
    assert manifest["missing"] == 0
    follow_up = [b for b in manifest["batches"] if b["part"].startswith("a2")]
    assert sum(b["requests"] for b in follow_up) == 200  # the stuck batch's unanswered requests


def test_a_stall_with_no_attempts_left_is_reported_not_retried(kluster_conn, fast, tmp_path):
    fast.emulator.faults.stall_batch("next", after=10)
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(50))
    op = job(tmp_path, input_file=str(source), stall_timeout=0.5, max_attempts=1, max_failed_ratio=0.0)
    with pytest.raises(Exception, match=r"40 of 50 requests failed or are missing"):
        run_to_end(op, context())
    assert counters(fast) == (1, 1)


def test_max_cost_below_the_estimate_uploads_nothing(kluster_conn, fast, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(1_000))
    op = job(
        tmp_path,
        input_file=str(source),
        max_cost=0.01,
        prices={MODEL: {"input": 1e-6, "output": 2e-6}},
        default_completion_tokens=100,
    )
    with pytest.raises(KlusterBudgetError) as caught:
        op.execute(context())
    assert "max_cost=0.01" in str(caught.value)
    assert "USD per token" in str(caught.value)
    assert counters(fast) == (0, 0)
    assert caught.value.estimate_usd > 0.01


def test_the_manifest_records_estimate_and_actual_cost_from_klusters_prices(kluster_conn, fast, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(200))
    manifest, _ = run_to_end(job(tmp_path, input_file=str(source), max_cost=100.0), context())
    cost = manifest["cost"]
    assert cost["unit"] == "USD per token"
    assert cost["estimate"]["total_usd"] > 0
    assert 0 < cost["actual_usd"] <= cost["estimate"]["total_usd"] * 10
    assert cost["unpriced_models"] == []


def test_a_bad_line_fails_before_any_upload_naming_the_line(kluster_conn, fast, tmp_path):
    lines = request_lines(50)
    del lines[41]["body"]["messages"]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(KlusterRequestFileError, match="line 42"):
        job(tmp_path, input_file=str(source)).execute(context())
    assert counters(fast) == (0, 0)


def test_max_concurrent_batches_submits_the_rest_as_earlier_ones_end(kluster_conn, fast, tmp_path):
    fast.emulator.config.requests_per_second = 5_000
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(500))
    seen_running: list[int] = []

    def on_wait(_, deferred):
        seen_running.append(len(deferred.trigger.batch_ids))

    op = job(tmp_path, input_file=str(source), max_requests=100, max_concurrent_batches=2)
    manifest, waits = run_to_end(op, context(), on_wait=on_wait)
    assert counters(fast) == (5, 5)
    assert max(seen_running) <= 2
    assert waits >= 3
    assert manifest["succeeded"] == 500


def test_the_wait_on_the_worker_gives_the_same_job(kluster_conn, fast, tmp_path):
    fast.emulator.faults.transient_share = 0.05
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(400))
    manifest = job(tmp_path, input_file=str(source), max_requests=150, deferrable=False).execute(context())
    assert manifest["succeeded"] == 400
    assert manifest["attempts"] == 2
    assert len(records(manifest)) == 400


@pytest.mark.parametrize(
    ("method", "nth"),
    [
        ("upload_file", 2),  # between shards: the second shard's upload dies after it landed
        ("create_batch", 1),  # the first create landed, the worker died before it heard
        ("create_batch", 4),  # during attempt 2's submissions
        ("download_file", 3),  # while downloading results
        ("settle", 2),  # while merging the second attempt's results
    ],
)
def test_a_crash_at_any_step_then_a_retry_ends_with_the_same_result_and_no_extra_uploads_or_batches(
    kluster_conn, fast, tmp_path, monkeypatch, method, nth
):
    fast.emulator.faults.transient_share = 0.1
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(900))
    kwargs = {"input_file": str(source), "max_requests": 300, "max_attempts": 3}

    # The run nobody crashed, for reference (a run of its own).
    reference, _ = run_to_end(job(tmp_path / "ref", **kwargs), make_context("job", run_id="reference"))
    reference_counts = counters(fast)
    fast.emulator.reset()
    fast.emulator.config.api_key = TEST_API_KEY
    fast.emulator.config.requests_per_second = 50_000
    fast.emulator.faults.transient_share = 0.1

    from airflow_provider_kluster import jobs as jobs_module
    from airflow_provider_kluster.hooks.kluster import KlusterHook
    from airflow_provider_kluster.operators import job as job_module

    calls = {"n": 0}
    if method == "settle":
        real = jobs_module.settle

        def crashing(*args, **kw):
            calls["n"] += 1
            if calls["n"] == nth:
                raise SimulatedCrash(method)
            return real(*args, **kw)

        monkeypatch.setattr(job_module, "settle", crashing)
        restore = lambda: monkeypatch.setattr(job_module, "settle", real)  # noqa: E731
    else:
        real_method = getattr(KlusterHook, method)

        def crashing(self, *args, **kw):
            result = real_method(self, *args, **kw)
            calls["n"] += 1
            if calls["n"] == nth:
                raise SimulatedCrash(method)  # after the call landed: its answer is lost with the worker
            return result

        monkeypatch.setattr(KlusterHook, method, crashing)
        restore = lambda: monkeypatch.setattr(KlusterHook, method, real_method)  # noqa: E731
    with pytest.raises(SimulatedCrash):
        run_to_end(job(tmp_path / "out", **kwargs), context())
    restore()
    manifest, _ = run_to_end(
        job(tmp_path / "out", **kwargs), context()
    )  # the retry: a new operator, same task
    assert counters(fast) == reference_counts
    for key in ("total", "succeeded", "failed", "missing", "attempts"):
        assert manifest[key] == reference[key], key
    assert sorted(b["part"] for b in manifest["batches"]) == sorted(b["part"] for b in reference["batches"])
    assert len(records(manifest)) == 900


def test_a_duplicate_custom_id_fails_before_any_upload(kluster_conn, fast, tmp_path):
    lines = request_lines(30)
    lines[20]["custom_id"] = lines[3]["custom_id"]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(
        KlusterRequestFileError, match=r"line 21: duplicate custom_id 'request-3' \(first used on line 4\)"
    ):
        job(tmp_path, input_file=str(source)).execute(context())
    assert counters(fast) == (0, 0)


def test_large_shards_go_through_the_uploads_api_when_asked(kluster_conn, fast, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(300))
    op = job(tmp_path, input_file=str(source), max_requests=100, multipart_threshold=1_000)
    manifest, _ = run_to_end(op, context())
    assert manifest["succeeded"] == 300
    assert fast.emulator.counters.get("uploads_completed", 0) == 3
    assert counters(fast)[1] == 3


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_attempts", 0, "max_attempts"),
        ("max_concurrent_batches", -1, "max_concurrent_batches"),
        ("stall_timeout", 0, "stall_timeout"),
        ("max_cost", -5, "max_cost"),
        ("max_file_bytes", 10, "max_file_bytes"),
        ("prices", {MODEL: {"input": "cheap"}}, "prices"),
    ],
)
def test_bad_job_parameters_are_refused_before_any_call(kluster_conn, fast, tmp_path, name, value, expected):
    from airflow_provider_kluster.exceptions import KlusterConfigError

    op = job(tmp_path, requests=["hi"], model=MODEL, **{name: value})
    with pytest.raises(KlusterConfigError, match=expected):
        op.execute(context())
    assert sum(fast.emulator.counters.values()) == 0


def stuck_job(tmp_path, emulator, **kwargs):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(200))
    return job(tmp_path, input_file=str(source), max_requests=100, **kwargs)


def statuses(emulator) -> list[str]:
    return sorted(emulator.emulator.get_batch_raw(b)["status"] for b in emulator.emulator.list_batch_ids())


def wait_until(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@needs_33
def test_a_person_killing_the_jobs_trigger_cancels_every_running_batch(
    kluster_conn, fast, airflow_says, tmp_path
):
    op = stuck_job(tmp_path, fast)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context())
    _, kwargs = deferred.value.trigger.serialize()
    trigger = type(deferred.value.trigger)(**json.loads(json.dumps(kwargs)))
    assert len(trigger.batch_ids) == 2
    trigger.task_instance = deferred_ti()
    airflow_says["state"] = "failed"
    asyncio.run(airflow_kills(trigger))
    assert all(s in ("cancelling", "cancelled") for s in statuses(fast)), statuses(fast)


def test_worker_wait_killed_by_a_person_cancels_every_running_batch(
    kluster_conn, fast, airflow_says, tmp_path
):
    op = stuck_job(tmp_path, fast, deferrable=False)
    manifest, watch = op._advance(context(), None)
    assert manifest is None
    assert len(op._running) == 2
    airflow_says["state"] = "failed"
    op.on_kill()
    wait_until(lambda: all(s in ("cancelling", "cancelled") for s in statuses(fast)))


def test_worker_wait_stopped_by_airflow_leaves_the_batches(
    kluster_conn, fast, airflow_says, tmp_path, caplog, capsys
):
    op = stuck_job(tmp_path, fast, deferrable=False)
    op._advance(context(), None)
    airflow_says["state"] = "running"  # the same try still running: a worker or scheduler stop
    op.on_kill()
    import time

    time.sleep(1.0)
    assert statuses(fast) == ["in_progress", "in_progress"]
    out = capsys.readouterr().out + caplog.text
    assert "2 batch(es) of the job NOT cancelled" in out


def test_resubmissions_count_against_the_same_budget(kluster_conn, fast, tmp_path, caplog, capsys):
    """The estimate passes, but what attempt 1 really spent leaves no room for the resends: none are sent."""
    fast.emulator.faults.transient_share = 0.1
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(500))
    op = job(
        tmp_path,
        input_file=str(source),
        max_cost=2.0,
        # completions are priced high and estimated at 1 token each: the real answers cost far more
        prices={MODEL: {"input": 1e-6, "output": 2e-3}},
        default_completion_tokens=1,
        max_attempts=3,
    )
    manifest, _ = run_to_end(op, context())
    assert manifest["cost"]["estimate"]["total_usd"] < 2.0 < manifest["cost"]["actual_usd"]
    assert manifest["attempts"] == 1
    assert manifest["not_retried_for_budget"] == manifest["to_retry"] > 0
    assert counters(fast) == (1, 1)
    assert "NOT resending" in capsys.readouterr().out + caplog.text
    got = records(manifest)
    assert len(got) == 500
    assert sum(r["status"] != "succeeded" for r in got) == manifest["to_retry"]


@pytest.mark.parametrize("where", ["file", "memory"])
def test_input_and_destination_in_object_storage(kluster_conn, fast, tmp_path, where):
    from airflow_provider_kluster.paths import as_path

    fast.emulator.faults.transient_share = 0.1
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(300))
    if where == "file":
        input_file, destination = f"file://{source}", f"file://{tmp_path}/out"
    else:  # a remote store: fsspec's in-memory filesystem, attached as Airflow attaches S3 or GCS
        from airflow.sdk.io import attach
        from fsspec.implementations.memory import MemoryFileSystem

        attach("memory", fs=MemoryFileSystem())
        input_file = f"memory://kluster-job-{tmp_path.name}/in.jsonl"
        with as_path(input_file).open("wb") as out:
            out.write(source.read_bytes())
        destination = f"memory://kluster-job-{tmp_path.name}/out"
    manifest, _ = run_to_end(
        job(tmp_path, input_file=input_file, destination=destination, max_requests=100), context()
    )
    assert manifest["succeeded"] == 300
    assert manifest["attempts"] == 2
    with as_path(manifest["records_path"]).open("r") as fh:
        got = [json.loads(line) for line in fh]
    assert sorted(r["custom_id"] for r in got) == sorted(f"request-{i}" for i in range(300))
    assert as_path(manifest["manifest_path"]).exists()


def test_a_stall_with_no_attempts_left_fails_the_task_saying_so(kluster_conn, fast, tmp_path):
    fast.emulator.faults.stall_batch("next", after=10)
    source = write_jsonl(tmp_path / "in.jsonl", request_lines(50))
    op = job(tmp_path, input_file=str(source), stall_timeout=0.5, max_attempts=1)
    with pytest.raises(
        Exception, match=r"40 of 50 requests have no answer because batch\(es\) .* cancelled\)"
    ) as caught:
        run_to_end(op, context())
    assert "max_attempts=1" in str(caught.value)
    assert len(records({"records_path": str(tmp_path / "out" / "results.jsonl")})) == 50


@needs_33
def test_two_jobs_killed_together_both_cancel_their_batches(kluster_conn, fast, airflow_says, tmp_path):
    """A cleared mapped job kills every map index's trigger at once: each cancels its own batches."""
    fast.emulator.faults.stick_batch("*", "in_progress")
    triggers = []
    for index in range(2):
        source = write_jsonl(tmp_path / f"in-{index}.jsonl", request_lines(200, prefix=f"m{index}"))
        op = job(tmp_path / f"job-{index}", input_file=str(source), max_requests=100)
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(make_context("job", run_id=RUN, map_index=index))
        _, kwargs = deferred.value.trigger.serialize()
        trigger = type(deferred.value.trigger)(**json.loads(json.dumps(kwargs)))
        trigger.task_instance = deferred_ti()
        triggers.append(trigger)
    airflow_says["state"] = "failed"

    async def kill_both():
        await asyncio.gather(*(airflow_kills(t) for t in triggers))

    asyncio.run(kill_both())
    assert len(statuses(fast)) == 4
    assert all(s in ("cancelling", "cancelled") for s in statuses(fast)), statuses(fast)


def test_a_timed_out_job_fails_for_good_and_a_retry_submits_nothing(kluster_conn, fast, tmp_path):
    from airflow.exceptions import AirflowFailException

    from airflow_provider_kluster.exceptions import KlusterJobTimeoutError

    op = stuck_job(tmp_path, fast, timeout=1.0, max_concurrent_batches=1)
    with pytest.raises(KlusterJobTimeoutError, match="passed its timeout") as caught:
        run_to_end(op, context())
    assert isinstance(caught.value, AirflowFailException), "Airflow must not retry it"
    assert counters(fast) == (1, 1)  # the second shard waited for a slot and was never submitted
    assert statuses(fast) in (["cancelled"], ["cancelling"])
    # The retry starts past the job's deadline, counted from its first batch's created_at (whole seconds): one
    # started a moment before it would wait on the cancelling batch and time out in the wait instead.
    created = min(float(fast.emulator.get_batch_raw(b)["created_at"]) for b in fast.emulator.list_batch_ids())
    time.sleep(max(0.0, created + 1.0 + 0.2 - time.time()))
    again = stuck_job(
        tmp_path, fast, timeout=1.0, max_concurrent_batches=1
    )  # a retry anyway (or a manual run)
    with pytest.raises(KlusterJobTimeoutError, match="1 shard\\(s\\) never submitted"):
        run_to_end(again, context())
    assert counters(fast) == (1, 1)


@pytest.mark.parametrize("cancel_on_kill", [True, False])
def test_a_clear_starts_the_job_anew_whatever_cancel_on_kill_says(
    kluster_conn, fast, tmp_path, cancel_on_kill
):
    from tests.test_on_call import try_context

    source = write_jsonl(tmp_path / "in.jsonl", request_lines(100))
    first, _ = run_to_end(
        job(tmp_path, input_file=str(source), cancel_on_kill=cancel_on_kill),
        try_context(RUN, None, try_number=1, max_tries=0),
    )
    after_clear, _ = run_to_end(
        job(tmp_path, input_file=str(source), cancel_on_kill=cancel_on_kill),
        try_context(RUN, None, try_number=2, max_tries=1),  # Airflow raises max_tries on a clear
    )
    assert first["batches"][0]["id"] != after_clear["batches"][0]["id"]
    assert counters(fast)[1] == 2
    retried, _ = run_to_end(  # a plain retry of the cleared run's try reattaches
        job(tmp_path, input_file=str(source), cancel_on_kill=cancel_on_kill),
        try_context(RUN, None, try_number=3, max_tries=1),
    )
    assert retried["batches"][0]["id"] == after_clear["batches"][0]["id"]
    assert counters(fast)[1] == 2
