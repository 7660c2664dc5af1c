"""Retries never pay twice: who a batch belongs to, what it was made from, and finding it again.

Every batch the submit operator creates carries two metadata entries: an *identity* — a digest of
(dag_id, task_id, run_id, map_index), never the try number — and a *fingerprint* of its input (content digest or
file id, completion window, endpoint, kluster options). Airflow clears a task's XComs before each new try, so the
batch list on kluster itself is where a retry finds the batch an earlier try created. The uploaded request file is
named after both, so a try that died between upload and create reuses its file instead of leaving it behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch, parse_timestamp

log = logging.getLogger(__name__)

IDENTITY_KEY = "airflow_task_identity"
FINGERPRINT_KEY = "airflow_input_fingerprint"
#: The task's ``max_tries`` when the batch was submitted: Airflow raises it on every clear of the task, and only then.
MAX_TRIES_KEY = "airflow_max_tries"
UPLOAD_PREFIX = "airflow-"
#: Newest batches (and files) looked at for an earlier try's batch when the run's start is not known (five pages
#: of the list); when it is, the scan stops at the first batch created before the run began instead.
DEFAULT_SCAN_LIMIT = 500
#: How far before the run's start the scan still looks: kluster's clock and Airflow's may disagree.
CLOCK_SKEW = dt.timedelta(minutes=10)
#: Keys in the task state store (Airflow 3.3+, AIP-103) where a try records what it created.
STATE_UPLOAD_KEY = "kluster_upload"
STATE_BATCH_KEY = "kluster_batch"
ON_CHANGED_INPUT = ("resubmit", "fail")
# A batch on its way out (cancelling: a cleared or failed task cancelled it) is replaced, never reattached to.
_REPLACEABLE = frozenset(
    {BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLING, BatchStatus.CANCELLED}
)


def task_identity(dag_id: str, task_id: str, run_id: str, map_index: int | None) -> str:
    """Return the identity of one task of one run (all its tries share it)."""
    key = "\x1f".join([dag_id, task_id, run_id, str(-1 if map_index is None else map_index)])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class TaskState:
    """This task's state store (Airflow 3.3+, AIP-103): what earlier tries recorded, kept across tries.

    On Airflow below 3.3 (or any context without a store) it is empty and records nothing. ``needs_scan``
    tells whether kluster's batch list must still be scanned: always without a store; with one, only on a
    retry (a first try has no earlier tries, and a retry may follow a crash between create and record).
    """

    store: Any = None
    try_number: int = 1
    #: The task instance's ``max_tries``: Airflow raises it each time the task is cleared, and only then.
    max_tries: int | None = None

    @classmethod
    def of(cls, context: Any) -> TaskState:
        """Return the state store of the running task (empty when the context has none)."""
        store = context.get("task_state_store") if hasattr(context, "get") else None
        ti = context.get("ti") if hasattr(context, "get") else None
        try_number = getattr(ti, "try_number", None)
        max_tries = getattr(ti, "max_tries", None)
        return cls(
            store=store,
            try_number=try_number if isinstance(try_number, int) else 1,
            max_tries=max_tries if isinstance(max_tries, int) else None,
        )

    def tries(self) -> dict[str, int]:
        """Return what to record beside a batch so a later try can tell a retry from a clear."""
        found = {"try_number": self.try_number}
        if self.max_tries is not None:
            found["max_tries"] = self.max_tries
        return found

    def cleared_since(self, recorded: dict[str, Any]) -> bool:
        """Tell whether the task was cleared after the try that wrote ``recorded`` (its ``max_tries`` rose)."""
        then = recorded.get("max_tries")
        return isinstance(then, int) and self.max_tries is not None and self.max_tries != then

    @property
    def needs_scan(self) -> bool:
        """Tell whether earlier tries may have created something the store does not know of."""
        return self.store is None or self.try_number > 1

    def get(self, key: str) -> dict[str, Any] | None:
        """Return what an earlier try recorded under ``key`` (a dict), or ``None``."""
        if self.store is None:
            return None
        try:
            value = self.store.get(key)
        except Exception as exc:  # the store is an optimisation: a failure to read it falls back to the scan
            log.warning(
                "Could not read %s from the task state store (%s); scanning kluster instead", key, exc
            )
            self.store = None
            return None
        return value if isinstance(value, dict) else None

    def record(self, key: str, value: dict[str, Any]) -> None:
        """Record what this try created, for the next try (JSON-native values only; never the key)."""
        if self.store is None:
            return
        try:
            self.store.set(key, value)
        except Exception as exc:  # the scan still finds it
            log.warning("Could not record %s in the task state store (%s)", key, exc)


def run_start(context: Any) -> dt.datetime | None:
    """Return when this task's DAG run began (aware UTC), or ``None`` when the context does not say."""
    dag_run = context.get("dag_run") if hasattr(context, "get") else None
    for value in (getattr(dag_run, "start_date", None), getattr(dag_run, "queued_at", None)):
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return None


def identity_from_context(context: Any) -> str:
    """Return the identity of the running task instance."""
    ti = context["ti"]
    return task_identity(ti.dag_id, ti.task_id, ti.run_id, getattr(ti, "map_index", -1))


