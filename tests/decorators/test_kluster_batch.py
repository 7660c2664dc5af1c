"""``@task.kluster_batch`` against the emulator over HTTP: every return type, deferral and resume, mapping, bad returns."""

from __future__ import annotations

import json
import pathlib

import pendulum
import pytest
from airflow.sdk import DAG, ObjectStoragePath, task

from airflow_provider_kluster import get_provider_info
from airflow_provider_kluster.decorators.kluster_batch import (
    INPUT_NAME,
    REQUESTS_NAME,
    _KlusterBatchDecoratedOperator,
    kluster_batch_task,
)
from airflow_provider_kluster.exceptions import KlusterConfigError, KlusterRequestFileError
from airflow_provider_kluster.operators.job import KlusterBatchJobOperator
from tests.helpers import MODEL, make_context, request_lines, write_jsonl
from tests.operators.test_job import counters, records, trigger_event

try:
    from airflow.sdk.exceptions import TaskDeferred
except ImportError:  # Airflow < 3.2
    from airflow.exceptions import TaskDeferred

RUN = "manual__2026-03-03T00:00:00+00:00"
DAGS = pathlib.Path(__file__).parent / "dags"


@pytest.fixture
def fast(emulator):
    emulator.emulator.config.requests_per_second = 50_000
    return emulator


