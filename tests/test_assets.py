"""Results as Airflow Assets: outlets declared at parse time, the event extra, a DAG scheduled on the asset.

``dag.test()`` runs no scheduler, so "the consumer DAG runs" is shown in two steps, each with Airflow's own code:
the producer's run writes the ``AssetEvent`` (with our extra) and an ``AssetDagRunQueue`` row for the consumer,
and ``DagModel.dags_needing_dagruns`` — the scheduler's query — then names the consumer as due. The consumer is
run with ``dag.test()``, its run given the queued events as the scheduler's ``_create_dag_runs_asset_triggered``
gives them (``consumed_asset_events``, queue rows deleted): its task reads them from ``triggering_asset_events``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from unittest import mock

import pytest
from airflow.sdk import Asset

from airflow_provider_kluster.exceptions import KlusterConfigError
from airflow_provider_kluster.lineage import as_asset, attach_event_extra, declare_results_asset, event_extra
from airflow_provider_kluster.operators.job import KlusterBatchJobOperator
from airflow_provider_kluster.operators.kluster import (
    KlusterGetBatchResultsOperator,
    KlusterSubmitBatchOperator,
)
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import MODEL, make_context, request_lines, write_jsonl
from tests.test_example_dags import load_dagbag

ANSWERS = Asset(name="kluster_example_answers", uri="file:///kluster-results/example-answers")
CONSUMER = "kluster_results_asset_consumer"
EXTRA_KEYS = {
    "kind",
    "batch_ids",
    "models",
    "completion_window",
    "status",
    "total",
    "succeeded",
    "failed",
    "missing",
    "usage",
    "cost",
    "records_path",
    "manifest_path",
    "attempts",
}


@pytest.fixture
def example_env(emulator, monkeypatch, tmp_path, airflow_db):
    """The example DAGs' settings, as in tests/test_example_dags.py."""
    monkeypatch.setenv("AIRFLOW_CONN_KLUSTER_DEFAULT", conn_json(emulator.base_url, max_retries=2))
    monkeypatch.setenv("KLUSTER_EXAMPLE_POLL_INTERVAL", "0.2")
    monkeypatch.setenv("KLUSTER_EXAMPLE_OUTPUT", str(tmp_path / "results"))
    return tmp_path / "results"


# -- declaring the asset ---------------------------------------------------------------------------------


def test_a_string_becomes_an_asset_named_and_located_by_it():
    assert as_asset("s3://bucket/kluster/answers") == Asset("s3://bucket/kluster/answers")
    assert as_asset("kluster_answers").name == "kluster_answers"
    assert as_asset(ANSWERS) is ANSWERS
    assert as_asset(None) is None
    with pytest.raises(KlusterConfigError, match="results_asset"):
        as_asset(42)  # type: ignore[arg-type]
    with pytest.raises(KlusterConfigError, match="results_asset"):
        as_asset("  ")


@pytest.mark.parametrize("operator_class", [KlusterGetBatchResultsOperator, KlusterBatchJobOperator])
def test_results_asset_is_an_outlet_from_construction_beside_the_users(operator_class):
    mine = Asset("s3://bucket/mine")
    kwargs = {"batch_id": "b"} if operator_class is KlusterGetBatchResultsOperator else {"requests": ["hi"]}
    op = operator_class(
        task_id="t", destination="/tmp/x", outlets=[mine], results_asset="s3://bucket/answers", **kwargs
    )
    assert op.outlets == [mine, Asset("s3://bucket/answers")]
    assert op.results_asset == Asset("s3://bucket/answers")
    # Given twice, it is one outlet.
    again = operator_class(
        task_id="u", destination="/tmp/x", outlets=[ANSWERS], results_asset=ANSWERS, **kwargs
    )
    assert again.outlets == [ANSWERS]
    assert operator_class(task_id="v", destination="/tmp/x", **kwargs).outlets == []


def test_the_asset_is_in_the_parsed_dag(example_env):
    bag = load_dagbag()
    task = bag.get_dag("kluster_results_asset_batch").get_task("results")
    assert ANSWERS in task.outlets
    assert ANSWERS in bag.get_dag("kluster_results_asset_job").get_task("job").outlets