def input_fingerprint(
    *,
    content_sha256: str | None = None,
    input_file_id: str | None = None,
    completion_window: str,
    endpoint: str,
    kluster_options: dict[str, Any] | None,
) -> str:
    """Return a digest of everything that makes two submissions the same batch."""
    parts = {
        "content": content_sha256,
        "file": input_file_id,
        "window": completion_window,
        "endpoint": endpoint,
        "options": kluster_options or {},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def upload_name(identity: str, fingerprint: str) -> str:
    """Return the file name uploads of this task and input get, so a retry can find the file again."""
    return f"{UPLOAD_PREFIX}{identity[:16]}-{fingerprint[:16]}.jsonl"


class BatchLister(Protocol):
    """What the scans need from a client: the hook's listing calls (newest first, page by page)."""

    def iter_batches(self) -> Iterator[KlusterBatch]: ...

    def iter_files(self) -> Iterator[dict[str, Any]]: ...


@dataclass
class Previous:
    """What earlier tries of this task left on kluster."""

    reusable: KlusterBatch | None = None
    changed: list[KlusterBatch] = field(default_factory=list)
    replaced: list[KlusterBatch] = field(default_factory=list)
    #: Batches of a try that was cleared since: never reattached to (a clear asks for a new batch).
    given_up: set[str] = field(default_factory=set)
    #: This try's ``max_tries``; a batch whose :data:`MAX_TRIES_KEY` differs was submitted before a clear.
    #: ``None`` never gives a batch up.
    max_tries: int | None = None

    @property
    def input_file_ids(self) -> set[str]:
        """Return the input files of every earlier batch found."""
        batches = [*self.changed, *self.replaced, *([self.reusable] if self.reusable else [])]
        return {b.input_file_id for b in batches if b.input_file_id}


def classify(found: Previous, batch: KlusterBatch, identity: str, fingerprint: str) -> None:
    """File one batch under ``found`` if this task created it (see :func:`find_previous`)."""
    if batch.metadata.get(IDENTITY_KEY) != identity:
        return
    if any(b.id == batch.id for b in (*found.changed, *found.replaced)) or (
        found.reusable is not None and found.reusable.id == batch.id
    ):
        return
    submitted_under = batch.metadata.get(MAX_TRIES_KEY)
    if (
        found.max_tries is not None
        and submitted_under is not None
        and submitted_under != str(found.max_tries)
    ):
        found.given_up.add(batch.id)
    if batch.status in _REPLACEABLE or batch.id in found.given_up:
        found.replaced.append(batch)
    elif batch.metadata.get(FINGERPRINT_KEY) != fingerprint:
        found.changed.append(batch)
    elif found.reusable is None:
        found.reusable = batch


def _too_old(created_at: dt.datetime | None, since: dt.datetime | None) -> bool:
    return since is not None and created_at is not None and created_at < since - CLOCK_SKEW


def find_previous(
    hook: BatchLister,
    identity: str,
    fingerprint: str,
    *,
    scan_limit: int,
    since: dt.datetime | None = None,
    found: Previous | None = None,
) -> Previous:
    """Scan the newest batches for ones this task created before (adding to ``found``, if given).

    The scan stops at the first batch created before ``since`` (the DAG run's start, less
    :data:`CLOCK_SKEW`): nothing older can belong to this run. Without ``since`` it looks at the newest
    ``scan_limit``. A running or completed batch (an unknown status counts as running) with the same fingerprint
    is ``reusable``; running or completed ones made from another input are ``changed``; failed, expired or
    cancelled ones, and those submitted before the task was last cleared (``found.given_up``: their
    :data:`MAX_TRIES_KEY` differs from ``found.max_tries``), are ``replaced`` by a new batch.
    """
    found = Previous() if found is None else found
    for scanned, batch in enumerate(hook.iter_batches(), start=1):
        if _too_old(batch.created_at, since):
            break
        classify(found, batch, identity, fingerprint)
        if since is None and scanned >= scan_limit:
            break
    return found


@dataclass
class Uploads:
    """Files earlier tries of this task uploaded: the one for this input, and others."""

    match: str | None = None
    others: list[str] = field(default_factory=list)


def find_uploads(
    hook: BatchLister,
    identity: str,
    fingerprint: str,
    *,
    scan_limit: int,
    since: dt.datetime | None = None,
) -> Uploads:
    """Scan the newest files for uploads of this task (by their name), bounded like :func:`find_previous`."""
    name = upload_name(identity, fingerprint)
    prefix = f"{UPLOAD_PREFIX}{identity[:16]}-"
    found = Uploads()
    for scanned, item in enumerate(hook.iter_files(), start=1):
        if _too_old(parse_timestamp(item.get("created_at")), since):
            break
        base = str(item.get("filename") or "").rsplit("/", 1)[-1]
        if base == name and found.match is None:
            found.match = str(item["id"])
        elif base.startswith(prefix):
            found.others.append(str(item["id"]))
        if since is None and scanned >= scan_limit:
            break
    return found
