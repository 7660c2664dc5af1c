"""Never pay twice when an answer is lost: the server created the batch (or stored the upload), then the answer
was lost — a 5xx or 429 sent after the commit, or the connection dropped. The emulator's ``after_commit`` faults
do exactly that. Before, the client's own retry created a second batch that ran and billed too.
"""

from __future__ import annotations

import pytest

from airflow_provider_kluster.exceptions import KlusterTransientAPIError
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator
from tests.helpers import MODEL, make_context, request_lines, write_jsonl

LOST_ANSWERS = {
    "503": {"status": 503, "retry_after": 0},
    "500": {"status": 500},
    "429": {"status": 429, "retry_after": 0},
    "dropped": {"drop_connection": True},
}
CREATES = ["POST /v1/batches", "POST /v1/files"]


def _counts(emulator) -> tuple[int, int]:
    counters = emulator.emulator.counters
    return counters.get("batches_created", 0), counters.get("files_uploaded", 0)


@pytest.mark.parametrize("route", CREATES)
@pytest.mark.parametrize("lost", list(LOST_ANSWERS))
def test_a_lost_answer_never_makes_a_second_batch_or_upload(kluster_conn, emulator, route, lost):
    rule = emulator.emulator.faults.add(route=route, times=1, after_commit=True, **LOST_ANSWERS[lost])
    op = KlusterSubmitBatchOperator(task_id="submit", requests=["What is 1 + 1?", "Say hi."], model=MODEL)
    context = make_context("submit")
    batch_id = op.execute(context)
    assert rule.fired == 1
    assert _counts(emulator) == (1, 1)  # exactly one batch and one upload
    assert emulator.emulator.list_batch_ids() == [batch_id]
    assert context["ti"].xcom["batch_id"] == batch_id


@pytest.mark.parametrize("lost", list(LOST_ANSWERS))
def test_a_lost_answer_with_nothing_created_is_sent_again(kluster_conn, emulator, lost):
    """The same errors *before* the commit: nothing exists, so the create is sent again and succeeds once."""
    rule = emulator.emulator.faults.add(route="POST /v1/batches", times=1, **LOST_ANSWERS[lost])
    op = KlusterSubmitBatchOperator(task_id="submit", requests=["What is 1 + 1?"], model=MODEL)
    batch_id = op.execute(make_context("submit"))
    assert rule.fired == 1
    assert _counts(emulator) == (1, 1)
    assert emulator.emulator.list_batch_ids() == [batch_id]


def test_the_hook_alone_does_not_retry_a_create_it_cannot_check(kluster_conn, emulator, tmp_path):
    hook = KlusterHook(kluster_conn)
    file_id = hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(2)))
    emulator.emulator.faults.add(
        route="POST /v1/batches", status=503, retry_after=0, times=1, after_commit=True
    )
    with pytest.raises(KlusterTransientAPIError, match="Not retried: kluster.ai may have created the batch"):
        hook.create_batch(file_id)
    assert _counts(emulator)[0] == 1  # the one the server made; the client did not make a second


def test_other_calls_keep_the_clients_retries(kluster_conn, emulator, tmp_path):
    hook = KlusterHook(kluster_conn)
    batch_id = hook.create_batch(hook.upload_file(write_jsonl(tmp_path / "r.jsonl", request_lines(2)))).id
    rule = emulator.emulator.faults.add(route="GET /v1/batches/{id}", status=503, retry_after=0, times=2)
    assert hook.get_batch(batch_id).id == batch_id
    assert rule.fired == 2
