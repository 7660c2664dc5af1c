"""KlusterBatchTrigger: wait for a kluster.ai batch in the triggerer, fully async."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_kluster.batches import KlusterBatch
from airflow_provider_kluster.cancelling import (
    DEFAULT_CANCEL_BUDGET,
    UNKNOWN_STATE,
    CancelAttempts,
    cancel_done,
    judge_kill,
    not_cancelled_message,
)
from airflow_provider_kluster.exceptions import KlusterAPIError, KlusterNotFoundError
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.ti_state import TaskFacts, TaskInstanceRef, ask
from airflow_provider_kluster.waiting import DEFAULT_MAX_CONSECUTIVE_ERRORS, WaitPolicy

__all__ = ["DEFAULT_MAX_CONSECUTIVE_ERRORS", "FIRST_POLL_SPREAD", "KlusterBatchTrigger"]
#: The first poll waits a random share of this (capped by the poll interval), so that a triggerer restarting with
#: a thousand waiting batches spreads their polls instead of sending them all in the same instant.
FIRST_POLL_SPREAD = 10.0
#: What Airflow 3.3+ passes when it cancels a trigger because a person acted on its task
#: (``airflow.jobs.triggerer_job_runner._USER_ACTION_CANCEL_MSG``); a shutdown cancels without it.
USER_ACTION_CANCEL_MSG = "__airflow_user_action__"
_T = TypeVar("_T")


def _by_user_action(exc: asyncio.CancelledError) -> bool:
    return bool(exc.args) and exc.args[0] == USER_ACTION_CANCEL_MSG


#: The triggerer's own log: lines written here outside any trigger's context go to the triggerer process's log.
_TRIGGERER_LOG = logging.getLogger(__name__)
#: Cancels in flight in this triggerer, by batch id: held here so nothing but their own end stops them.
_CANCELS: dict[str, asyncio.Task[None]] = {}
#: Seconds past the cancel budget that on_kill keeps absorbing Airflow's repeated kills (about one a second).
_GRACE = 30.0
#: Longest wait for Airflow to tell the task instance's state.
_STATE_TIMEOUT = 20.0


class KlusterBatchTrigger(BaseTrigger):
    """Poll a kluster.ai batch until it stops, then fire exactly one event.

    What each poll means is decided by :class:`~airflow_provider_kluster.waiting.WaitPolicy`, the same rules
    the worker-side waits follow; this class only drives it on the triggerer's event loop.

    Everything runs on the triggerer's event loop through the async client, shared by every trigger of the same
    connection in the process. The deadline is an absolute wall-clock instant (epoch seconds) fixed when the batch
    was submitted, so a triggerer restart resumes the same deadline instead of starting a new one.

    The event's ``status`` is one of ``success``, ``failed``, ``expired``, ``cancelled``, ``timeout`` or ``error``;
    it also carries ``batch_id``, ``batch_status``, ``request_counts``, ``output_file_id``, ``error_file_id``,
    ``errors`` and ``message`` — all JSON-native.

    :param batch_id: The batch to wait for.
    :param kluster_conn_id: The Airflow connection of the batch (only its id is serialized, never the key).
    :param poll_interval: Seconds between polls.
    :param deadline: Epoch seconds after which the wait ends with a ``timeout`` event; ``None`` waits as long as
        the batch runs (kluster ends it at its completion window anyway).
    :param cancel_on_kill: Cancel the batch when a person clears the deferred task or marks it failed (Airflow 3.3+);
        never when the trigger merely moves to another triggerer.
    :param cancel_on_mark_success: Also cancel it when the task is marked success.
    :param cancel_budget: Seconds a cancel keeps retrying transient failures before it logs an ERROR.
    :param max_consecutive_errors: Transient poll failures tolerated in a row before an ``error`` event.
    :param logical_date: The DAG run's logical date (ISO 8601), so that a kill can read the task instance's
        current try back from Airflow (``None``: a run without one; the try is then read only when this run is
        the task's newest).
    """

    def __init__(
        self,
        batch_id: str,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        poll_interval: float = 60.0,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
        cancel_on_mark_success: bool = False,
        cancel_budget: float = DEFAULT_CANCEL_BUDGET,
        logical_date: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.kluster_conn_id = kluster_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.cancel_on_mark_success = bool(cancel_on_mark_success)
        self.cancel_budget = float(cancel_budget)
        self.logical_date = None if logical_date is None else str(logical_date)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and JSON-native kwargs that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_id": self.batch_id,
                "kluster_conn_id": self.kluster_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "cancel_on_kill": self.cancel_on_kill,
                "max_consecutive_errors": self.max_consecutive_errors,
                "cancel_on_mark_success": self.cancel_on_mark_success,
                "cancel_budget": self.cancel_budget,
                "logical_date": self.logical_date,
            },
        )

    def _hook(self) -> KlusterHook:
        hook = self.__dict__.get("_kluster_hook")
        if hook is None:
            hook = self.__dict__["_kluster_hook"] = KlusterHook(self.kluster_conn_id)
        return hook

    def policy(self) -> WaitPolicy:
        """Return a fresh :class:`~airflow_provider_kluster.waiting.WaitPolicy` for this trigger's wait."""
        return WaitPolicy(
            batch_id=self.batch_id,
            poll_interval=self.poll_interval,
            deadline=self.deadline,
            max_consecutive_errors=self.max_consecutive_errors,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the batch is terminal, the deadline passes, or polling fails for good; yield one event.

        When Airflow 3.3+ cancels the trigger *by user action* (its message), the kill is handled here, before
        Airflow's own call of :meth:`on_kill`: the trigger stays alive — absorbing the kill Airflow re-sends about
        once a second — until the cancel's outcome is known, so every line of it lands in the task's log. A
        cancel without that message (the triggerer shutting down) ends the wait at once, cancelling nothing.
        """
        hook = self._hook()
        try:
            async with hook.async_client_lease():  # one client for the whole wait, let go before the event
                event = await self._wait(hook, self.policy())
        except asyncio.CancelledError as exc:
            if _by_user_action(exc):
                await self._handle_kill(absorb=_by_user_action)
            raise
        yield TriggerEvent(event)

    async def _wait(self, hook: KlusterHook, policy: WaitPolicy) -> dict[str, Any]:
        await asyncio.sleep(
            policy.clamp(random.uniform(0, min(self.poll_interval, FIRST_POLL_SPREAD)), time.time())
        )
        while True:
            # The policy decides after each poll; a batch that finished just in time is not timed out.
            try:
                result: KlusterBatch | KlusterAPIError = await hook.aget_batch(self.batch_id)
            except KlusterAPIError as exc:
                result = exc
            decision = policy.decide(result, time.time())
            decision.log_to(self.log)
            if decision.event is not None:
                return decision.event
            await asyncio.sleep(decision.delay)

    async def on_kill(self) -> None:
        """Cancel the batch when a person acted on the deferred task (Airflow 3.3+), and make that cancel land.

        Airflow calls this for every trigger it takes away from this triggerer, also when another triggerer took
        the trigger over (a stall past the HA hand-over): the task instance's state, read back from Airflow,
        tells which (:func:`~airflow_provider_kluster.cancelling.judge_kill`). A cancel, once decided, runs as
        its own task: Airflow re-sends the kill about once a second and may time ``on_kill`` out, and neither
        interrupts it; transient failures are retried for up to ``cancel_budget`` seconds, and the outcome is
        logged (``cancelling``/``cancelled``, or an ERROR naming the batch). A kill already handled by
        :meth:`run` is not handled twice.
        """
        if self.__dict__.get("_kill_handled"):
            return
        await self._handle_kill(absorb=lambda _: True)

    async def _handle_kill(self, *, absorb: Callable[[asyncio.CancelledError], bool]) -> None:
        """Decide whether the kill cancels the batch and, if so, stay with the cancel until it ends.

        :param absorb: Which interruptions of this wait to sit out (others are raised): a repeated kill or
            ``on_kill``'s own timeout never stops the cancel itself, which runs as its own task.
        """
        self.__dict__["_kill_handled"] = True
        let_go = time.monotonic() + self.cancel_budget + _GRACE
        if not self.cancel_on_kill:
            self.log.info(
                "Deferred task stopped; batch %s left running (cancel_on_kill=False)", self.batch_id
            )
            return
        facts = await self._hold(asyncio.ensure_future(self._task_facts()), absorb, let_go)
        if facts.note:
            self.log.warning("Reading the task instance back from Airflow: %s", facts.note)
        own_try = getattr(self.task_instance, "try_number", None)
        verdict = judge_kill(
            facts.state,
            where="triggerer",
            cancel_on_mark_success=self.cancel_on_mark_success,
            own_try=None if own_try is None else int(own_try),
            current_try=facts.current_try,
        )
        if not verdict.cancel:
            self._tell(logging.WARNING, "Batch %s NOT cancelled: %s.", self.batch_id, verdict.reason)
            return
        job = _CANCELS.get(self.batch_id)
        if job is None:
            job = asyncio.get_running_loop().create_task(self._cancel(verdict.reason))
            _CANCELS[self.batch_id] = job
            job.add_done_callback(lambda _: _CANCELS.pop(self.batch_id, None))
        await self._hold(job, absorb, let_go)

    async def _hold(
        self,
        job: asyncio.Future[_T],
        absorb: Callable[[asyncio.CancelledError], bool],
        let_go: float,
    ) -> _T:
        """Await ``job`` through interruptions ``absorb`` accepts, until ``let_go`` (monotonic); return its result."""
        interrupted = 0
        while True:
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError as exc:
                if job.done() and not job.cancelled():
                    return job.result()
                if not absorb(exc) or time.monotonic() > let_go:
                    raise
                interrupted += 1
                if interrupted == 1:
                    self.log.info(
                        "Airflow asked again to stop this trigger; the cancel of batch %s goes on",
                        self.batch_id,
                    )

    def _tell(self, level: int, message: str, *args: Any) -> None:
        """Log a cancel decision or outcome to the task's log and, once more, to the triggerer's own log."""
        self.log.log(level, message, *args)
        # Outside the trigger's context the line carries no trigger id: the triggerer logs it as its own.
        contextvars.Context().run(_TRIGGERER_LOG.log, level, message, *args)

    async def _task_facts(self) -> TaskFacts:
        """Read the deferred task instance's state and current try back from Airflow (unknown if it cannot)."""
        ti = self.task_instance
        if ti is None:
            return TaskFacts(UNKNOWN_STATE, None, "the trigger knows no task instance")
        ref = TaskInstanceRef.of(ti, self.logical_date)
        try:
            # The state only: the triggerer's channel to Airflow cannot answer "which try" (GetPreviousTI is not
            # among its answers in 3.3.2, and asking breaks the channel for every trigger of the process).
            return await asyncio.wait_for(asyncio.to_thread(ask, ref, with_try=False), timeout=_STATE_TIMEOUT)
        except Exception as exc:  # ambiguous: never cancel on it
            return TaskFacts(UNKNOWN_STATE, None, f"Airflow did not answer: {exc!r}")

    async def _cancel(self, reason: str) -> None:
        """Cancel this trigger's batch (a trigger for many batches overrides this to cancel each of them)."""
        await self._cancel_one(self.batch_id, reason)

    async def _cancel_one(self, batch_id: str, reason: str) -> None:
        """Cancel ``batch_id`` until kluster confirms it, retrying transient failures within the budget."""
        hook = self._hook()
        attempts = CancelAttempts(started=time.monotonic(), budget=self.cancel_budget)
        self._tell(logging.WARNING, "Cancelling batch %s because %s", batch_id, reason)
        async with hook.async_client_lease():
            while True:
                try:
                    batch = await hook.acancel_batch(batch_id)
                except KlusterNotFoundError:
                    self._tell(logging.WARNING, "Batch %s no longer exists; nothing to cancel", batch_id)
                    return
                except KlusterAPIError as exc:
                    delay = attempts.after_failure(exc, time.monotonic())
                    if delay is None:
                        ended = await self._ended(hook, batch_id)
                        if ended is not None:
                            self._tell(
                                logging.INFO,
                                "Batch %s already ended %s; nothing to cancel",
                                batch_id,
                                ended,
                            )
                            return
                        self._tell(
                            logging.ERROR,
                            "%s",
                            not_cancelled_message(batch_id, reason, attempts, "triggerer"),
                        )
                        return
                    self.log.warning(
                        "Cancel of batch %s failed (%s); trying again in %.0fs", batch_id, exc, delay
                    )
                    await asyncio.sleep(delay)
                    continue
                self._tell(
                    logging.WARNING,
                    "Batch %s is %s: kluster confirmed the cancel (%s)",
                    batch_id,
                    batch.status_text,
                    reason,
                )
                return

    async def _ended(self, hook: KlusterHook, batch_id: str) -> str | None:
        """Return the status of ``batch_id`` if it already ended (or is cancelling), else ``None``."""
        try:
            batch = await hook.aget_batch(batch_id)
        except KlusterAPIError:
            return None
        return batch.status_text if cancel_done(batch) else None
