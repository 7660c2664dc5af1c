"""Retries never pay twice: who a batch belongs to, what it was made from, and finding it again.

Every batch the submit operator creates carries two metadata entries: an *identity* — a digest of
(dag_id, task_id, run_id, map_index), never the try number — and a *fingerprint* of its input (content digest or
file id, completion window, endpoint, kluster options). Airflow clears a task's XComs before each new try, so the
batch list on kluster itself is where a retry finds the batch an earlier try created. The uploaded request file is
named after both, so a try that died between upload and create reuses its file instead of leaving it behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_provider_kluster.batches import BatchStatus, KlusterBatch

log = logging.getLogger(__name__)

IDENTITY_KEY = "airflow_task_identity"
FINGERPRINT_KEY = "airflow_input_fingerprint"
UPLOAD_PREFIX = "airflow-"
#: Newest batches (and files) looked at for an earlier try's batch: five pages of the list.
DEFAULT_SCAN_LIMIT = 500
ON_CHANGED_INPUT = ("resubmit", "fail")
# A batch on its way out (cancelling: a cleared or failed task cancelled it) is replaced, never reattached to.
_REPLACEABLE = frozenset(
    {BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLING, BatchStatus.CANCELLED}
)


def task_identity(dag_id: str, task_id: str, run_id: str, map_index: int | None) -> str:
    """Return the identity of one task of one run (all its tries share it)."""
    key = "\x1f".join([dag_id, task_id, run_id, str(-1 if map_index is None else map_index)])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


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

    @property
    def input_file_ids(self) -> set[str]:
        """Return the input files of every earlier batch found."""
        batches = [*self.changed, *self.replaced, *([self.reusable] if self.reusable else [])]
        return {b.input_file_id for b in batches if b.input_file_id}


def find_previous(hook: BatchLister, identity: str, fingerprint: str, *, scan_limit: int) -> Previous:
    """Scan the newest ``scan_limit`` batches for ones this task created before.

    A running or completed batch (an unknown status counts as running) with the same fingerprint is
    ``reusable``; running or completed ones made from another input are ``changed``; failed, expired or
    cancelled ones are ``replaced`` by a new batch.
    """
    found = Previous()
    for scanned, batch in enumerate(hook.iter_batches(), start=1):
        if batch.metadata.get(IDENTITY_KEY) == identity:
            if batch.status in _REPLACEABLE:
                found.replaced.append(batch)
            elif batch.metadata.get(FINGERPRINT_KEY) != fingerprint:
                found.changed.append(batch)
            elif found.reusable is None:
                found.reusable = batch
        if scanned >= scan_limit:
            break
    return found


@dataclass
class Uploads:
    """Files earlier tries of this task uploaded: the one for this input, and others."""

    match: str | None = None
    others: list[str] = field(default_factory=list)


def find_uploads(hook: BatchLister, identity: str, fingerprint: str, *, scan_limit: int) -> Uploads:
    """Scan the newest ``scan_limit`` files for uploads of this task (by their name)."""
    name = upload_name(identity, fingerprint)
    prefix = f"{UPLOAD_PREFIX}{identity[:16]}-"
    found = Uploads()
    for scanned, item in enumerate(hook.iter_files(), start=1):
        base = str(item.get("filename") or "").rsplit("/", 1)[-1]
        if base == name and found.match is None:
            found.match = str(item["id"])
        elif base.startswith(prefix):
            found.others.append(str(item["id"]))
        if scanned >= scan_limit:
            break
    return found
