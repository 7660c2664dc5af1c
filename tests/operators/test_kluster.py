"""The operators against the emulator over real HTTP, sync and deferrable."""

from __future__ import annotations

import json

import pytest

from airflow_provider_kluster.exceptions import (
    KlusterBatchCancelledError,
    KlusterBatchExpiredError,
    KlusterBatchFailedError,
    KlusterBatchNotFinishedError,
    KlusterBatchTimeoutError,
    KlusterConfigError,
    KlusterRequestFileError,
    KlusterTooManyFailuresError,
)
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.links import KlusterBatchLink
from airflow_provider_kluster.operators.kluster import (
    KlusterCancelBatchOperator,
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
    KlusterUploadFileOperator,
)
from tests.helpers import MODEL, make_context, request_lines, run_deferred, wait_for, write_jsonl

PROMPTS = ["What is 1+1?", "Name a colour.", "Say hi."]


@pytest.fixture
def hook(kluster_conn):
    return KlusterHook(kluster_conn)


def submit_op(**kwargs) -> KlusterSubmitBatchOperator:
    kwargs.setdefault("task_id", "submit")
    kwargs.setdefault("poll_interval", 0.05)
    return KlusterSubmitBatchOperator(**kwargs)


# -- upload ------------------------------------------------------------------------------------------------


def test_upload_operator_uploads_a_file(hook, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", request_lines(3))
    file_id = KlusterUploadFileOperator(task_id="up", input_file=str(path)).execute(make_context())
    assert int(hook.get_file(file_id)["bytes"]) == path.stat().st_size


def test_upload_operator_builds_a_file_from_prompts(hook, emulator):
    file_id = KlusterUploadFileOperator(task_id="up", requests=PROMPTS, model=MODEL).execute(make_context())
    lines = [json.loads(line) for line in hook.iter_file_lines(file_id)]
    assert [line["custom_id"] for line in lines] == ["request-0", "request-1", "request-2"]
    assert all(line["body"]["model"] == MODEL for line in lines)


def test_invalid_file_is_refused_before_any_upload(kluster_conn, emulator, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"custom_id": "a"}\nnot json\n')
    with pytest.raises(KlusterRequestFileError, match="line 2"):
        KlusterUploadFileOperator(task_id="up", input_file=str(path)).execute(make_context())
    assert emulator.emulator.counters.get("POST /v1/files", 0) == 0


def test_unknown_model_is_refused_before_any_upload(kluster_conn, emulator):
    with pytest.raises(KlusterRequestFileError, match="no-such/model"):
        KlusterUploadFileOperator(task_id="up", requests=PROMPTS, model="no-such/model").execute(
            make_context()
        )
    assert emulator.emulator.counters.get("POST /v1/files", 0) == 0


# -- submit ------------------------------------------------------------------------------------------------


def test_submit_without_waiting_pushes_id_and_link_first(kluster_conn, emulator):
    context = make_context()
    batch_id = submit_op(requests=PROMPTS, model=MODEL, metadata={"team": "ml"}).execute(context)
    xcom = context["ti"].xcom
    assert xcom["batch_id"] == batch_id
    assert xcom["batch_url"].endswith(f"/batches/{batch_id}")
    assert xcom[KlusterBatchLink().xcom_key] == xcom["batch_url"]
    assert emulator.emulator.get_batch_raw(batch_id)["metadata"]["team"] == "ml"


@pytest.mark.parametrize("deferrable", [False, True], ids=["worker-poll", "deferred"])
def test_submit_and_wait_for_success(kluster_conn, emulator, deferrable, tmp_path):
    op = submit_op(
        input_file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(4))),
        wait_for_completion=True,
        deferrable=deferrable,
    )
    batch_id = run_deferred(op, make_context())
    assert emulator.emulator.get_batch_raw(batch_id)["status"] == "completed"


@pytest.mark.parametrize("deferrable", [False, True], ids=["worker-poll", "deferred"])
@pytest.mark.parametrize(
    ("status", "exc"),
    [
        ("failed", KlusterBatchFailedError),
        ("expired", KlusterBatchExpiredError),
        ("cancelled", KlusterBatchCancelledError),
    ],
    ids=["failed", "expired", "cancelled"],
)
def test_submit_and_wait_raises_for_each_unsuccessful_end(kluster_conn, emulator, status, exc, deferrable):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op = submit_op(requests=PROMPTS, model=MODEL, wait_for_completion=True, deferrable=deferrable)
    context = make_context()

    import threading

    def end_it():
        batch_id = None
        while batch_id is None:
            batch_id = context["ti"].xcom.get("batch_id")
        wait_for(KlusterHook(kluster_conn), batch_id, until=lambda b: b.status_text == "in_progress")
        emulator.emulator.set_batch_status(batch_id, status)

    ender = threading.Thread(target=end_it, daemon=True)
    ender.start()
    with pytest.raises(exc) as info:
        run_deferred(op, context)
    ender.join(5)
    assert context["ti"].xcom["batch_id"] in str(info.value)
    assert status in str(info.value)