def build(function, *args, **kwargs) -> _KlusterBatchDecoratedOperator:
    """Return the operator ``@task.kluster_batch(**kwargs)`` makes of ``function(*args)``, as a DAG file would."""
    kwargs.setdefault("task_id", "ask")
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("deferrable", True)
    kwargs.setdefault("check_models", False)
    with DAG("kb_test", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        arg = task.kluster_batch(**kwargs)(function)(*args)
    operator = arg.operator
    assert isinstance(operator, _KlusterBatchDecoratedOperator)
    return operator


def context(task_id: str = "ask", **ti_fields):
    ti_fields.setdefault("run_id", RUN)
    return make_context(task_id, **ti_fields)


def run_to_end(first, ctx, *, again=None, max_waits: int = 200):
    """Execute, then run each trigger and resume — on a fresh operator from ``again()`` if given — until done.

    The resumed call gets only what Airflow keeps: the event and the deferral's kwargs, through JSON.
    """
    operator, method, kept = first, "execute", {}
    for waits in range(max_waits):
        try:
            return getattr(operator, method)(ctx, **kept), waits
        except TaskDeferred as deferred:
            kept = {**json.loads(json.dumps(deferred.kwargs or {})), "event": trigger_event(deferred)}
            method = deferred.method_name
            if again is not None:
                operator = again()
    raise AssertionError("the task never ended")


def test_the_decorator_is_registered_with_airflow():
    assert task.kluster_batch is kluster_batch_task
    (entry,) = get_provider_info()["task-decorators"]
    assert entry == {
        "name": "kluster_batch",
        "class-name": "airflow_provider_kluster.decorators.kluster_batch.kluster_batch_task",
    }
    assert issubclass(_KlusterBatchDecoratedOperator, KlusterBatchJobOperator)


def test_prompts_run_as_a_job_and_the_task_returns_the_manifest(kluster_conn, fast, tmp_path):
    def ask(topic):
        return [f"One fact about {topic}?", f"Another fact about {topic}?", "Why?"]

    op = build(ask, "rivers", model=MODEL, max_completion_tokens=40, destination=str(tmp_path / "out"))
    manifest, waits = run_to_end(op, context())
    assert waits >= 1  # it deferred
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (3, 3, 0, 0)
    assert len(manifest["batches"]) == 1
    assert pathlib.Path(manifest["records_path"]) == tmp_path / "out" / "results.jsonl"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["succeeded"] == 3
    sent = [json.loads(line) for line in (tmp_path / "out" / REQUESTS_NAME).read_text().splitlines()]
    assert [line["custom_id"] for line in sent] == ["request-0", "request-1", "request-2"]
    assert all(
        line["body"]["model"] == MODEL and line["body"]["max_completion_tokens"] == 40 for line in sent
    )
    assert sent[0]["body"]["messages"] == [{"role": "user", "content": "One fact about rivers?"}]
    assert {r["custom_id"] for r in records(manifest)} == {"request-0", "request-1", "request-2"}
    assert counters(fast) == (1, 1)


def _bodies(_tmp):
    return [{"custom_id": f"body-{i}", "messages": [{"role": "user", "content": f"{i}?"}]} for i in range(4)]


def _lines(_tmp):
    return request_lines(4, prefix="line")


def _path_str(tmp):
    return str(write_jsonl(tmp / "given.jsonl", request_lines(4, prefix="file")))


def _pathlib(tmp):
    return write_jsonl(tmp / "given.jsonl", request_lines(4, prefix="file"))


def _object_storage(tmp):
    return ObjectStoragePath(f"file://{write_jsonl(tmp / 'given.jsonl', request_lines(4, prefix='file'))}")


def _generator(_tmp):
    return (f"Question {i}?" for i in range(4))


@pytest.mark.parametrize(
    ("make", "prefix"),
    [
        (_bodies, "body"),
        (_lines, "line"),
        (_path_str, "file"),
        (_pathlib, "file"),
        (_object_storage, "file"),
        (_generator, "request"),
    ],
    ids=["chat-bodies", "request-lines", "path-str", "pathlib", "object-storage-path", "generator"],
)
def test_each_return_type(kluster_conn, fast, tmp_path, make, prefix):
    op = build(lambda: make(tmp_path), model=MODEL, destination=str(tmp_path / "out"))
    manifest, _ = run_to_end(op, context())
    assert manifest["succeeded"] == manifest["total"] == 4
    assert sorted(r["custom_id"] for r in records(manifest)) == [f"{prefix}-{i}" for i in range(4)]
    kept = (tmp_path / "out" / REQUESTS_NAME).exists()
    assert kept == (prefix != "file"), "a returned file is sent as it is, not copied"


def test_a_resumed_task_does_not_run_the_function_again(kluster_conn, fast, tmp_path):
    """Airflow re-creates the operator on resume: the new one finds the input without calling the function."""
    calls: list[str] = []

    def ask():
        calls.append("called")
        return [f"Question {i}?" for i in range(5)]

    def fresh():
        return build(ask, model=MODEL, destination=str(tmp_path / "out"))

    ctx = context()
    with pytest.raises(TaskDeferred) as caught:
        fresh().execute(ctx)
    assert calls == ["called"]
    assert not caught.value.kwargs  # nothing rides on the deferral: dag.test() would drop it
    kept = json.loads((tmp_path / "out" / INPUT_NAME).read_text())
    assert kept == {
        "dag_id": "test_dag",
        "run_id": RUN,
        "task_id": "ask",
        "map_index": -1,
        "input_file": str(tmp_path / "out" / REQUESTS_NAME),
    }
    # Resume on fresh operators (as Airflow does), from the event only.
    event = trigger_event(caught.value)
    try:
        manifest = fresh().execute_complete(ctx, event=event)
    except TaskDeferred as again:
        manifest = fresh().execute_complete(ctx, event=trigger_event(again))
    assert calls == ["called"], "the function ran once, in the first execute"
    assert manifest["succeeded"] == 5
    assert counters(fast) == (1, 1)


def test_many_deferrals_on_fresh_operators_run_the_function_once(kluster_conn, fast, tmp_path):
    fast.emulator.config.requests_per_second = 200  # slow enough for several waits
    calls: list[int] = []

    def ask():
        calls.append(1)
        return [f"Question {i}?" for i in range(60)]

    def fresh():
        return build(
            ask, model=MODEL, destination=str(tmp_path / "out"), max_requests=20, max_concurrent_batches=1
        )

    manifest, waits = run_to_end(fresh(), context(), again=fresh)
    assert waits >= 3
    assert calls == [1]
    assert manifest["succeeded"] == 60
    assert len(manifest["batches"]) == 3


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            lambda out: (out / REQUESTS_NAME).unlink(),
            r"its input .*requests.jsonl.* is gone.*reachable by every",
        ),
        (lambda out: (out / INPUT_NAME).unlink(), r"input.json, written by its first execute, is missing"),
        (
            lambda out: (out / INPUT_NAME).write_text(
                json.dumps({**json.loads((out / INPUT_NAME).read_text()), "map_index": 4})
            ),
            r"belongs to task ask \(map index 4\)",
        ),
    ],
    ids=["requests-gone", "input-json-gone", "another-instance"],
)
def test_a_resume_without_its_kept_input_says_so(kluster_conn, fast, tmp_path, damage, match):
    calls: list[int] = []
    op = build(lambda: calls.append(1) or ["Hello?"], model=MODEL, destination=str(tmp_path / "out"))
    with pytest.raises(TaskDeferred) as caught:
        op.execute(context())
    damage(tmp_path / "out")
    fresh = build(lambda: calls.append(1) or ["Hello?"], model=MODEL, destination=str(tmp_path / "out"))
    with pytest.raises(KlusterConfigError, match=match):
        fresh.execute_complete(context(), event=trigger_event(caught.value))
    assert calls == [1]


