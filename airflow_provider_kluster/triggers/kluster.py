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
from airflow_provider_kluster.waiting import Progress, event_for_batch, make_event

#: How many failed polls in a row end the wait (each poll already retries inside the client).
DEFAULT_MAX_CONSECUTIVE_ERRORS = 5
#: The first poll waits a random share of this (capped by the poll interval), so that a triggerer restarting with
#: a thousand waiting batches spreads their polls instead of sending them all in the same instant.
FIRST_POLL_SPREAD = 10.0


class KlusterBatchTrigger(BaseTrigger):
    """Poll a kluster.ai batch until it stops, then fire exactly one event.

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

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the batch is terminal, the deadline passes, or polling fails for good; yield one event."""
        hook = self._hook()
        progress = Progress()
        errors_in_a_row = 0
        last: KlusterBatch | None = None
        await self._sleep(random.uniform(0, min(self.poll_interval, FIRST_POLL_SPREAD)))
        while True:
            # Poll before looking at the deadline: a batch that finished just in time is not timed out (and not
            # cancelled), and a timeout reports the status the batch really had.
            delay = self.poll_interval
            try:
                batch = await hook.aget_batch(self.batch_id)
            except KlusterAPIError as exc:
                errors_in_a_row += 1
                if not exc.is_transient or errors_in_a_row >= self.max_consecutive_errors:
                    reason = (
                        "a permanent error"
                        if not exc.is_transient
                        else f"{errors_in_a_row} failures in a row"
                    )
                    message = f"Stopped waiting for batch {self.batch_id} after {reason}: {exc}"
                    yield TriggerEvent(make_event("error", self.batch_id, batch=last, message=message))
                    return
                delay = min(self.poll_interval, 2.0**errors_in_a_row)
                self.log.warning(
                    "Polling batch %s failed (%d of %d in a row tolerated); next try in %.0fs: %s",
                    self.batch_id,
                    errors_in_a_row,
                    self.max_consecutive_errors,
                    delay,
                    exc,
                )
            else:
                errors_in_a_row = 0
                last = batch
                self.log.info("%s", progress.describe(batch))
                if batch.is_terminal:
                    yield TriggerEvent(event_for_batch(batch))
                    return
            if self.deadline is not None and time.time() >= self.deadline:
                yield TriggerEvent(self._timeout_event(last))
                return
            await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        if self.deadline is not None:
            seconds = max(0.0, min(seconds, self.deadline - time.time()))
        await asyncio.sleep(seconds)

    def _timeout_event(self, last: KlusterBatch | None) -> dict[str, Any]:
        status = last.status_text if last else "unknown"
        return make_event(
            "timeout",
            self.batch_id,
            batch=last,
            message=(
                f"Batch {self.batch_id} was still {status} when the wait's deadline passed; "
                "it will be cancelled. Raise the timeout or the completion window for batches this large."
            ),
        )

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