@pytest.mark.parametrize("deferrable", [False, True], ids=["worker-poll", "deferred"])
def test_timeout_cancels_the_batch(kluster_conn, emulator, hook, deferrable):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op = submit_op(
        requests=PROMPTS, model=MODEL, wait_for_completion=True, deferrable=deferrable, timeout=0.5
    )
    context = make_context()
    with pytest.raises(KlusterBatchTimeoutError, match="deadline"):
        run_deferred(op, context)
    batch_id = context["ti"].xcom["batch_id"]
    assert emulator.emulator.counters["POST /v1/batches/{id}/cancel"] == 1
    emulator.emulator.faults.unstick_batch("*")
    assert wait_for(hook, batch_id).status_text == "cancelled"


def test_on_kill_cancels_the_running_batch(kluster_conn, emulator, hook, airflow_says):
    airflow_says["state"] = "failed"  # a person marked it failed
    emulator.emulator.faults.stick_batch("*", "in_progress")
    op = submit_op(requests=PROMPTS, model=MODEL)
    batch_id = op.execute(make_context())
    op.on_kill()
    emulator.emulator.faults.unstick_batch("*")
    assert wait_for(hook, batch_id).status_text == "cancelled"


def test_on_kill_respects_cancel_on_kill_false(kluster_conn, emulator, airflow_says):
    emulator.emulator.faults.stick_batch("*", "in_progress")  # still running when killed: a cancel would land
    op = submit_op(requests=PROMPTS, model=MODEL, cancel_on_kill=False)
    batch_id = op.execute(make_context())
    op.on_kill()
    assert emulator.emulator.counters.get("POST /v1/batches/{id}/cancel", 0) == 0
    assert emulator.emulator.get_batch_raw(batch_id)["status"] not in ("cancelling", "cancelled")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"requests": PROMPTS, "input_file_id": "f"}, "exactly one of"),
        ({"requests": PROMPTS, "model": MODEL, "completion_window": "2h"}, "completion_window"),
        ({"requests": "not a list", "model": MODEL}, "must be a list"),
    ],
    ids=["no-input", "two-inputs", "bad-window", "requests-not-list"],
)
def test_bad_parameters_fail_before_any_call(kluster_conn, emulator, kwargs, message):
    with pytest.raises(KlusterConfigError, match=message):
        submit_op(**kwargs).execute(make_context())
    assert sum(emulator.emulator.counters.get(k, 0) for k in ("POST /v1/files", "POST /v1/batches")) == 0


def test_kluster_options_reach_the_batch(kluster_conn, emulator):
    batch_id = submit_op(requests=PROMPTS, model=MODEL, kluster_options={"greedy": True}).execute(
        make_context()
    )
    assert emulator.emulator.get_batch_raw(batch_id)["metadata"]["@kluster.ai"] == {"greedy": True}


# -- results -----------------------------------------------------------------------------------------------


def _finished_batch(kluster_conn, hook, lines) -> str:
    op = submit_op(requests=lines, model=MODEL, check_models=False, wait_for_completion=True)
    return op.execute(make_context())


def test_results_manifest_and_records(kluster_conn, hook, tmp_path):
    batch_id = _finished_batch(kluster_conn, hook, PROMPTS)
    context = make_context("results")
    manifest = KlusterGetBatchResultsOperator(
        task_id="results", batch_id=batch_id, destination=str(tmp_path / "out"), return_records=10
    ).execute(context)
    assert json.loads(json.dumps(manifest)) == manifest  # JSON-native, fit for XCom
    assert manifest["batch_id"] == batch_id
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"], manifest["total"]) == (3, 0, 0, 3)
    assert manifest["usage"]["total_tokens"] > 0
    assert {r["custom_id"] for r in manifest["records"]} == {"request-0", "request-1", "request-2"}
    assert all(r["content"] for r in manifest["records"])
    records = [json.loads(line) for line in open(manifest["records_path"])]
    assert len(records) == 3
    assert context["ti"].xcom[KlusterBatchLink().xcom_key].endswith(batch_id)


def test_results_rerun_is_idempotent(kluster_conn, hook, tmp_path):
    batch_id = _finished_batch(kluster_conn, hook, PROMPTS)
    op = KlusterGetBatchResultsOperator(task_id="results", batch_id=batch_id, destination=str(tmp_path))
    first = op.execute(make_context())
    second = op.execute(make_context())
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{batch_id}.output.jsonl", f"{batch_id}.results.jsonl"]
    )