def test_not_deferrable_waits_on_the_worker(kluster_conn, fast, tmp_path):
    op = build(lambda: ["Hello?", "Bye?"], model=MODEL, destination=str(tmp_path / "out"), deferrable=False)
    manifest = op.execute(context())  # no TaskDeferred
    assert manifest["succeeded"] == 2


@pytest.mark.parametrize(
    ("returned", "match", "error"),
    [
        (None, r"returned None; return a list of prompt strings", KlusterConfigError),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"returned a dict \(one request goes in a list",
            KlusterConfigError,
        ),
        (42, r"returned a int", KlusterConfigError),
        (b"What?", r"returned a bytes", KlusterConfigError),
        ("", r"returned an empty string", KlusterConfigError),
        ("What is 2 + 2?", r"names no file.*return them in a list", KlusterConfigError),
        ([], r"No requests to write", KlusterRequestFileError),
        (["fine", 7], r"Request item 1 is int", KlusterRequestFileError),
        (
            [
                {"custom_id": "x", "messages": []},
                {"custom_id": "x", "messages": [{"role": "user", "content": "a"}]},
            ],
            r"would have .*nothing was written",
            KlusterRequestFileError,
        ),
    ],
    ids=[
        "none",
        "dict",
        "int",
        "bytes",
        "empty-string",
        "prompt-as-string",
        "empty-list",
        "bad-item",
        "bad-lines",
    ],
)
def test_a_bad_return_value_fails_before_any_upload(kluster_conn, fast, tmp_path, returned, match, error):
    op = build(lambda: returned, model=MODEL, destination=str(tmp_path / "out"))
    with pytest.raises(error, match=match):
        op.execute(context())
    assert counters(fast) == (0, 0)
    assert not (tmp_path / "out" / REQUESTS_NAME).exists()


def test_a_returned_file_with_a_bad_line_fails_before_any_upload(kluster_conn, fast, tmp_path):
    lines = request_lines(5)
    del lines[3]["body"]["messages"]
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(KlusterRequestFileError, match="line 4"):
        build(lambda: str(source), destination=str(tmp_path / "out")).execute(context())
    assert counters(fast) == (0, 0)


def test_bad_parameters_are_refused_before_the_function_runs(kluster_conn, fast, tmp_path):
    calls: list[int] = []
    op = build(
        lambda: calls.append(1) or ["Hi?"], model=MODEL, destination=str(tmp_path / "out"), max_attempts=0
    )
    with pytest.raises(KlusterConfigError, match="max_attempts"):
        op.execute(context())
    assert calls == []


@pytest.mark.parametrize("name", ["input_file", "requests"])
def test_the_input_comes_only_from_the_function(name):
    with pytest.raises(TypeError, match=f"do not pass {name}="):
        build(lambda: ["Hi?"], destination="/tmp/x", **{name: ["Hi?"]})