def test_declare_results_asset_keeps_outlets_unchanged_without_one():
    class Op:
        outlets = [ANSWERS]

    op = Op()
    assert declare_results_asset(op, None) is None
    assert op.outlets == [ANSWERS]


# -- the extra -------------------------------------------------------------------------------------------


def test_the_extra_of_a_batch_manifest():
    manifest = {
        "batch_id": "batch-1",
        "status": "completed",
        "records_path": "/tmp/r/batch-1.results.jsonl",
        "succeeded": 3,
        "failed": 1,
        "missing": 0,
        "total": 4,
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        "failed_ids": ["x"],
        "first_errors": ["429"],
    }
    extra = event_extra(manifest, models=[MODEL], completion_window="24h")
    assert set(extra) == EXTRA_KEYS
    assert extra["kind"] == "batch"
    assert extra["batch_ids"] == ["batch-1"]
    assert extra["models"] == [MODEL]
    assert (extra["total"], extra["succeeded"], extra["failed"], extra["missing"]) == (4, 3, 1, 0)
    assert extra["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert extra["cost"] is None
    assert json.loads(json.dumps(extra)) == extra


def test_the_extra_of_a_job_manifest_has_its_cost_and_every_model():
    manifest = {
        "total": 2,
        "succeeded": 2,
        "failed": 0,
        "missing": 0,
        "attempts": 1,
        "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8},
        "usage_by_model": {MODEL: {"prompt_tokens": 4}, "unknown": {}},
        "batches": [{"id": "b1", "part": "a1s0"}, {"id": "b2", "part": "a1s1"}],
        "cost": {
            "unit": "USD per token",
            "currency": "USD",
            "estimate": {"total_usd": 0.5, "per_model": {"other/model": {}}},
            "actual_usd": 0.25,
        },
        "records_path": "/tmp/j/results.jsonl",
        "manifest_path": "/tmp/j/manifest.json",
    }
    extra = event_extra(manifest, completion_window="24h")
    assert extra["kind"] == "job"
    assert extra["batch_ids"] == ["b1", "b2"]
    assert extra["models"] == sorted([MODEL, "other/model"])
    assert extra["cost"] == {
        "estimate_usd": 0.5,
        "actual_usd": 0.25,
        "currency": "USD",
        "unit": "USD per token",
    }
    assert extra["manifest_path"] == "/tmp/j/manifest.json"
    assert extra["attempts"] == 1


def test_attach_goes_to_every_asset_outlet_and_skips_aliases_and_contexts_without_events():
    from airflow.sdk import AssetAlias
    from airflow.sdk.execution_time.context import OutletEventAccessors

    events = OutletEventAccessors()
    mine = Asset("s3://bucket/mine")
    attached = attach_event_extra(
        {"outlet_events": events}, [mine, ANSWERS, AssetAlias("alias")], {"total": 1, "batch_ids": ["b"]}
    )
    assert attached == [mine, ANSWERS]
    assert events[mine].extra == events[ANSWERS].extra == {"total": 1, "batch_ids": ["b"]}
    assert events[AssetAlias("alias")].extra == {}
    assert attach_event_extra({}, [mine], {"total": 1}) == []


def test_the_results_operator_attaches_the_extra_to_the_users_outlets_too(kluster_conn, emulator, tmp_path):
    """Called as a task would call it: the context's outlet events get the extra; so does a user's outlet."""
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from tests.helpers import run_deferred

    submit = KlusterSubmitBatchOperator(
        task_id="submit",
        input_file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(3))),
        wait_for_completion=True,
        deferrable=True,
        poll_interval=0.1,
    )
    batch_id = run_deferred(submit, make_context("submit"))
    mine = Asset("s3://bucket/mine")
    results = KlusterGetBatchResultsOperator(
        task_id="results",
        batch_id=batch_id,
        destination=str(tmp_path / "out"),
        outlets=[mine],
        results_asset=ANSWERS,
    )
    context = {**make_context("results"), "outlet_events": OutletEventAccessors()}
    manifest = results.execute(context)
    events = context["outlet_events"]
    extra = events[ANSWERS].extra
    assert events[mine].extra == extra
    assert extra["batch_ids"] == [batch_id]
    assert extra["models"] == [MODEL]
    assert extra["completion_window"] == "24h"
    assert (extra["total"], extra["succeeded"], extra["failed"], extra["missing"]) == (3, 3, 0, 0)
    assert extra["usage"] == manifest["usage"]
    assert extra["records_path"] == manifest["records_path"]
    assert TEST_API_KEY not in json.dumps(extra)


