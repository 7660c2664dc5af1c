"""A whole batch job: shard the input, retry what failed, watch for stalls, merge every answer into one file.

Pure and stateless on purpose. The job operator keeps no state of its own between wake-ups (XCom is cleared on
retry, the worker that resumes a deferral may be another machine): each wake-up recomputes the plan from the input
and from what kluster itself holds — the batches this task created, found by their metadata. Everything here is a
deterministic function of those, so a crash anywhere followed by a retry computes the same shards, the same
follow-up requests and the same merged results, and finds the batches it already paid for.

* **Shards** (:func:`write_shards`): the validated input is streamed into files of at most ``max_requests`` lines
  and ``max_bytes`` bytes; each is one batch, labelled ``a<attempt>s<index>`` (:func:`part_label`).
* **Settling an attempt** (:func:`settle`): once every batch of attempts ``1..n`` has ended, their output and error
  files are joined to the input by ``custom_id``. Each request's chain is followed: a success or a permanent
  failure (400-class) is final; a retryable failure (429, 5xx, timeouts, expiry) or a request with no line at all
  (a lost answer, a cancelled or expired batch) went to the next attempt if there was one. What is still
  retryable after attempt ``n`` is written, as the original input lines, to the next attempt's input.
* **Memory stays flat**: ids, lines and records are spread over hash buckets on local disk, each bucket at most
  about :data:`BUCKET_BYTES` of text, and only one bucket is held in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from airflow_provider_kluster.batches import KlusterBatch
from airflow_provider_kluster.exceptions import KlusterAPIError, KlusterRequestFileError
from airflow_provider_kluster.request_files import _custom_id_of, _shown
from airflow_provider_kluster.results import ResultRecord, missing_record, parse_result_line
from airflow_provider_kluster.waiting import WaitPolicy

log = logging.getLogger(__name__)

#: Metadata key naming the part of the job a batch is: ``a<attempt>s<shard>``, e.g. ``a1s0003``.
JOB_PART_KEY = "airflow_job_part"
#: HTTP statuses of a request that may succeed when sent again.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
#: Error codes (``error.code`` of a line, or of its body's error) that may succeed when sent again.
RETRYABLE_CODES = frozenset(
    {
        "batch_expired",
        "expired",
        "timeout",
        "request_timeout",
        "rate_limit_exceeded",
        "rate_limit",
        "server_error",
        "internal_error",
        "service_unavailable",
        "overloaded",
        "upstream_error",
    }
)
#: Error codes of a request that fails the same way when sent again (no HTTP status needed to tell).
PERMANENT_CODES = frozenset(
    {
        "invalid_request_error",
        "invalid_request",
        "model_not_found",
        "context_length_exceeded",
        "content_policy_violation",
        "content_filter",
        "invalid_prompt",
        "invalid_api_key",
        "permission_denied",
    }
)
#: Most text (input and result lines) one bucket holds while a job is settled; at most :data:`MAX_BUCKETS`.
BUCKET_BYTES = 32 * 1024 * 1024
MAX_BUCKETS = 512
_LISTED = 20


def part_label(attempt: int, shard: int) -> str:
    """Return the label of one part of a job: ``a<attempt>s<shard, 4 digits>``."""
    return f"a{attempt}s{shard:04d}"


def parse_part_label(label: object) -> tuple[int, int] | None:
    """Return ``(attempt, shard)`` of a label, ``None`` if it is not one."""
    if not isinstance(label, str) or not label.startswith("a") or "s" not in label:
        return None
    attempt, _, shard = label[1:].partition("s")
    if not (attempt.isdigit() and shard.isdigit()):
        return None
    return int(attempt), int(shard)


# -- shards ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One file of a job's requests, submitted as one batch.

    :param attempt: 1 for the job's input, ``n`` for the requests resubmitted after attempt ``n - 1``.
    :param index: Its position among the attempt's shards, from 0.
    :param path: The local file.
    :param requests: Number of lines.
    :param bytes: Size in bytes.
    :param sha256: Hex digest of its bytes.
    """

    attempt: int
    index: int
    path: str
    requests: int
    bytes: int
    sha256: str

    @property
    def label(self) -> str:
        return part_label(self.attempt, self.index)


