"""Read a stopped task instance's state and current try back from Airflow, never hanging the caller.

Both questions go through the task SDK's supervisor comms (``SUPERVISOR_COMMS``), the channel a task process or
the triggerer's trigger runner has to the execution API. On a worker they are asked from ``on_kill``, which runs
in Airflow's SIGTERM handler: ``CommsDecoder.send`` holds a non-reentrant lock, so if the signal arrived while the
main thread was inside a ``send`` the same thread would wait on itself forever. :func:`read_facts` therefore asks in
a daemon thread and gives up after a timeout: an answer that does not come in time is "unknown", and an unknown
never cancels a batch.

The current try is read with the execution API's "previous task instance" query (``GetPreviousTI``, Airflow
3.2+): the newest task instance of the task with a logical date *before* the one given, so asking with this
run's logical date plus a microsecond answers this run's task instance, with its ``try_number`` — checked by its
``run_id``. Below 3.2, or for a run without a logical date that is not the task's newest, it is ``None``.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any

from airflow_provider_kluster.cancelling import UNKNOWN_STATE, state_in


@dataclass(frozen=True)
class TaskInstanceRef:
    """Which task instance stopped, and the try that was running (or deferred) when it did."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int | None
    logical_date: str | None = None  # ISO 8601, or None for a run without one

    @classmethod
    def of(cls, ti: Any, logical_date: Any = None) -> TaskInstanceRef:
        """Build one from a task instance (runtime or trigger's) and the run's logical date, if known."""
        map_index = getattr(ti, "map_index", -1)
        try_number = getattr(ti, "try_number", None)
        if isinstance(logical_date, dt.datetime):
            logical_date = logical_date.isoformat()
        return cls(
            dag_id=str(ti.dag_id),
            task_id=str(ti.task_id),
            run_id=str(ti.run_id),
            map_index=-1 if map_index is None else int(map_index),
            try_number=None if try_number is None else int(try_number),
            logical_date=None if logical_date is None else str(logical_date),
        )


@dataclass(frozen=True)
class TaskFacts:
    """What Airflow said: the state (:data:`UNKNOWN_STATE` if unread), the current try (``None`` if unread)."""

    state: str | None
    current_try: int | None
    note: str = ""  # why something could not be read, for the log


def read_state(ref: TaskInstanceRef) -> str | None:
    """Ask Airflow for the task instance's state (blocking; raises when it cannot be asked)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    states = RuntimeTaskInstance.get_task_states(
        dag_id=ref.dag_id, task_ids=[ref.task_id], run_ids=[ref.run_id], map_index=ref.map_index
    )
    return state_in(states, ref.run_id, ref.task_id, ref.map_index)


def read_current_try(ref: TaskInstanceRef) -> int | None:
    """Ask Airflow for the task instance's current try number (blocking).

    ``None`` when this Airflow cannot tell (no ``GetPreviousTI`` before 3.2) or the answer is another run's task
    instance; raises when Airflow cannot be asked.
    """
    try:
        from airflow.sdk.execution_time import comms, task_runner
    except ImportError:
        return None
    message_type = getattr(comms, "GetPreviousTI", None)
    if message_type is None:  # Airflow < 3.2
        return None
    before = None
    if ref.logical_date is not None:
        before = dt.datetime.fromisoformat(ref.logical_date) + dt.timedelta(microseconds=1)
    answer = task_runner.SUPERVISOR_COMMS.send(
        message_type(dag_id=ref.dag_id, task_id=ref.task_id, logical_date=before, map_index=ref.map_index)
    )
    ti = getattr(answer, "task_instance", None)
    if ti is None or str(getattr(ti, "run_id", "")) != ref.run_id:
        return None
    try_number = getattr(ti, "try_number", None)
    return None if try_number is None else int(try_number)


def ask(ref: TaskInstanceRef, *, with_try: bool = True) -> TaskFacts:
    """Read the state, then (``with_try``: a task process only) the current try, in the calling thread; never raises."""
    try:
        state = read_state(ref)
    except Exception as exc:
        return TaskFacts(UNKNOWN_STATE, None, f"its state could not be read: {exc}")
    if not with_try:
        return TaskFacts(state, None)
    try:
        current_try = read_current_try(ref)
    except Exception as exc:
        return TaskFacts(state, None, f"its current try could not be read: {exc}")
    note = "" if current_try is not None else "this Airflow did not say which try the task instance is on"
    return TaskFacts(state, current_try, note)


def read_facts(ref: TaskInstanceRef, *, timeout: float) -> TaskFacts:
    """:func:`ask` in a daemon thread, waiting at most ``timeout`` seconds: safe from a signal handler.

    A thread still blocked (the comms lock held by the interrupted main thread, an API that does not answer) is
    left behind — it is a daemon and holds nothing of the caller's — and the answer is unknown.
    """
    result: list[TaskFacts] = []
    worker = threading.Thread(
        target=lambda: result.append(ask(ref)), name="kluster-read-task-state", daemon=True
    )
    worker.start()
    worker.join(max(0.0, timeout))
    if result:
        return result[0]
    return TaskFacts(
        UNKNOWN_STATE,
        None,
        f"Airflow did not answer within {timeout:.1f}s (the task's channel to Airflow may be busy or blocked)",
    )