# -- end to end: producer, the queue, the consumer -------------------------------------------------------


def _events_of(run_id: str) -> list:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent, AssetModel)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetEvent.source_run_id == run_id)
        ).all()
        return [
            {"name": asset.name, "uri": asset.uri, "extra": dict(event.extra), "task": event.source_task_id}
            for event, asset in rows
        ]


def _consumer_is_due() -> bool:
    """Ask the scheduler's own query whether the consumer DAG should get an asset-triggered run."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        _query, triggered = DagModel.dags_needing_dagruns(session)
        due = CONSUMER in triggered
        session.rollback()  # the query locks rows (SELECT ... FOR UPDATE); release, as the scheduler would
    return due


@contextmanager
def _runs_consume_their_queue():
    """Give a ``dag.test()`` run of a consumer the asset events queued for it, as the scheduler would."""
    import airflow.models.dagrun as dagrun_module
    from airflow.models.asset import AssetDagRunQueue, AssetEvent
    from sqlalchemy import select

    real = dagrun_module.get_or_create_dagrun

    def create(*, dag, session, **kwargs):
        run = real(dag=dag, session=session, **kwargs)
        queued = session.scalars(
            select(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == dag.dag_id)
        ).all()
        if queued:
            events = session.scalars(
                select(AssetEvent)
                .where(AssetEvent.asset_id.in_({q.asset_id for q in queued}))
                .where(AssetEvent.timestamp <= max(q.created_at for q in queued))
                .order_by(AssetEvent.timestamp)
            ).all()
            run.consumed_asset_events.extend(events)
            for row in queued:
                session.delete(row)
            session.commit()
        return run

    with mock.patch.object(dagrun_module, "get_or_create_dagrun", create):
        yield


def _clear_queue() -> None:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == CONSUMER))


@pytest.mark.parametrize(
    ("producer", "kind", "task_id", "batches"),
    [("kluster_results_asset_batch", "batch", "results", 1), ("kluster_results_asset_job", "job", "job", 2)],
)
def test_a_producer_publishes_the_extra_and_the_consumer_runs_on_it(
    producer, kind, task_id, batches, example_env, emulator, capsys
):
    _clear_queue()
    bag = load_dagbag()
    run = bag.get_dag(producer).test()
    assert run.state == "success"

    (event,) = _events_of(run.run_id)
    assert (event["name"], event["uri"], event["task"]) == (ANSWERS.name, ANSWERS.uri, task_id)
    extra = event["extra"]
    assert set(extra) == EXTRA_KEYS
    assert extra["kind"] == kind
    assert sorted(extra["batch_ids"]) == sorted(emulator.emulator.list_batch_ids())
    assert len(extra["batch_ids"]) == batches
    assert extra["models"] == [MODEL]
    assert extra["failed"] == extra["missing"] == 0
    assert extra["succeeded"] == extra["total"] == (3 if kind == "batch" else 8)
    assert extra["usage"]["total_tokens"] > 0
    assert extra["completion_window"] == "24h"
    if kind == "job":
        assert extra["cost"]["actual_usd"] > 0
        assert extra["cost"]["estimate_usd"] >= extra["cost"]["actual_usd"]
    with open(extra["records_path"]) as records:
        assert len(records.read().splitlines()) == extra["total"]
    assert TEST_API_KEY not in json.dumps(extra)

    assert _consumer_is_due()
    with _runs_consume_their_queue():
        consumed = bag.get_dag(CONSUMER).test()
    assert consumed.state == "success"
    assert not _consumer_is_due()
    out = capsys.readouterr().out
    assert (
        f"{kind} {', '.join(extra['batch_ids'])} ({MODEL}): {extra['total']} of {extra['total']} succeeded"
        in out
    )
    ti = consumed.get_task_instance("read_answers")
    assert ti.state == "success"
