"""KlusterJobTrigger: wait for many batches of one job in the triggerer, with one shared client."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from airflow_provider_kluster.batches import KlusterBatch
from airflow_provider_kluster.cancelling import DEFAULT_CANCEL_BUDGET
from airflow_provider_kluster.exceptions import KlusterAPIError
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.jobs import JobWatch
from airflow_provider_kluster.triggers.kluster import FIRST_POLL_SPREAD, KlusterBatchTrigger
from airflow_provider_kluster.waiting import (
    DEFAULT_MAX_CONSECUTIVE_ERRORS,
    PROGRESS_EVERY,
    ProgressPace,
    WaitPolicy,
)

__all__ = ["PROGRESS_EVERY", "KlusterJobTrigger"]
#: Most polls of one job in flight at once.
POLL_CONCURRENCY = 16


class KlusterJobTrigger(KlusterBatchTrigger):
    """Poll every running batch of a job until the job must act; fire one event.

    The rules are :class:`~airflow_provider_kluster.jobs.JobWatch`'s: the event comes once every batch ended, or
    the first one ended (``fire_on_first_end``: shards wait for a free slot), or one stalled for ``stall_timeout``,
    or polling failed for good, or the deadline passed. All batches are polled with the connection's shared
    async client, at most :data:`POLL_CONCURRENCY` at a time; the task log gets one progress line for the whole
    job, not one per batch, paced like a single batch's (:class:`~airflow_provider_kluster.waiting.ProgressPace`):
    at most one a minute while requests get done or batches end, one every five minutes while nothing moves.

    Killed by a person (Airflow 3.3+: a clear, mark failed), it cancels every batch it waits for, by the same
    rules as :class:`~.kluster.KlusterBatchTrigger`.

    :param batch_ids: The job's running batches.
    :param progress: ``{batch_id: [done, since]}`` from the previous wait, so a stall clock survives a new wait.
    :param job_total: Requests of the whole attempt (for the progress line).
    :param job_done_before: Requests of the attempt already done in batches not watched here.
    :param base: Further arguments of :class:`~.kluster.KlusterBatchTrigger`.
    """

    def __init__(
        self,
        batch_ids: list[str],
        kluster_conn_id: str = KlusterHook.default_conn_name,
        poll_interval: float = 60.0,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
        cancel_on_mark_success: bool = False,
        cancel_budget: float = DEFAULT_CANCEL_BUDGET,
        stall_timeout: float | None = None,
        fire_on_first_end: bool = False,
        progress: dict[str, Any] | None = None,
        job_total: int | None = None,
        job_done_before: int = 0,
        **base: Any,
    ) -> None:
        self.batch_ids = [str(b) for b in batch_ids]
        # Names the wait in log lines and keys its cancel among the triggerer's: unique, since a batch belongs to
        # one job only.
        label = (
            self.batch_ids[0]
            if len(self.batch_ids) == 1
            else f"{self.batch_ids[0]} and {len(self.batch_ids) - 1} more of the job"
        )
        super().__init__(
            batch_id=label,
            kluster_conn_id=kluster_conn_id,
            poll_interval=poll_interval,
            deadline=deadline,
            cancel_on_kill=cancel_on_kill,
            max_consecutive_errors=max_consecutive_errors,
            cancel_on_mark_success=cancel_on_mark_success,
            cancel_budget=cancel_budget,
            **base,
        )
        self.stall_timeout = None if stall_timeout is None else float(stall_timeout)
        self.fire_on_first_end = bool(fire_on_first_end)
        self.progress = dict(progress or {})
        self.job_total = None if job_total is None else int(job_total)
        self.job_done_before = int(job_done_before)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        kwargs.pop("batch_id")
        kwargs.update(
            batch_ids=list(self.batch_ids),
            stall_timeout=self.stall_timeout,
            fire_on_first_end=self.fire_on_first_end,
            progress=self.progress,
            job_total=self.job_total,
            job_done_before=self.job_done_before,
        )
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    def watch(self) -> JobWatch:
        return JobWatch(
            self.batch_ids,
            poll_interval=self.poll_interval,
            deadline=self.deadline,
            max_consecutive_errors=self.max_consecutive_errors,
            stall_timeout=self.stall_timeout,
            fire_on_first_end=self.fire_on_first_end,
            progress=self.progress,
            job_total=self.job_total,
            job_done_before=self.job_done_before,
        )

    async def _wait(self, hook: KlusterHook, policy: WaitPolicy) -> dict[str, Any]:
        watch = self.watch()
        limit = asyncio.Semaphore(POLL_CONCURRENCY)

        async def poll(batch_id: str) -> KlusterBatch | KlusterAPIError:
            async with limit:
                try:
                    return await hook.aget_batch(batch_id)
                except KlusterAPIError as exc:
                    return exc

        await asyncio.sleep(
            policy.clamp(random.uniform(0, min(self.poll_interval, FIRST_POLL_SPREAD)), time.time())
        )
        pace = ProgressPace()
        while True:
            pending = watch.pending
            answers = await asyncio.gather(*(poll(batch_id) for batch_id in pending))
            now = time.time()
            event, delay = watch.observe(dict(zip(pending, answers, strict=True)), now)
            for batch_id, answer in zip(pending, answers, strict=True):
                if isinstance(answer, KlusterAPIError):
                    self.log.warning("Polling batch %s failed: %s", batch_id, answer)
            if event is not None:
                self.log.info("%s. %s", event["message"], watch.describe(now))
                return event
            done = sum(watch.last_counts.values())
            if pace.due((done, len(watch.pending)), now):
                self.log.info("%s", watch.describe(now))
            await asyncio.sleep(delay)

    async def _cancel(self, reason: str) -> None:
        """Cancel every batch of the job this trigger waits for, each until kluster confirms it."""
        await asyncio.gather(*(self._cancel_one(batch_id, reason) for batch_id in self.batch_ids))