def test_partial_failures_and_max_failed_ratio(kluster_conn, hook, emulator, tmp_path):
    lines = [
        *PROMPTS,
        {"custom_id": "bad", "messages": [{"role": "user", "content": "x"}], "model": "no-such/model"},
    ]
    batch_id = _finished_batch(kluster_conn, hook, lines)
    op = KlusterGetBatchResultsOperator(
        task_id="results", batch_id=batch_id, destination=str(tmp_path), max_failed_ratio=0.5
    )
    manifest = op.execute(make_context())
    assert (manifest["succeeded"], manifest["failed"]) == (3, 1)
    assert manifest["failed_ids"] == ["bad"]
    strict = KlusterGetBatchResultsOperator(
        task_id="results", batch_id=batch_id, destination=str(tmp_path), max_failed_ratio=0.1
    )
    context = make_context()
    with pytest.raises(KlusterTooManyFailuresError, match="1 of 4 requests failed"):
        strict.execute(context)
    assert context["ti"].xcom["manifest"]["failed"] == 1


def test_results_of_a_running_batch_are_refused(kluster_conn, emulator, tmp_path):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    batch_id = submit_op(requests=PROMPTS, model=MODEL).execute(make_context())
    with pytest.raises(KlusterBatchNotFinishedError, match="wait for it first"):
        KlusterGetBatchResultsOperator(task_id="r", batch_id=batch_id, destination=str(tmp_path)).execute(
            make_context()
        )


def test_results_of_a_cancelled_batch_with_allow_unfinished(kluster_conn, emulator, hook, tmp_path):
    emulator.emulator.config.requests_per_second = 5
    lines = [f"question {i}" for i in range(40)]
    batch_id = submit_op(requests=lines, model=MODEL).execute(make_context())
    wait_for(hook, batch_id, until=lambda b: b.request_counts.completed >= 2)
    hook.cancel_batch(batch_id)
    wait_for(hook, batch_id)
    with pytest.raises(KlusterBatchCancelledError, match="allow_unfinished"):
        KlusterGetBatchResultsOperator(task_id="r", batch_id=batch_id, destination=str(tmp_path)).execute(
            make_context()
        )
    manifest = KlusterGetBatchResultsOperator(
        task_id="r", batch_id=batch_id, destination=str(tmp_path), allow_unfinished=True
    ).execute(make_context())
    assert manifest["status"] == "cancelled"
    assert manifest["succeeded"] >= 2
    assert manifest["missing"] > 0
    assert manifest["succeeded"] + manifest["failed"] + manifest["missing"] == 40


# -- cancel ------------------------------------------------------------------------------------------------


def test_cancel_operator_waits_for_cancelled(kluster_conn, emulator):
    emulator.emulator.faults.stick_batch("*", "in_progress")
    batch_id = submit_op(requests=PROMPTS, model=MODEL).execute(make_context())
    status = KlusterCancelBatchOperator(
        task_id="cancel", batch_id=batch_id, wait_for_cancellation=True, poll_interval=0.05, timeout=10
    ).execute(make_context())
    assert status == "cancelled"


def test_cancel_operator_leaves_a_finished_batch(kluster_conn, hook, emulator):
    batch_id = _finished_batch(kluster_conn, hook, PROMPTS)
    status = KlusterCancelBatchOperator(task_id="cancel", batch_id=batch_id).execute(make_context())
    assert status == "completed"
    assert emulator.emulator.counters.get("POST /v1/batches/{id}/cancel", 0) == 0


def test_results_count_lines_for_unrequested_ids_apart(kluster_conn, hook, emulator, tmp_path):
    batch_id = _finished_batch(kluster_conn, hook, PROMPTS)
    state = emulator.emulator
    batch = state.get_batch(batch_id)
    answered = state.get_file(batch.output_file_id).path.read_bytes()
    stranger = json.loads(answered.splitlines()[0])
    stranger["custom_id"] = "never-requested"
    batch.output_file_id = state.add_file(  # kluster answering an id the input never had
        answered + json.dumps(stranger).encode() + b"\n", purpose="batch_output"
    )
    manifest = KlusterGetBatchResultsOperator(
        task_id="results", batch_id=batch_id, destination=str(tmp_path), return_records=10
    ).execute(make_context())
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"], manifest["total"]) == (3, 0, 0, 3)
    assert (manifest["unexpected"], manifest["unexpected_ids"]) == (1, ["never-requested"])
    records = [json.loads(line) for line in open(manifest["records_path"])]
    assert sorted(r["custom_id"] for r in records) == ["request-0", "request-1", "request-2"]
