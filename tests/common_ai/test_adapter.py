"""The kluster adapter of common.ai, over real HTTP against the emulator: its methods, and common.ai's DAGs.

Skipped as a whole when the ``common-ai`` extra is not installed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pathlib
import time

import pytest

pytest.importorskip("airflow.providers.common.ai.batch.base", reason="the common-ai extra is not installed")

from airflow.providers.common.ai.batch import dispatch, state
from airflow.providers.common.ai.batch.output_schema import build_output_spec
from airflow.providers.common.ai.exceptions import (
    BatchProviderNotYetSupportedError,
    LLMBatchInputError,
    LLMBatchModelMismatchError,
)
from airflow.providers.common.ai.triggers.llm_batch import LLMBatchTrigger
from pydantic import BaseModel

from airflow_provider_kluster.common_ai.adapter import KlusterBatchAdapter
from airflow_provider_kluster.exceptions import KlusterAuthError, KlusterNotFoundError
from airflow_provider_kluster.reattach import IDENTITY_KEY
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import REPO

MODEL = "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo"
MODEL_ID = f"kluster:{MODEL}"
KEY16 = "0123456789abcdef"
FINGERPRINT = "f" * 64
TEXT = build_output_spec(str)


class Answer(BaseModel):
    city: str


def wait_until(emulator, batch_id, statuses, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = emulator.emulator.get_batch_raw(batch_id)
        if raw["status"] in statuses:
            return raw
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} stayed {raw['status']}")


def input_lines(emulator, batch_id):
    raw = emulator.emulator.get_batch_raw(batch_id)
    path = emulator.emulator.get_file(raw["input_file_id"]).path
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture
def adapter(kluster_conn):
    built = dispatch.build_adapter("kluster", llm_conn_id=kluster_conn)
    yield built
    built.close()


def submit(adapter, prompts=("What is the capital of Argentina?", "2+2?"), **kwargs):
    requests = [{"prompt": p} if isinstance(p, str) else p for p in prompts]
    kwargs.setdefault("output_spec", TEXT)
    adapter.validate_requests(requests, model=MODEL, idempotency_key=KEY16, output_spec=kwargs["output_spec"])
    return adapter.submit(
        requests, model=MODEL, idempotency_key=KEY16, input_fingerprint=FINGERPRINT, **kwargs
    )


# -- dispatch and the connection ------------------------------------------------------------------------


def test_the_entry_point_serves_the_kluster_prefix():
    assert dispatch.get_adapter_class("kluster", MODEL_ID) is KlusterBatchAdapter
    with pytest.raises(BatchProviderNotYetSupportedError):
        dispatch.get_adapter_class("pydanticai", MODEL_ID)


def test_dispatch_builds_the_adapter_on_the_whole_kluster_connection(kluster_conn):
    adapter = dispatch.build_adapter("kluster", llm_conn_id=kluster_conn)
    assert adapter.hook.kluster_conn_id == "kluster_default"
    # The extras common.ai never passes reach the hook: it reads the connection itself.
    assert adapter.hook.settings.max_retries == 2
    assert adapter.hook.settings.timeout == 10


def test_outside_dispatch_the_connection_id_is_given_or_kluster_default(kluster_conn, monkeypatch, emulator):
    assert KlusterBatchAdapter().hook.kluster_conn_id == "kluster_default"
    monkeypatch.setenv("AIRFLOW_CONN_OTHER", conn_json(emulator.base_url))
    assert KlusterBatchAdapter(kluster_conn_id="other").hook.kluster_conn_id == "other"
    # Only a key and a host (how dispatch builds adapters): still the hook, on those two.
    bare = KlusterBatchAdapter(api_key=TEST_API_KEY, base_url=emulator.base_url)
    assert bare.hook.settings.base_url == emulator.base_url.rstrip("/")
    assert MODEL in bare.hook.list_models()


# -- the adapter's methods, over HTTP -------------------------------------------------------------------


def test_submit_status_and_results(adapter, emulator):
    submitted = submit(adapter, system_prompt="Be brief.", max_tokens=50, request_params={"temperature": 0.1})
    raw = wait_until(emulator, submitted.batch_id, {"completed"})
    assert submitted.provider_input_ref == raw["input_file_id"]
    assert raw["metadata"]["idempotency_key"] == KEY16
    assert raw["metadata"]["input_fingerprint"] == FINGERPRINT[:16]
    lines = input_lines(emulator, submitted.batch_id)
    assert [line["custom_id"] for line in lines] == [f"{KEY16}-0", f"{KEY16}-1"]
    body = lines[0]["body"]
    assert body["model"] == MODEL
    assert body["max_completion_tokens"] == 50
    assert body["temperature"] == 0.1
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}

    batch_state = adapter.get_batch(submitted.batch_id)
    assert batch_state.status == "completed"
    assert batch_state.counts == {"succeeded": 2, "errored": 0, "expired": 0, "cancelled": 0}
    items = sorted(adapter.iter_results(submitted.batch_id), key=lambda item: item.index)
    assert [item.index for item in items] == [0, 1]
    assert all(item.provider_status == "success" for item in items)
    assert "capital of Argentina" in items[0].raw
    assert items[0].usage["input_tokens"] > 0
    assert items[0].model == MODEL
    assert adapter.extract_output(items[0], TEXT).text == items[0].raw


def test_a_running_batch_is_in_progress_and_cancel_sends_what_kluster_accepts(adapter, emulator):
    emulator.emulator.faults.stall_batch("*")
    submitted = submit(adapter)
    wait_until(emulator, submitted.batch_id, {"in_progress"})
    assert adapter.get_batch(submitted.batch_id).status == "in_progress"
    # The emulator answers HTTP 500 to a cancel with a JSON content type and no body, as kluster did.
    assert emulator.emulator.config.empty_json_body_500
    adapter.cancel_batch(submitted.batch_id)
    assert adapter.get_batch(submitted.batch_id).status == "in_progress"  # cancelling: not over yet
    wait_until(emulator, submitted.batch_id, {"cancelled"})
    assert adapter.get_batch(submitted.batch_id).status == "cancelled"


def test_find_orphaned_batch_reads_the_metadata_back(adapter):
    submitted = submit(adapter)
    now = dt.datetime.now(dt.timezone.utc)
    assert adapter.find_orphaned_batch(KEY16, FINGERPRINT, (now - dt.timedelta(seconds=5)).isoformat()) == (
        submitted.batch_id
    )
    assert adapter.find_orphaned_batch(KEY16, "e" * 64, now.isoformat()) is None
    assert adapter.find_orphaned_batch("fedcba9876543210", FINGERPRINT, now.isoformat()) is None
    later = (now + dt.timedelta(hours=1)).isoformat()
    assert adapter.find_orphaned_batch(KEY16, FINGERPRINT, later) is None


def test_a_lost_answer_to_the_create_reuses_the_batch(adapter, emulator):
    emulator.emulator.faults.add("POST /v1/batches", status=503, times=1, after_commit=True)
    submitted = submit(adapter)
    assert emulator.emulator.list_batch_ids() == [submitted.batch_id]


def test_errors_are_the_hooks_and_never_show_the_key(adapter, emulator, monkeypatch, kluster_conn):
    with pytest.raises(KlusterNotFoundError) as info:
        adapter.get_batch("batch-missing")
    assert info.value.status_code == 404  # what common.ai reads as "gone, submit again"
    wrong = TEST_API_KEY + "-WRONG"
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, api_key=wrong))
    rejected = dispatch.build_adapter("kluster", llm_conn_id=kluster_conn)
    with pytest.raises(KlusterAuthError) as info:
        rejected.get_batch("batch-x")
    assert wrong not in str(info.value)


def test_validation_refuses_what_kluster_would(adapter, emulator):
    with pytest.raises(LLMBatchInputError, match="response_format"):
        adapter.validate_requests(
            [{"prompt": "x", "params": {"response_format": {"type": "json_object"}}}],
            model=MODEL,
            idempotency_key=KEY16,
            output_spec=TEXT,
        )
    with pytest.raises(LLMBatchModelMismatchError):
        adapter.validate_requests(
            [{"prompt": "x"}, {"prompt": "y", "model": "kluster:deepseek-ai/DeepSeek-R1"}],
            model=MODEL,
            idempotency_key=KEY16,
            output_spec=TEXT,
        )
    with pytest.raises(LLMBatchModelMismatchError):
        adapter.validate_requests(
            [{"prompt": "x", "model": "openai:gpt-5"}], model=MODEL, idempotency_key=KEY16, output_spec=TEXT
        )
    with pytest.raises(LLMBatchInputError, match="completion_window"):
        submit(adapter, completion_window="1h")
    assert emulator.emulator.counters.get("batches_created", 0) == 0


def test_structured_output_asks_in_the_system_message(adapter, emulator):
    spec = build_output_spec(Answer)
    submitted = submit(adapter, output_spec=spec, system_prompt="Be brief.")
    body = input_lines(emulator, submitted.batch_id)[0]["body"]
    assert "response_format" not in body
    system = body["messages"][0]["content"]
    assert system.startswith("Be brief.")
    assert '"city"' in system
    wait_until(emulator, submitted.batch_id, {"completed"})
    item = next(adapter.iter_results(submitted.batch_id))
    fenced = type(item)(**{**item.__dict__, "raw": '```json\n{"city": "Buenos Aires"}\n```'})
    assert adapter.extract_output(fenced, spec).text == '{"city": "Buenos Aires"}'


# -- common.ai's DAGs under dag.test() ------------------------------------------------------------------

DAG_ID = "kluster_common_ai"


@pytest.fixture
def dag_env(kluster_conn, emulator, monkeypatch, tmp_path, airflow_db):
    """The example DAG's settings; common.ai's 30 s poll floor lowered so a wait takes a fraction of a second."""
    monkeypatch.setattr("airflow.providers.common.ai.operators.llm_batch._MIN_POLL_INTERVAL", 0)
    monkeypatch.setenv("KLUSTER_COMMON_AI_POLL_INTERVAL", "0.2")
    monkeypatch.setenv("KLUSTER_EXAMPLE_OUTPUT", str(tmp_path / "results"))
    return tmp_path / "results"


def load_dag():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "example_dags" / "kluster_common_ai.py"))
    assert bag.import_errors == {}
    return bag.get_dag(DAG_ID)


def task_states(run):
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def batches(emulator):
    return [emulator.emulator.get_batch_raw(b) for b in emulator.emulator.list_batch_ids()]


def manifests_of(run):
    return {ti.task_id: ti.xcom_pull(task_ids=ti.task_id) for ti in run.get_task_instances()}


def _files_containing(root: pathlib.Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.mark.parametrize("deferrable", ["true", "false"])
def test_both_dags_run_end_to_end(dag_env, emulator, monkeypatch, capfd, deferrable):
    monkeypatch.setenv("KLUSTER_COMMON_AI_DEFERRABLE", deferrable)
    run = load_dag().test()
    assert run.state == "success", task_states(run)
    assert set(task_states(run).values()) == {"success"}
    found = batches(emulator)
    assert len(found) == 2
    assert {b["status"] for b in found} == {"completed"}
    assert all(b["metadata"].get(IDENTITY_KEY) for b in found), found  # which task made it
    rows = {
        path.parent.name: [json.loads(line) for line in path.read_text().splitlines()]
        for path in dag_env.rglob("*.jsonl")
        if "_airflow_batch_state" not in str(path)
    }
    assert sorted(len(r) for r in rows.values()) == [2, 3]
    assert all(
        row["status"] == "success" and "Emulated answer" in row["output"] for r in rows.values() for row in r
    )
    out = capfd.readouterr()
    assert "'succeeded': 3" in out.out + out.err
    assert "'succeeded': 2" in out.out + out.err
    assert TEST_API_KEY not in out.out + out.err
    assert _files_containing(pathlib.Path(os.environ["AIRFLOW_HOME"]), TEST_API_KEY.encode()) == []
    assert _files_containing(dag_env, TEST_API_KEY.encode()) == []


def test_a_cleared_run_reattaches_and_pays_nothing_more(dag_env, emulator):
    when = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
    assert load_dag().test(logical_date=when, run_after=when).state == "success"
    assert emulator.emulator.counters.get("batches_created", 0) == 2
    assert load_dag().test(logical_date=when, run_after=when).state == "success"
    assert emulator.emulator.counters.get("batches_created", 0) == 2  # re-landed from the same batches


def test_a_crash_between_submit_and_record_finds_the_batch_again(dag_env, emulator, monkeypatch):
    real = state.write_submitted
    crashed: list[str] = []

    def crash_once(*args, **kwargs):
        if not crashed:
            crashed.append(kwargs["batch_id"])
            raise RuntimeError("worker died before recording the batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(state, "write_submitted", crash_once)
    when = dt.datetime(2026, 3, 4, 5, 6, 8, tzinfo=dt.timezone.utc)
    assert load_dag().test(logical_date=when, run_after=when).state == "failed"
    assert emulator.emulator.counters.get("batches_created", 0) == 2
    run = load_dag().test(logical_date=when, run_after=when)
    assert run.state == "success", task_states(run)
    # The orphaned batch was found through its metadata: still two batches, both used.
    assert emulator.emulator.counters.get("batches_created", 0) == 2
    assert crashed[0] in {m["batch_id"] for m in manifests_of(run).values() if m and "batch_id" in m}


def test_a_timeout_cancels_from_the_trigger(dag_env, emulator, monkeypatch):
    emulator.emulator.faults.stall_batch("*")
    monkeypatch.setenv("KLUSTER_COMMON_AI_TIMEOUT", "1")
    run = load_dag().test()
    assert run.state == "failed"
    assert task_states(run)["answer"] == "failed"
    found = batches(emulator)
    assert len(found) == 2
    assert {wait_until(emulator, b["id"], {"cancelled"})["status"] for b in found} == {"cancelled"}


def test_changed_input_cancels_the_stale_batch_and_resubmits(dag_env, emulator, monkeypatch):
    emulator.emulator.faults.stall_batch("*")
    monkeypatch.setenv("KLUSTER_COMMON_AI_TIMEOUT", "1")
    monkeypatch.setenv("KLUSTER_COMMON_AI_CANCEL_ON_TIMEOUT", "false")
    when = dt.datetime(2026, 3, 4, 5, 6, 9, tzinfo=dt.timezone.utc)
    assert load_dag().test(logical_date=when, run_after=when).state == "failed"
    first = emulator.emulator.list_batch_ids()
    assert {emulator.emulator.get_batch_raw(b)["status"] for b in first} == {"in_progress"}  # left running
    emulator.emulator.faults.unstall_batch("*")
    for batch_id in first:
        emulator.emulator.faults.stall_batch(batch_id)
    monkeypatch.setenv("KLUSTER_COMMON_AI_TIMEOUT", "600")
    monkeypatch.setenv("KLUSTER_COMMON_AI_PROMPT_SUFFIX", " Answer in Spanish.")
    run = load_dag().test(logical_date=when, run_after=when)
    assert run.state == "success", task_states(run)
    for batch_id in first:
        assert wait_until(emulator, batch_id, {"cancelled"})["status"] == "cancelled"
    later = [b for b in emulator.emulator.list_batch_ids() if b not in first]
    assert len(later) == 2
    assert {emulator.emulator.get_batch_raw(b)["status"] for b in later} == {"completed"}


def test_the_triggers_on_kill_cancels_through_the_adapter(kluster_conn, emulator, adapter):
    emulator.emulator.faults.stall_batch("*")
    submitted = submit(adapter)
    trigger = LLMBatchTrigger(
        llm_conn_id=kluster_conn,
        adapter="kluster",
        batch_id=submitted.batch_id,
        poll_interval=30,
        end_time=time.time() + 600,
        cancel_on_kill=True,
        cancel_on_timeout=True,
    )
    asyncio.run(trigger.on_kill())
    assert wait_until(emulator, submitted.batch_id, {"cancelled"})["status"] == "cancelled"
