"""KlusterBatchSensor: wait for a batch someone else submitted, in poke, reschedule or deferrable mode."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import BaseSensorOperator

from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.links import KlusterBatchLink, batch_url
from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger
from airflow_provider_kluster.waiting import (
    DEFAULT_MAX_CONSECUTIVE_ERRORS,
    WaitPolicy,
    poll_once,
    raise_for_event,
    validate_event,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class KlusterBatchSensor(BaseSensorOperator):
    """Wait until a kluster.ai batch finishes; fail clearly unless it completed.

    In poke or reschedule mode each poke polls the batch once; a transient error is retried within the poke
    (backing off); ``max_consecutive_errors`` failed polls in a row are tolerated, one more fails the task. With ``deferrable=True`` it waits in the triggerer with
    :class:`KlusterBatchTrigger`, whose wall-clock deadline is the sensor's ``timeout``.

    :param batch_id: The batch to wait for (templated).
    :param deferrable: Wait in the triggerer (default ``[operators] default_deferrable``).
    :param cancel_on_kill: In deferrable mode, cancel the batch when a user kills the deferred task.
        A sensor watches a batch it may not own, so this defaults to ``False``.
    :param max_consecutive_errors: Transient failures tolerated in a row.
    :param kluster_conn_id: The kluster.ai connection.
    """

    template_fields: Sequence[str] = ("batch_id",)
    operator_extra_links = (KlusterBatchLink(),)

    def __init__(
        self,
        *,
        batch_id: str,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        cancel_on_kill: bool = False,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.deferrable = deferrable
        self.cancel_on_kill = cancel_on_kill
        self.max_consecutive_errors = max_consecutive_errors
        self.kluster_conn_id = kluster_conn_id

    @cached_property
    def hook(self) -> KlusterHook:
        """Return the hook of this task's connection."""
        return KlusterHook(self.kluster_conn_id)

    def execute(self, context: Context) -> Any:
        KlusterBatchLink.persist(context, batch_url(self.hook.settings.platform_url, self.batch_id))
        if not self.deferrable:
            return super().execute(context)
        timeout = self.timeout.total_seconds() if isinstance(self.timeout, timedelta) else self.timeout
        deadline = time.time() + float(timeout) if timeout else None
        self.defer(
            trigger=KlusterBatchTrigger(
                batch_id=self.batch_id,
                kluster_conn_id=self.kluster_conn_id,
                poll_interval=self.poke_interval,
                deadline=deadline,
                cancel_on_kill=self.cancel_on_kill,
                max_consecutive_errors=self.max_consecutive_errors,
            ),
            method_name="execute_complete",
            timeout=None,
        )

    def poke(self, context: Context) -> bool:
        """Poll the batch once; ``False`` while it runs, ``True`` when it completed; raise when it ended otherwise.

        A failed poll is retried within this poke, after the policy's backoff (``min(poke_interval, 2**n)``
        seconds), so ``max_consecutive_errors`` means the same in every mode: in reschedule mode each poke runs
        on a fresh operator, and a count kept between pokes would be lost.
        """
        policy = WaitPolicy(
            batch_id=self.batch_id,
            poll_interval=self.poke_interval,
            max_consecutive_errors=self.max_consecutive_errors,
        )
        decision = poll_once(policy, lambda: self.hook.get_batch(self.batch_id), log=self.log)
        if decision.event is None:
            return False
        raise_for_event(decision.event)
        return True

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> str:
        """Resume after the deferred wait: validate the event and raise unless the batch completed."""
        checked = validate_event(event, self.batch_id)
        self.log.info("%s", checked["message"])
        raise_for_event(checked)
        return checked["batch_id"]