class _ShardFile:
    def __init__(self, directory: pathlib.Path, attempt: int, index: int) -> None:
        import hashlib

        self.attempt, self.index = attempt, index
        self.path = directory / f"{part_label(attempt, index)}.jsonl"
        self.handle: IO[bytes] = self.path.open("wb")
        self.digest = hashlib.sha256()
        self.requests = self.bytes = 0

    def add(self, raw: bytes) -> None:
        self.handle.write(raw)
        self.digest.update(raw)
        self.requests += 1
        self.bytes += len(raw)

    def close(self) -> Shard:
        self.handle.close()
        return Shard(
            self.attempt, self.index, str(self.path), self.requests, self.bytes, self.digest.hexdigest()
        )


def write_shards(
    lines: Iterable[bytes],
    directory: str | pathlib.Path,
    *,
    attempt: int,
    max_requests: int | None,
    max_bytes: int | None,
) -> list[Shard]:
    """Stream request lines into shard files of at most ``max_requests`` lines and ``max_bytes`` bytes.

    Lines are kept byte for byte (a missing final newline is added) and in order; blank lines are skipped.

    :raises KlusterRequestFileError: One line alone is larger than ``max_bytes``.
    """
    out = pathlib.Path(directory) / f"attempt-{attempt}"
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Shard] = []
    current: _ShardFile | None = None
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        if not raw.endswith(b"\n"):
            raw += b"\n"
        if max_bytes is not None and len(raw) > max_bytes:
            if current is not None:
                current.handle.close()
            raise KlusterRequestFileError(
                f"Request line {lineno} alone is {len(raw):,} bytes, more than the per-file limit of "
                f"{max_bytes:,} bytes (max_file_bytes): no shard can hold it. Shorten that request."
            )
        if current is not None and (
            (max_requests is not None and current.requests >= max_requests)
            or (max_bytes is not None and current.bytes + len(raw) > max_bytes)
        ):
            shards.append(current.close())
            current = None
        if current is None:
            current = _ShardFile(out, attempt, len(shards))
        current.add(raw)
    if current is not None:
        shards.append(current.close())
    return shards


def iter_lines(path: str | pathlib.Path | Any) -> Iterator[bytes]:
    """Yield the raw lines of a local file or ObjectStoragePath."""
    with path.open("rb") if hasattr(path, "open") else open(path, "rb") as handle:
        yield from handle


# -- what failed, and what may be sent again -------------------------------------------------------------


