"""Join a batch's output and error files to its requests' ``custom_id`` values, and summarise the outcome.

kluster.ai writes one line per request, ``{id, custom_id, response: {status_code, request_id, body}}`` (older
lines add ``"error": null``; a request that failed outside HTTP may carry ``error: {code, message}`` instead of a
response). Lines come in any order, may repeat, may name a ``custom_id`` that was never requested, and the
error file may not exist. Everything here streams the files line by line: memory grows with the number of
distinct ``custom_id`` values, never with file size.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

from airflow_provider_kluster.paths import PathLike, as_path, move_into_place, temp_sibling

log = logging.getLogger(__name__)

MAX_FIRST_ERRORS = 5
_SNIPPET_CHARS = 300
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class JoinOutcome(Enum):
    """Where one ``custom_id`` stands in the join."""

    #: Requested (it is in ``expected_ids``), no line read yet: missing unless a line turns up.
    REQUESTED = "requested"
    #: A success was read (and written): later lines for the id are duplicates.
    SUCCEEDED = "succeeded"
    #: Only failures so far; the winning one is in the output file, not written yet.
    FAILED_IN_OUTPUT = "failed in output"
    #: Only failures so far; the winning one is in the error file, not written yet.
    FAILED_IN_ERRORS = "failed in errors"
    #: Settled as failed, and its record is written.
    SETTLED = "settled"
    #: Lines name it, but it was never requested: counted in ``unexpected``, never written, never summed.
    UNEXPECTED = "unexpected"


#: The file each pending failure is in, in the order the files are read.
_PENDING_FAILURES = (JoinOutcome.FAILED_IN_OUTPUT, JoinOutcome.FAILED_IN_ERRORS)


@dataclass
class ResultRecord:
    """The outcome of one request, read from an output- or error-file line.

    :param custom_id: The request's id; ``None`` when the line names none or cannot be parsed.
    :param succeeded: Whether the request got a 2xx response.
    :param content: ``choices[0].message.content`` of the completion.
    :param finish_reason: ``choices[0].finish_reason``.
    :param usage: ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` (0 when absent).
    :param error: Why the request failed (HTTP status and message), ``None`` when it succeeded.
    :param status_code: HTTP status of the request's response, when it had one.
    :param model: The model that answered.
    :param missing: The request has no line in either file.
    :param raw: The parsed line (or its text when unparseable), kept for failed requests.
    """

    custom_id: str | None
    succeeded: bool
    content: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_USAGE_KEYS, 0))
    error: str | None = None
    status_code: int | None = None
    model: str | None = None
    missing: bool = False
    raw: Any = field(default=None, repr=False, compare=False)

    @property
    def status(self) -> str:
        """Return ``"succeeded"``, ``"failed"`` or ``"missing"``."""
        if self.succeeded:
            return "succeeded"
        return "missing" if self.missing else "failed"

    def to_dict(self, *, include_raw: bool = False) -> dict[str, Any]:
        """Return the record as JSON-native data; with ``include_raw``, a failed record also carries ``raw``."""
        data = {
            "custom_id": self.custom_id,
            "status": self.status,
            "content": self.content,
            "finish_reason": self.finish_reason,
            "usage": dict(self.usage),
            "error": self.error,
            "status_code": self.status_code,
            "model": self.model,
        }
        if include_raw and not self.succeeded and self.raw is not None:
            data["raw"] = self.raw
        return data


def missing_record(custom_id: str) -> ResultRecord:
    """Return the record of a request that has no line in the output or error file."""
    return ResultRecord(
        custom_id=custom_id, succeeded=False, missing=True, error="no result in the output or error file"
    )


# -- one line --------------------------------------------------------------------------------------------


def parse_result_line(line: str | bytes) -> ResultRecord:
    """Read one output- or error-file line into a record; never raise.

    A line that is not a JSON object gives a failed record with ``custom_id`` ``None`` and an error starting
    ``unparseable result line:``.
    """
    try:
        data = json.loads(line)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        return _unparseable(line, str(exc))
    except RecursionError:
        return _unparseable(line, "nested too deeply to read")
    if not isinstance(data, dict):
        return _unparseable(line, f"expected a JSON object, got {type(data).__name__}")
    try:
        return _record_of(data)
    except Exception as exc:  # a shape no one foresaw must not stop the join
        return ResultRecord(
            custom_id=_custom_id(data), succeeded=False, error=f"unreadable result line: {exc}", raw=data
        )


def _unparseable(line: str | bytes, reason: str) -> ResultRecord:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    snippet = text if len(text) <= _SNIPPET_CHARS else f"{text[:_SNIPPET_CHARS]}..."
    return ResultRecord(
        custom_id=None, succeeded=False, error=f"unparseable result line: {reason}: {snippet}", raw=text
    )


def _custom_id(data: dict[str, Any]) -> str | None:
    custom_id = data.get("custom_id")
    return None if custom_id is None else str(custom_id)


def _record_of(data: dict[str, Any]) -> ResultRecord:
    response = data.get("response")
    response = response if isinstance(response, dict) else {}
    status_code = _int_or_none(response.get("status_code"))
    body = _body_of(response.get("body"))
    error = data.get("error")
    choices = body.get("choices") if isinstance(body, dict) else None
    answered = status_code is not None or isinstance(choices, list)
    succeeded = answered and not error and (status_code is None or 200 <= status_code < 300)
    record = ResultRecord(
        custom_id=_custom_id(data),
        succeeded=succeeded,
        status_code=status_code,
        model=_str_or_none(body.get("model")) if isinstance(body, dict) else None,
        usage=_usage_of(body),
    )
    if succeeded:
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = first.get("message")
        record.content = _str_or_none(message.get("content")) if isinstance(message, dict) else None
        record.finish_reason = _str_or_none(first.get("finish_reason"))
    else:
        record.error = _error_message(data, error, body, status_code)
        record.raw = data
    return record


def _body_of(body: Any) -> Any:
    """Return the response body, decoding it when it came as JSON text."""
    if isinstance(body, (str, bytes)):
        with contextlib.suppress(ValueError):
            return json.loads(body)
    return body


def _usage_of(body: Any) -> dict[str, int]:
    usage = body.get("usage") if isinstance(body, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    return {key: _int_or_none(usage.get(key)) or 0 for key in _USAGE_KEYS}


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _error_message(data: dict[str, Any], error: Any, body: Any, status_code: int | None) -> str:
    """Say why a request failed: ``HTTP <status>: <message> (<code>)``, from whichever shape the line has."""
    detail = _describe_error(error) or _describe_body_error(body)
    if not detail:
        if status_code is None and not data.get("response"):
            detail = "no response"
        elif status_code is not None and 200 <= status_code < 300:
            detail = "response marked as an error"
        else:
            detail = f"no error message in {_snippet(data)}"
    return f"HTTP {status_code}: {detail}" if status_code is not None else detail


def _describe_error(error: Any) -> str | None:
    """Describe ``error``: ``{code, message}`` (OpenAI/kluster), a string, or anything else as JSON."""
    if not error:
        return None
    if isinstance(error, dict):
        message = error.get("message") or error.get("msg")
        code = error.get("code") or error.get("type") or error.get("errorCode")
        if message:
            return f"{message} ({code})" if code not in (None, "") else str(message)
        return _snippet(error)
    return str(error)


def _describe_body_error(body: Any) -> str | None:
    """Describe an error response body: ``{error: {...}}``, ``{message, errorCode}``, or plain text."""
    if isinstance(body, dict):
        return _describe_error(body.get("error")) or _describe_error(
            {"message": body["message"], "code": body.get("errorCode")} if body.get("message") else None
        )
    if isinstance(body, str) and body.strip():
        return body.strip()[:_SNIPPET_CHARS]
    return None


def _snippet(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= _SNIPPET_CHARS else f"{text[:_SNIPPET_CHARS]}..."


# -- the join --------------------------------------------------------------------------------------------


class _Join:
    """State of one join: the best outcome per ``custom_id`` and the running totals of the manifest.

    With ``requested`` (the input's ids, consumed here, once), :attr:`outcome` starts with one
    :attr:`JoinOutcome.REQUESTED` entry per distinct id, so a line for any other id is told apart by the same
    dict lookup that finds its outcome; it adds one :attr:`JoinOutcome.UNEXPECTED` entry. Without it, every
    id read counts as requested.
    """

    def __init__(self, *, requested: Iterable[str] | None, return_records: int, max_listed_ids: int) -> None:
        self.requested_only = requested is not None
        self.outcome: dict[str, JoinOutcome] = (
            {} if requested is None else dict.fromkeys(map(str, requested), JoinOutcome.REQUESTED)
        )
        self.succeeded = self.failed = self.missing = self.unexpected = 0
        self.duplicates = self.unparseable = 0
        self.usage = dict.fromkeys(_USAGE_KEYS, 0)
        self.failed_ids: list[str] = []
        self.missing_ids: list[str] = []
        self.unexpected_ids: list[str] = []
        self.first_errors: list[str] = []
        self.records: list[dict[str, Any]] = []
        self._return_records = return_records
        self._max_listed_ids = max_listed_ids

    def read_line(self, record: ResultRecord, where: JoinOutcome, out: IO[str] | None) -> None:
        """Pass one: take a line of the file ``where`` stands for; write it now if it is the id's first success."""
        custom_id = record.custom_id
        if custom_id is None:
            self.unparseable += 1
            self._note_error(record.error)
            return
        seen = self.outcome.get(custom_id)
        # The common case, a requested id's first line, costs this one dict lookup and one comparison.
        if seen is not JoinOutcome.REQUESTED:
            if seen is None:
                if self.requested_only:
                    self._add_unexpected(custom_id)
                    return
            elif seen is JoinOutcome.UNEXPECTED:
                return
            else:
                self.duplicates += 1
                if seen is JoinOutcome.SUCCEEDED or not record.succeeded:
                    return
        if record.succeeded:
            self.outcome[custom_id] = JoinOutcome.SUCCEEDED
            self.succeeded += 1
            self._emit(record, out)
        else:
            self.outcome[custom_id] = where

    def write_winning_failure(self, record: ResultRecord, where: JoinOutcome, out: IO[str] | None) -> None:
        """Pass two: take a line again; write it if it is the first failure of an id that never succeeded."""
        if record.custom_id is None or record.succeeded or self.outcome.get(record.custom_id) is not where:
            return
        self.outcome[record.custom_id] = JoinOutcome.SETTLED
        self.failed += 1
        if len(self.failed_ids) < self._max_listed_ids:
            self.failed_ids.append(record.custom_id)
        self._note_error(record.error)
        self._emit(record, out)

    def files_with_pending_failures(self) -> list[JoinOutcome]:
        """Return which files hold winning failures not written yet, in reading order."""
        pending = set(self.outcome.values())
        return [where for where in _PENDING_FAILURES if where in pending]

    def write_missing(self, out: IO[str] | None) -> None:
        """After both passes: count and write each requested id with no line in either file, in input order."""
        for custom_id, seen in self.outcome.items():
            if seen is JoinOutcome.REQUESTED:
                self.missing += 1
                if len(self.missing_ids) < self._max_listed_ids:
                    self.missing_ids.append(custom_id)
                self._emit(missing_record(custom_id), out)

    def _add_unexpected(self, custom_id: str) -> None:
        self.outcome[custom_id] = JoinOutcome.UNEXPECTED
        self.unexpected += 1
        if len(self.unexpected_ids) < self._max_listed_ids:
            self.unexpected_ids.append(custom_id)

    def _emit(self, record: ResultRecord, out: IO[str] | None) -> None:
        for key in _USAGE_KEYS:
            self.usage[key] += record.usage.get(key, 0)
        if len(self.records) < self._return_records:
            self.records.append(record.to_dict())
        if out is not None:
            out.write(json.dumps(record.to_dict(include_raw=True), ensure_ascii=False, default=str) + "\n")

    def _note_error(self, error: str | None) -> None:
        if error and error not in self.first_errors and len(self.first_errors) < MAX_FIRST_ERRORS:
            self.first_errors.append(error)


def join_results(
    *,
    output_path: PathLike | None = None,
    error_path: PathLike | None = None,
    expected_ids: Iterable[str] | None = None,
    expected_total: int | None = None,
    records_path: PathLike | None = None,
    return_records: int = 0,
    max_listed_ids: int = 20,
) -> dict[str, Any]:
    """Join a batch's output and error files by ``custom_id``; write the joined records; return a manifest.

    Results are accounted against the input. ``expected_ids`` is read first, once, into one small entry per
    distinct id (an id listed twice counts once). Per requested ``custom_id`` the best line wins: the first
    success, else the first failure, the output file read before the error file; every further line for that
    id counts as a duplicate. A line whose ``custom_id`` was never requested counts only in ``unexpected``
    (distinct ids, listed in ``unexpected_ids``): never as succeeded or failed, not in ``duplicates``,
    ``usage`` or ``first_errors``, and not in the records file. So with ``expected_ids``,
    ``succeeded + failed + missing == total`` is the number of distinct requested ids, and every one of them
    has exactly one record.

    The files are streamed once; a successful record is written as soon as it is read. A failure may still be
    superseded by a success further on (a retried request), so winning failures are written in a second pass,
    over only the file(s) holding them, once every id's outcome is known. Memory holds one small entry per
    distinct ``custom_id`` (requested or read), whatever the files' size.

    Without ``expected_ids``, every id read counts as requested and ``unexpected`` is 0. ``expected_total``
    (e.g. kluster's request count, when the input file is gone) then only sets ``missing`` to
    ``expected_total - succeeded - failed``, never below 0: ``total`` is ``max(expected_total, succeeded +
    failed)``. More ids than requests there are logged as a warning but not reported as ``unexpected``,
    since nothing tells which ids they are (and counting them twice would break the sum).

    The records file (JSONL, one line per id, :meth:`ResultRecord.to_dict` form; failed records add ``raw``,
    the line as kluster wrote it) lists successes in output order, then failures, then missing ids in input
    order. Lines naming no ``custom_id`` (or not JSON) count as ``unparseable``: they reach ``first_errors``,
    not the file.

    :param output_path: The downloaded output file; ``None`` or a path that does not exist when there is none.
    :param error_path: The downloaded error file; ``None`` or a path that does not exist when there is none.
    :param expected_ids: Every request's ``custom_id``, e.g. :func:`~.request_files.iter_custom_ids`, consumed
        once before the files are read; the ones with no line are reported missing, lines for any other id
        unexpected.
    :param expected_total: Number of requests, used when ``expected_ids`` is not given.
    :param records_path: Where to write the joined records (local path, URI or ObjectStoragePath).
    :param return_records: Put the first this-many records in the manifest (keep it small: XCom).
    :param max_listed_ids: Most ids listed in ``failed_ids``, ``missing_ids`` and ``unexpected_ids``.
    :return: The manifest: ``succeeded``, ``failed``, ``missing``, ``total``, ``unexpected``, ``duplicates``,
        ``unparseable``, ``usage`` (of the requested ids' winning records), ``failed_ids``, ``missing_ids``,
        ``unexpected_ids``, ``first_errors``, ``records`` (when ``return_records``), ``records_path``.
    """
    sources = {
        JoinOutcome.FAILED_IN_OUTPUT: _existing(output_path, "output"),
        JoinOutcome.FAILED_IN_ERRORS: _existing(error_path, "error"),
    }
    join = _Join(
        requested=expected_ids, return_records=max(0, return_records), max_listed_ids=max(0, max_listed_ids)
    )
    dest = as_path(records_path) if records_path is not None else None
    with _records_writer(dest) as out:
        for where, source in sources.items():
            for record in _iter_records(source):
                join.read_line(record, where, out)
        for where in join.files_with_pending_failures():
            for record in _iter_records(sources[where]):
                join.write_winning_failure(record, where, out)
        if join.requested_only:
            join.write_missing(out)
        elif expected_total is not None:
            join.missing = max(0, expected_total - join.succeeded - join.failed)
            if join.succeeded + join.failed > expected_total:
                log.warning(
                    "The files answer %d ids but the batch had %d requests; without the input's ids, "
                    "the extra ones cannot be told apart",
                    join.succeeded + join.failed,
                    expected_total,
                )
    manifest = _manifest(join, dest, return_records)
    log.info(
        "Joined results: %d succeeded, %d failed, %d missing, %d duplicate lines, %d unparseable lines",
        join.succeeded,
        join.failed,
        join.missing,
        join.duplicates,
        join.unparseable,
    )
    if join.unexpected:
        log.warning(
            "%d custom_id(s) in the results were never requested, left out of the records: %s",
            join.unexpected,
            ", ".join(join.unexpected_ids) or "-",
        )
    return manifest


def _manifest(join: _Join, dest: Any, return_records: int) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "succeeded": join.succeeded,
        "failed": join.failed,
        "missing": join.missing,
        "total": join.succeeded + join.failed + join.missing,
        "unexpected": join.unexpected,
        "duplicates": join.duplicates,
        "unparseable": join.unparseable,
        "usage": dict(join.usage),
        "failed_ids": join.failed_ids,
        "missing_ids": join.missing_ids,
        "unexpected_ids": join.unexpected_ids,
        "first_errors": join.first_errors,
    }
    if return_records > 0:
        manifest["records"] = join.records
    manifest["records_path"] = None if dest is None else str(dest)
    return manifest


def _existing(location: PathLike | None, kind: str) -> Any:
    """Return the file as a path object, or ``None`` when none was given or it does not exist."""
    if location is None:
        return None
    path = as_path(location)
    if not path.exists():
        log.warning("The %s file %s does not exist; joining without it", kind, path)
        return None
    return path


def _iter_records(source: Any) -> Iterator[ResultRecord]:
    """Yield a record per non-blank line of ``source`` (nothing when it is ``None``), streamed."""
    if source is None:
        return
    with source.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                yield parse_result_line(raw)


@contextlib.contextmanager
def _records_writer(dest: Any) -> Iterator[IO[str] | None]:
    """Open a temporary sibling of ``dest`` for writing; rename it onto ``dest`` only when all went well."""
    if dest is None:
        yield None
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    try:
        with tmp.open("w", encoding="utf-8") as out:
            yield out
        move_into_place(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
