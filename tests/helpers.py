"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import pathlib
import time

from airflow_provider_kluster.batches import KlusterBatch

REPO = pathlib.Path(__file__).resolve().parents[1]
# kluster.ai's published examples, copied into the repository (sources and dates in its README.md).
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "kluster"
MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def request_lines(n: int, model: str = MODEL, prefix: str = "request") -> list[dict]:
    """Return ``n`` valid batch input lines."""
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
        }
        for i in range(n)
    ]


def write_jsonl(path: pathlib.Path, lines: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def wait_for(hook, batch_id: str, *, until=lambda b: b.is_terminal, timeout: float = 30.0) -> KlusterBatch:
    """Poll a batch through the hook until ``until`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        batch = hook.get_batch(batch_id)
        if until(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status_text} after {timeout}s")
        time.sleep(0.05)


class FakeTI:
    """The slice of a task instance the operators use: identity, XCom push and pull kept in a dict."""

    def __init__(
        self,
        task_id: str = "task",
        *,
        dag_id: str = "test_dag",
        run_id: str | None = None,
        map_index: int = -1,
    ):
        import uuid

        self.dag_id = dag_id
        self.task_id = task_id
        self.run_id = run_id or f"manual__{uuid.uuid4().hex}"
        self.map_index = map_index
        self.xcom: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        json.dumps(value)  # XCom values must be JSON-native
        self.xcom[key] = value

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value") -> object:
        return self.xcom.get(key)


def make_context(task_id: str = "task", **ti_fields) -> dict:
    """Return a minimal execution context for calling ``execute`` directly (a new run unless ``run_id`` given)."""
    return {"ti": FakeTI(task_id, **ti_fields)}


def run_deferred(operator, context: dict, timeout: float = 30.0):
    """Execute a deferrable operator: catch its deferral, run the trigger, resume it with the event."""
    import asyncio

    try:
        from airflow.sdk.exceptions import TaskDeferred
    except ImportError:  # Airflow < 3.2
        from airflow.exceptions import TaskDeferred

    try:
        return operator.execute(context)
    except TaskDeferred as deferred:
        assert deferred.timeout is None, "defer with timeout=None so a deadline reaches execute_complete"  # noqa: PT017
        classpath, kwargs = deferred.trigger.serialize()
        trigger = type(deferred.trigger)(
            **json.loads(json.dumps(kwargs))
        )  # as the triggerer would rebuild it

        async def first():
            async for event in trigger.run():
                return event.payload

        event = asyncio.run(asyncio.wait_for(first(), timeout))
        return getattr(operator, deferred.method_name)(context, event=event, **(deferred.kwargs or {}))