def test_without_destination_each_task_instance_gets_its_own(kluster_conn, fast, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    manifests = []
    for index in (0, 1):
        op = build(lambda: ["Hello?"], model=MODEL)
        manifest, _ = run_to_end(op, context(map_index=index))
        manifests.append(manifest)
    paths = [pathlib.Path(m["records_path"]).parent for m in manifests]
    root = tmp_path / "airflow-kluster-batch" / "test_dag" / "manual__2026-03-03T00_00_00_00_00" / "ask"
    assert paths == [root / "0", root / "1"]


def test_two_task_instances_of_a_run_may_not_share_a_destination(kluster_conn, fast, tmp_path):
    one_folder = str(tmp_path / "destination")
    run_to_end(build(lambda: ["Hello?"], model=MODEL, destination=one_folder), context(map_index=0))
    with pytest.raises(KlusterConfigError, match=r"already used by task ask \(map index 0\).*ti.map_index"):
        build(lambda: ["Hello?"], model=MODEL, destination=one_folder).execute(context(map_index=1))
    # A retry of the same task instance, or a later run, may reuse it.
    run_to_end(build(lambda: ["Hello?"], model=MODEL, destination=one_folder), context(map_index=0))
    run_to_end(
        build(lambda: ["Hello?"], model=MODEL, destination=one_folder),
        context(map_index=1, run_id="manual__2026-03-04T00:00:00+00:00"),
    )


def test_destination_is_templated(kluster_conn, fast, tmp_path):
    op = build(lambda: ["Hello?"], model=MODEL, destination=str(tmp_path) + "/{{ params.where }}")
    assert "destination" in op.template_fields
    assert "input_file" in op.template_fields
    assert "requests" not in op.template_fields
    op.destination = op.render_template(op.destination, {"params": {"where": "rendered"}})
    manifest, _ = run_to_end(op, context())
    assert pathlib.Path(manifest["records_path"]) == tmp_path / "rendered" / "results.jsonl"


@pytest.fixture
def expand_env(emulator, kluster_conn, airflow_db, monkeypatch, tmp_path):
    import airflow.settings

    # dag.test() runs DAGs of the configured dags folder's bundle: for this test, that is ours.
    monkeypatch.setattr(airflow.settings, "DAGS_FOLDER", str(DAGS))
    monkeypatch.setenv("KLUSTER_TEST_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("KLUSTER_TEST_CALLS", str(tmp_path / "calls.txt"))
    return tmp_path


def _dag(dag_id: str):
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def test_expand_over_three_inputs_runs_three_jobs_under_dag_test(expand_env, emulator):
    run = _dag("kluster_batch_expand").test()
    states = {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert states == {
        ("ask", 0): "success",
        ("ask", 1): "success",
        ("ask", 2): "success",
        ("collect", -1): "success",
    }
    # Three jobs, one batch each, each in its own destination; the function ran once per mapped task.
    batches = [emulator.emulator.get_batch_raw(b) for b in emulator.emulator.list_batch_ids()]
    assert len(batches) == 3
    assert {b["status"] for b in batches} == {"completed"}
    assert sorted((expand_env / "calls.txt").read_text().split()) == ["deserts", "mountains", "rivers"]
    for index in range(3):
        manifest = json.loads((expand_env / "out" / str(index) / "manifest.json").read_text())
        assert manifest["succeeded"] == manifest["total"] == 2
    answered = {
        json.loads(line)["content"]
        for index in range(3)
        for line in (expand_env / "out" / str(index) / "results.jsonl").read_text().splitlines()
    }
    assert len(answered) >= 1


@pytest.mark.parametrize("destination", ["", "   "])
def test_an_empty_destination_is_refused(kluster_conn, fast, destination):
    with pytest.raises(KlusterConfigError, match="destination"):
        build(lambda: ["Hi?"], model=MODEL, destination=destination).execute(context())
    assert counters(fast) == (0, 0)


def test_a_function_that_raises_leaves_nothing_to_resume_from(kluster_conn, fast, tmp_path):
    def boom():
        raise RuntimeError("upstream data missing")

    with pytest.raises(RuntimeError, match="upstream data missing"):
        build(boom, model=MODEL, destination=str(tmp_path / "out")).execute(context())
    assert json.loads((tmp_path / "out" / INPUT_NAME).read_text())["input_file"] is None
    with pytest.raises(KlusterConfigError, match="is gone"):
        build(boom, model=MODEL, destination=str(tmp_path / "out")).execute_complete(context(), event={})
    assert counters(fast) == (0, 0)
