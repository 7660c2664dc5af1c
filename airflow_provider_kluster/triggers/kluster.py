"""KlusterBatchTrigger: wait for a kluster.ai batch in the triggerer, fully async."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch
from airflow_provider_kluster.exceptions import KlusterAPIError
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.waiting import DEFAULT_MAX_CONSECUTIVE_ERRORS, WaitPolicy

__all__ = ["DEFAULT_MAX_CONSECUTIVE_ERRORS", "FIRST_POLL_SPREAD", "KlusterBatchTrigger"]
#: The first poll waits a random share of this (capped by the poll interval), so that a triggerer restarting with
#: a thousand waiting batches spreads their polls instead of sending them all in the same instant.
FIRST_POLL_SPREAD = 10.0


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
    :param cancel_on_kill: Cancel the batch when a user clears, fails or succeeds the deferred task (Airflow 3.3+).
    :param max_consecutive_errors: Transient poll failures tolerated in a row before an ``error`` event.
    """

    def __init__(
        self,
        batch_id: str,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        poll_interval: float = 60.0,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
    ) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.kluster_conn_id = kluster_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.max_consecutive_errors = int(max_consecutive_errors)

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
        """Poll until the batch is terminal, the deadline passes, or polling fails for good; yield one event."""
        hook = self._hook()
        async with hook.async_client_lease():  # one client for the whole wait, let go before the event
            event = await self._wait(hook, self.policy())
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
        """Cancel the batch when a user acts on the deferred task (Airflow 3.3+; never on triggerer restart)."""
        if not self.cancel_on_kill:
            self.log.info("Deferred task killed; batch %s left running (cancel_on_kill=False)", self.batch_id)
            return
        hook = self._hook()
        try:
            batch = await hook.acancel_batch(self.batch_id)
        except KlusterAPIError as exc:
            self.log.warning("Could not cancel batch %s after the task was killed: %s", self.batch_id, exc)
            return
        if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            self.log.info("Batch %s cancelled because its deferred task was killed", self.batch_id)