def _error_code(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return None
    for holder in (raw, raw.get("response") if isinstance(raw.get("response"), dict) else None):
        if not isinstance(holder, dict):
            continue
        error = holder.get("error")
        if error is None and isinstance(holder.get("body"), dict):
            error = holder["body"].get("error")
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            if code is not None:
                return str(code).lower()
    return None


def is_retryable(record: ResultRecord) -> bool:
    """Whether a failed request may succeed when sent again (429, 5xx, timeout, expiry), not a 400-class one.

    A failure with no HTTP status is retryable unless its error code says otherwise: it failed outside the
    model's answer, and the number of attempts bounds what that costs.
    """
    if record.succeeded:
        return False
    if record.missing:
        return True
    code = _error_code(record.raw)
    if code in RETRYABLE_CODES:
        return True
    if record.status_code is not None:
        return record.status_code in RETRYABLE_STATUS
    return code is None or code not in PERMANENT_CODES


# -- settling attempts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchFiles:
    """The downloaded files of one ended batch of the job."""

    batch_id: str
    attempt: int
    output_path: str | None = None
    error_path: str | None = None


@dataclass
class Tally:
    """Where a job stands once its ended attempts are settled (JSON-native through :meth:`to_dict`)."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_permanent: int = 0
    failed_retryable: int = 0
    missing: int = 0
    to_retry: int = 0
    unexpected: int = 0
    duplicates: int = 0
    unparseable: int = 0
    #: How many requests ended at each attempt (their final outcome came from it).
    ended_at_attempt: dict[str, int] = field(default_factory=dict)
    #: Tokens of every answered request line read, by model: what was paid for, retries included.
    usage_by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    failed_ids: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failed_permanent": self.failed_permanent,
            "failed_retryable": self.failed_retryable,
            "missing": self.missing,
            "to_retry": self.to_retry,
            "unexpected": self.unexpected,
            "duplicates": self.duplicates,
            "unparseable": self.unparseable,
            "ended_at_attempt": dict(self.ended_at_attempt),
            "usage": dict(self.usage),
            "usage_by_model": {m: dict(u) for m, u in self.usage_by_model.items()},
            "failed_ids": list(self.failed_ids),
            "missing_ids": list(self.missing_ids),
            "first_errors": list(self.first_errors),
        }

    def _paid(self, record: ResultRecord) -> None:
        if not any(record.usage.values()):
            return
        model = record.model or "unknown"
        per = self.usage_by_model.setdefault(
            model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        )
        for key in per:
            per[key] += int(record.usage.get(key, 0) or 0)

    def _note_error(self, error: str | None) -> None:
        if error and error not in self.first_errors and len(self.first_errors) < 5:
            self.first_errors.append(error)


def bucket_count(total_bytes: int) -> int:
    """Return how many buckets keep each at about :data:`BUCKET_BYTES` of text (1 to :data:`MAX_BUCKETS`)."""
    return max(1, min(MAX_BUCKETS, math.ceil(total_bytes / BUCKET_BYTES)))


def _bucket_of(custom_id: str, buckets: int) -> int:
    return zlib.crc32(custom_id.encode("utf-8", "surrogatepass")) % buckets


def _size(path: str | None) -> int:
    if not path:
        return 0
    with contextlib.suppress(OSError):
        return pathlib.Path(path).stat().st_size
    return 0


def settle(
    input_lines: Iterable[bytes],
    input_bytes: int,
    ended: Sequence[BatchFiles],
    *,
    attempts_done: int,
    max_attempts: int,
    workdir: str | pathlib.Path,
    records: IO[str] | None = None,
    retry: IO[bytes] | None = None,
) -> Tally:
    """Join every ended attempt's results to the job's input; write final records and what to send again.

    :param input_lines: The job's input lines (attempt 1's requests), streamed once.
    :param input_bytes: Their size, for the number of buckets.
    :param ended: The files of every batch of attempts ``1..attempts_done`` (all ended).
    :param attempts_done: How many attempts were submitted and ended; attempt ``n + 1`` held exactly the requests
        still retryable after attempt ``n``.
    :param max_attempts: Most attempts per request: nothing is written to ``retry`` at ``attempts_done``.
    :param workdir: Where the bucket files go (local disk), removed when done.
    :param records: Where each request's final record goes (JSONL): its result (as
        :meth:`~.results.ResultRecord.to_dict`, with ``raw`` for failures) plus ``attempts`` (how many times it
        was sent) and ``batch_id`` (the batch whose line decided it; ``None`` when missing everywhere).
    :param retry: Where the input lines of the requests still retryable after ``attempts_done`` go, when
        ``attempts_done < max_attempts``.
    :return: The tally; ``total == succeeded + failed + missing`` and every input id has exactly one record.
    """
    total_bytes = input_bytes + sum(_size(f.output_path) + _size(f.error_path) for f in ended)
    buckets = bucket_count(total_bytes)
    directory = pathlib.Path(workdir) / f"settle-{time.monotonic_ns()}"
    directory.mkdir(parents=True)
    tally = Tally()
    try:
        handles = [(directory / f"{b}.txt").open("wb") for b in range(buckets)]
        try:
            for raw in input_lines:
                custom_id = _custom_id_of(raw) if raw.strip() else None
                if custom_id is None:
                    continue
                handles[_bucket_of(custom_id, buckets)].write(b"I\t0\t-\t" + raw.rstrip(b"\r\n") + b"\n")
            for files in ended:
                for kind, path in ((b"O", files.output_path), (b"E", files.error_path)):
                    if not path or not pathlib.Path(path).exists():
                        continue
                    prefix = (
                        kind + b"\t" + str(files.attempt).encode() + b"\t" + files.batch_id.encode() + b"\t"
                    )
                    for raw in iter_lines(pathlib.Path(path)):
                        if not raw.strip():
                            continue
                        custom_id = _custom_id_of(raw)
                        if custom_id is None:
                            tally.unparseable += 1
                            tally._note_error(parse_result_line(raw).error)
                            continue
                        handles[_bucket_of(custom_id, buckets)].write(prefix + raw.rstrip(b"\r\n") + b"\n")
        finally:
            for handle in handles:
                handle.close()
        for b in range(buckets):
            _settle_bucket(directory / f"{b}.txt", tally, attempts_done, max_attempts, records, retry)
    finally:
        for leftover in directory.glob("*"):
            leftover.unlink()
        directory.rmdir()
    return tally


def _settle_bucket(
    path: pathlib.Path,
    tally: Tally,
    attempts_done: int,
    max_attempts: int,
    records: IO[str] | None,
    retry: IO[bytes] | None,
) -> None:
    inputs: dict[str, bytes] = {}
    # (custom_id, attempt) -> (record, batch id): the first success wins, else the first failure.
    answers: dict[tuple[str, int], tuple[ResultRecord, str | None]] = {}
    unexpected: set[str] = set()
    with path.open("rb") as handle:
        for line in handle:
            kind, attempt_text, batch_raw, raw = line.rstrip(b"\n").split(b"\t", 3)
            if kind == b"I":
                custom_id = _custom_id_of(raw)
                if custom_id is not None and custom_id not in inputs:
                    inputs[custom_id] = raw
                continue
            record = parse_result_line(raw)
            if record.custom_id is None:
                tally.unparseable += 1
                continue
            if record.custom_id not in inputs:
                unexpected.add(record.custom_id)
                continue
            tally._paid(record)
            key = (record.custom_id, int(attempt_text))
            seen = answers.get(key)
            if seen is not None:
                tally.duplicates += 1
                if seen[0].succeeded or not record.succeeded:
                    continue
            answers[key] = (record, batch_raw.decode())
    tally.unexpected += len(unexpected)
    for custom_id, raw in inputs.items():
        tally.total += 1
        attempt = 1
        while True:
            found = answers.get((custom_id, attempt))
            record, batch_id = (missing_record(custom_id), None) if found is None else found
            final = record.succeeded or not is_retryable(record)
            if final or attempt >= attempts_done:
                break
            attempt += 1  # it was sent again in the next attempt
        retrying = not final and attempts_done < max_attempts
        _count(tally, record, attempt, final, retrying)
        if retrying and retry is not None:
            retry.write(raw + b"\n")
        if records is not None:
            data = record.to_dict(include_raw=True)
            data["attempts"] = attempt
            data["batch_id"] = batch_id
            if not record.succeeded:
                data["retryable"] = not final
            records.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")


def _count(tally: Tally, record: ResultRecord, attempt: int, final: bool, retrying: bool) -> None:
    if retrying:
        tally.to_retry += 1
    if record.succeeded:
        tally.succeeded += 1
        for key in tally.usage:
            tally.usage[key] += int(record.usage.get(key, 0) or 0)
    elif record.missing:
        tally.missing += 1
        if len(tally.missing_ids) < _LISTED:
            tally.missing_ids.append(str(record.custom_id))
    else:
        tally.failed += 1
        if final:
            tally.failed_permanent += 1
        else:
            tally.failed_retryable += 1
        if len(tally.failed_ids) < _LISTED:
            tally.failed_ids.append(str(record.custom_id))
        tally._note_error(record.error)
    if final or not retrying:
        key = str(attempt)
        tally.ended_at_attempt[key] = tally.ended_at_attempt.get(key, 0) + 1


# -- watching many batches --------------------------------------------------------------------------------


@dataclass
class _Seen:
    done: int
    since: float


class JobWatch:
    """Watch a job's running batches, poll after poll: the same rules in the triggerer and on the worker.

    Each batch keeps its own :class:`~.waiting.WaitPolicy` (deadline, transient-error budget, what its status
    means). On top: a batch whose ``completed + failed`` has not moved for ``stall_timeout`` seconds while it runs
    is *stalled*. :meth:`observe` returns an event once every batch ended, once the first one ended (with
    ``fire_on_first_end``: more shards wait for a slot), once one stalled, or once polling one failed for good.

    The event: ``status`` (``ended``, ``stalled``, ``timeout`` or ``error``), ``batches`` (by id: the batch's own
    wait event, for those that ended), ``running`` (ids still running), ``stalled`` (ids), ``progress`` (by
    id: ``[done, since]``, to carry the stall clock into the next wait), ``message``.
    """

    def __init__(
        self,
        batch_ids: Sequence[str],
        *,
        poll_interval: float,
        deadline: float | None,
        max_consecutive_errors: int,
        stall_timeout: float | None = None,
        fire_on_first_end: bool = False,
        progress: dict[str, Any] | None = None,
        job_total: int | None = None,
        job_done_before: int = 0,
    ) -> None:
        self.batch_ids = list(batch_ids)
        self.policies = {
            batch_id: WaitPolicy(
                batch_id=batch_id,
                poll_interval=poll_interval,
                deadline=deadline,
                max_consecutive_errors=max_consecutive_errors,
            )
            for batch_id in self.batch_ids
        }
        self.stall_timeout = stall_timeout
        self.fire_on_first_end = fire_on_first_end
        self.ended: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, _Seen] = {}
        for batch_id, value in (progress or {}).items():
            with contextlib.suppress(TypeError, ValueError, IndexError):
                self.seen[str(batch_id)] = _Seen(int(value[0]), float(value[1]))
        self.job_total = job_total
        self.job_done_before = job_done_before
        self.poll_interval = poll_interval
        self._started = time.time()
        self._done_at_start: int | None = None
        self.last_counts: dict[str, int] = {}

    @property
    def pending(self) -> list[str]:
        return [batch_id for batch_id in self.batch_ids if batch_id not in self.ended]

    def observe(
        self, results: dict[str, KlusterBatch | KlusterAPIError], now: float
    ) -> tuple[dict[str, Any] | None, float]:
        """Take one round of polls (by batch id); return the event (or ``None``) and the delay to the next round."""
        delays: list[float] = []
        stalled: list[str] = []
        failure: dict[str, Any] | None = None
        for batch_id, result in results.items():
            decision = self.policies[batch_id].decide(result, now)
            if isinstance(result, KlusterBatch):
                self.last_counts[batch_id] = result.request_counts.done
                if decision.event is None and self._stalled(result, now):
                    stalled.append(batch_id)
            if decision.event is not None:
                if decision.event["status"] in ("timeout", "error"):
                    failure = decision.event
                else:
                    self.ended[batch_id] = decision.event
                continue
            delays.append(decision.delay)
        progress = {k: [v.done, v.since] for k, v in self.seen.items() if k not in self.ended}
        base = {
            "batches": dict(self.ended),
            "running": self.pending,
            "stalled": stalled,
            "progress": progress,
        }
        if failure is not None:
            return {**base, "status": failure["status"], "message": failure["message"]}, 0.0
        if stalled:
            message = (
                f"Batch(es) {', '.join(stalled)} made no progress for {self.stall_timeout:.0f}s while running "
                "(stall_timeout)"
            )
            return {**base, "status": "stalled", "message": message}, 0.0
        if self.ended and (not self.pending or self.fire_on_first_end):
            message = f"{len(self.ended)} of {len(self.batch_ids)} batch(es) ended"
            return {**base, "status": "ended", "message": message}, 0.0
        return None, min(delays) if delays else self.poll_interval

    def _stalled(self, batch: KlusterBatch, now: float) -> bool:
        done = batch.request_counts.done
        seen = self.seen.get(batch.id)
        # Only a batch that is processing can stall; validating, finalizing or cancelling restart the clock.
        if seen is None or done != seen.done or batch.status_text != "in_progress":
            self.seen[batch.id] = _Seen(done, now)
            return False
        return self.stall_timeout is not None and now - seen.since >= self.stall_timeout

    def describe(self, now: float) -> str:
        """Return one progress line for the whole job: requests done of all, rate and ETA."""
        done_running = sum(self.last_counts.values())
        done = self.job_done_before + done_running
        if self._done_at_start is None:
            self._done_at_start = done
        elapsed = max(now - self._started, 1e-9)
        rate = (done - self._done_at_start) / elapsed
        total = self.job_total
        parts = [f"Job: {done:,}" + (f" of {total:,}" if total else "") + " requests done"]
        if total:
            parts[0] += f" ({100.0 * done / total:.0f}%)"
        parts.append(f"{len(self.pending)} of {len(self.batch_ids)} batch(es) running")
        if rate > 0:
            parts.append(f"{rate:,.1f} requests/s")
            if total and total > done:
                parts.append(f"ETA {_eta(math.ceil((total - done) / rate))}")
        return ", ".join(parts)


def _eta(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def check_watch_event(event: object) -> dict[str, Any]:
    """Return a job-watch event if it has the expected shape; raise ``ValueError`` otherwise."""
    if not isinstance(event, dict) or event.get("status") not in ("ended", "stalled", "timeout", "error"):
        raise ValueError(f"unexpected job wait event: {str(event)[:200]}")
    return event


# -- duplicate ids, for inputs of any size -----------------------------------------------------------------


def duplicate_ids(
    lines: Iterable[bytes], input_bytes: int, workdir: str | pathlib.Path, *, max_listed: int = 20
) -> list[str]:
    """Return a problem per ``custom_id`` used twice (``line N: duplicate custom_id 'x' (first used on line M)``).

    The ids go to hash buckets on local disk first, then each bucket is checked on its own: memory holds one
    bucket's ids, whatever the input's size.
    """
    buckets = bucket_count(input_bytes // 4)  # an id is a small share of its line
    directory = pathlib.Path(workdir) / f"ids-{time.monotonic_ns()}"
    directory.mkdir(parents=True)
    found: list[tuple[int, str]] = []
    try:
        handles = [(directory / f"{b}.txt").open("wb") for b in range(buckets)]
        try:
            for lineno, raw in enumerate(lines, start=1):
                custom_id = _custom_id_of(raw) if raw.strip() else None
                if custom_id is not None:
                    encoded = json.dumps(custom_id).encode()
                    handles[_bucket_of(custom_id, buckets)].write(b"%d\t%s\n" % (lineno, encoded))
        finally:
            for handle in handles:
                handle.close()
        for b in range(buckets):
            first: dict[str, int] = {}
            with (directory / f"{b}.txt").open("rb") as bucket:
                for entry in bucket:
                    number, _, encoded = entry.rstrip(b"\n").partition(b"\t")
                    custom_id = json.loads(encoded)
                    if custom_id in first:
                        problem = (
                            f"duplicate custom_id {_shown(custom_id)} (first used on line {first[custom_id]})"
                        )
                        found.append((int(number), problem))
                    else:
                        first[custom_id] = int(number)
    finally:
        for leftover in directory.glob("*"):
            leftover.unlink()
        directory.rmdir()
    found.sort()
    return [f"line {lineno}: {problem}" for lineno, problem in found[:max_listed]]
