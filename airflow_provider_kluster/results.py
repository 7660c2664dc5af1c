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
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from itertools import accumulate, islice
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
    return _guarded_record_of(data)


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


# -- reading a successful line fast ----------------------------------------------------------------------

#: The C scanner behind ``json.loads``, called on a line's text directly: the same values, without the work
#: ``json.loads`` does around it on every call (encoding detection, whitespace regexes).
# typeshed does not declare the decoder's ``scan_once`` nor ``json.decoder.scanstring``; both are public in CPython.
_SCAN: Any = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
#: The C reader of one JSON string literal that scanner uses: ``(value, end)`` from just after its quote.
_SCAN_STRING: Any = json.decoder.scanstring  # type: ignore[attr-defined]
#: What ``json.dumps(..., ensure_ascii=False)`` writes a string with.
_ENCODE_STR = json.encoder.encode_basestring
_JSON_SPACE = " \t\n\r"
_CONTENT_KEY = '"content"'

#: ``(custom_id, content as JSON text, finish_reason, model, status_code, prompt, completion, total tokens)``
#: of a success.
_Success = tuple[str, str, "str | None", "str | None", int, int, int, int]


class _LineReader:
    """Read result lines: the usual successes straight into the fields of their record, any other line with
    :func:`parse_result_line` — the two ways always agree.

    A success's answer is written to the records file as the JSON string literal the line holds, never decoded
    and encoded again: the line is parsed with that literal swapped for ``NaN`` (read as a marker, so its text is
    not decoded a second time) after :func:`json.decoder.scanstring` has checked the literal is valid. The marker
    is trusted only when it is the line's only constant and sits at ``choices[0].message.content``; it then can
    only be the swapped literal (the ``NaN`` replaces a string that follows ``"content":``, so it is read as a
    value exactly where that string was, and everything else reads as in the line itself). Any doubt — no such
    literal, a ``NaN`` of the line's own, an unusual type anywhere — and the line is parsed whole.
    """

    def __init__(self) -> None:
        self._marks = 0
        self._marker = object()
        self._scan_marked: Any = json.JSONDecoder(parse_constant=self._mark).scan_once  # type: ignore[attr-defined]

    def _mark(self, name: str) -> object:
        self._marks += 1
        return self._marker

    def read(self, raw: bytes) -> _Success | ResultRecord | None:
        """Return a success's fields, else the line's record; ``None`` for a blank line."""
        if raw[:1] != b"{":
            return parse_result_line(raw) if raw.strip() else None
        try:
            text = raw.decode()
        except (
            UnicodeDecodeError
        ):  # parse_result_line reads encoded surrogates (as json.loads does) or says why
            return parse_result_line(raw)
        data = literal = None
        start = text.find(_CONTENT_KEY)
        while start > 0:
            if text[start - 1] != "\\":
                if text.startswith('": "', start + 8):
                    at = start + 11
                elif text.startswith('":"', start + 8):
                    at = start + 10
                else:
                    at = 0
                if at:
                    data, literal = self._read_marked(text, at)
                    break
            start = text.find(_CONTENT_KEY, start + 9)
        if data is None:
            try:
                data, end = _SCAN(text, 0)
            except Exception:  # not JSON, nested too deeply: parse_result_line says why
                return parse_result_line(raw)
            if end != len(text) and text[end:].strip(_JSON_SPACE):
                return parse_result_line(raw)
        fields = _success_fields(data, literal, self._marker)
        if fields is not None:
            return fields
        # A failure, or a success of an unusual shape: read as parse_result_line reads it.
        return parse_result_line(raw) if literal is not None else _guarded_record_of(data)

    def _read_marked(self, text: str, at: int) -> tuple[Any, str | None]:
        """Parse ``text`` with the string literal at ``at`` swapped for the marker; ``(None, None)`` on doubt."""
        try:
            _, end = _SCAN_STRING(text, at + 1)
            doc = f"{text[:at]}NaN{text[end:]}"
            marks = self._marks
            data, doc_end = self._scan_marked(doc, 0)
        except Exception:  # an invalid literal or line: parsed whole, which says why
            return None, None
        if self._marks != marks + 1 or (doc_end != len(doc) and doc[doc_end:].strip(_JSON_SPACE)):
            return None, None
        return data, text[at:end]


def _success_fields(data: dict[str, Any], literal: str | None, marker: object) -> _Success | None:
    """Return the fields of a success in the usual shape, as :func:`parse_result_line` would read them, or
    ``None`` for anything else (a failure, a numeric string, a body sent as text, …)."""
    custom_id = data.get("custom_id")
    response = data.get("response")
    if type(custom_id) is not str or type(response) is not dict or data.get("error"):
        return None
    status = response.get("status_code")
    body = response.get("body")
    if type(status) is not int or not 200 <= status < 300 or type(body) is not dict:
        return None
    choices = body.get("choices")
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        return None
    first = choices[0]
    message = first.get("message")
    if type(message) is not dict:
        return None
    content = message.get("content")
    if literal is not None:
        if content is not marker:
            return None
    elif content is None:
        literal = "null"
    elif type(content) is str:
        literal = _ENCODE_STR(content)
    else:
        return None
    finish_reason = first.get("finish_reason")
    model = body.get("model")
    if not ((finish_reason is None or type(finish_reason) is str) and (model is None or type(model) is str)):
        return None
    usage = body.get("usage")
    if type(usage) is not dict:
        return custom_id, literal, finish_reason, model, status, 0, 0, 0
    # Any falsy count is 0, as in _usage_of; a truthy one other than an int goes the slow way.
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    total = usage.get("total_tokens") or 0
    if type(prompt) is not int or type(completion) is not int or type(total) is not int:
        return None
    return custom_id, literal, finish_reason, model, status, prompt, completion, total


def _guarded_record_of(data: dict[str, Any]) -> ResultRecord:
    """What :func:`parse_result_line` makes of a line that parsed to the object ``data``."""
    try:
        return _record_of(data)
    except Exception as exc:  # a shape no one foresaw must not stop the join
        return ResultRecord(
            custom_id=_custom_id(data), succeeded=False, error=f"unreadable result line: {exc}", raw=data
        )


def _success_line(fields: _Success) -> bytes:
    """Return the record line of a success: what ``json.dumps`` writes of its :meth:`ResultRecord.to_dict`,
    except that the answer is the line's own literal (the same string, perhaps escaped otherwise)."""
    custom_id, content, finish_reason, model, status, prompt, completion, total = fields
    text = (
        f'{{"custom_id": {_ENCODE_STR(custom_id)}, "status": "succeeded", "content": {content}, '
        f'"finish_reason": {"null" if finish_reason is None else _ENCODE_STR(finish_reason)}, '
        f'"usage": {{"prompt_tokens": {prompt}, "completion_tokens": {completion}, "total_tokens": {total}}}, '
        f'"error": null, "status_code": {status}, "model": {"null" if model is None else _ENCODE_STR(model)}}}\n'
    )
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (a "\ud800" escape in the line): write it escaped again
        return (json.dumps(json.loads(text)) + "\n").encode()


def _record_line(record: ResultRecord) -> bytes:
    """Return a record's line for the records file (failed records with ``raw``), always valid UTF-8."""
    data = record.to_dict(include_raw=True)
    try:
        return (json.dumps(data, ensure_ascii=False, default=str) + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped, so the line stays UTF-8 and reads back the same
        return (json.dumps(data, default=str) + "\n").encode()


# -- the ids of one join ----------------------------------------------------------------------------------

# Where one id stands (JoinOutcome, one byte each).
_REQUESTED, _SUCCEEDED, _FAILED_IN_OUTPUT, _FAILED_IN_ERRORS, _SETTLED, _UNEXPECTED = range(6)
#: A repeat of an id earlier in the requested ids: kept in order, never found, never counted.
_REPEATED = 6
_LOAD_CHUNK = 4096


class _Ids:
    """Distinct ``custom_id`` values, exactly, in the order first added, each with a state byte.

    The ids' UTF-8 bytes lie one after another in one ``bytearray``; an open-addressing table of 4-byte slots
    (linear probing, at most 2/3 full) keyed by each id's ``hash`` finds them, and a match is confirmed byte for
    byte, so two ids are never taken for one. No Python object is kept per id: an id of ``n`` UTF-8 bytes
    costs ``n + 11`` to ``n + 17`` bytes (its bytes, its end offset, its state, its slots).
    """

    def __init__(self) -> None:
        self._blob = bytearray()
        #: Id ``k`` is ``_blob[_bounds[k]:_bounds[k + 1]]``.
        self._bounds = array("I", [0])
        self.states = bytearray()
        self._slots = array("I", [0]) * 16
        self._mask = 15

    def __len__(self) -> int:
        return len(self.states)

    @classmethod
    def of(cls, custom_ids: Iterable[Any]) -> _Ids:
        """Return a table of ``custom_ids`` (consumed once), each :data:`_REQUESTED`; a repeat is marked
        :data:`_REPEATED`, so the first of them stands for all."""
        ids = cls()
        hashes = array("q")
        source = iter(custom_ids)
        while chunk := list(map(str, islice(source, _LOAD_CHUNK))):
            encoded = [custom_id.encode("utf-8", "surrogatepass") for custom_id in chunk]
            ids._blob += b"".join(encoded)
            ends = accumulate(map(len, encoded), initial=ids._bounds[-1])
            next(ends)
            ids._extend_bounds(ends)
            hashes.extend(map(hash, chunk))
        ids.states = bytearray(len(hashes))
        size = 16
        while size * 2 < len(hashes) * 3:
            size *= 2
        ids._slots, ids._mask = array("I", [0]) * size, size - 1
        ids._index(range(len(hashes)), hashes)
        return ids

    def find(self, custom_id: str) -> int:
        """Return the index of ``custom_id``, or ``-1``."""
        key = custom_id.encode("utf-8", "surrogatepass")
        slots, mask, bounds, blob = self._slots, self._mask, self._bounds, self._blob
        i = hash(custom_id) & mask
        while slot := slots[i]:
            if blob[bounds[slot - 1] : bounds[slot]] == key:
                return slot - 1
            i = (i + 1) & mask
        return -1

    def add(self, custom_id: str, state: int) -> int:
        """Add ``custom_id`` (not in the table: :meth:`find` said so) with ``state``; return its index."""
        index = len(self.states)
        self._blob += custom_id.encode("utf-8", "surrogatepass")
        self._extend_bounds((len(self._blob),))
        self.states.append(state)
        if (index + 1) * 3 > len(self._slots) * 2:
            self._slots, self._mask = array("I", [0]) * (len(self._slots) * 2), len(self._slots) * 2 - 1
            self._index(range(index + 1), None)
        else:
            self._index((index,), (hash(custom_id),), fresh=True)
        return index

    def id_at(self, index: int) -> str:
        """Return the id at ``index``."""
        return self._blob[self._bounds[index] : self._bounds[index + 1]].decode("utf-8", "surrogatepass")

    def _extend_bounds(self, ends: Iterable[int]) -> None:
        try:
            self._bounds.extend(ends)
        except OverflowError:  # over 4 GiB of ids: 8-byte offsets from here on
            self._bounds = array("Q", self._bounds)
            self._bounds.extend(ends)

    def _index(self, indexes: Iterable[int], hashes: Any, *, fresh: bool = False) -> None:
        """Put ids in the slots (their hashes given, or computed); mark an id met again :data:`_REPEATED`."""
        slots, mask, bounds, blob, states = self._slots, self._mask, self._bounds, self._blob, self.states
        for k in indexes:
            if states[k] == _REPEATED:
                continue
            key = blob[bounds[k] : bounds[k + 1]]
            h = hash(key.decode("utf-8", "surrogatepass")) if hashes is None else hashes[0 if fresh else k]
            i = h & mask
            while slot := slots[i]:
                if blob[bounds[slot - 1] : bounds[slot]] == key:
                    states[k] = _REPEATED
                    break
                i = (i + 1) & mask
            else:
                slots[i] = k + 1


# -- the join --------------------------------------------------------------------------------------------


class _Join:
    """State of one join: each ``custom_id``'s standing (:class:`JoinOutcome`, one byte in :class:`_Ids`) and
    the running totals of the manifest.

    With ``requested`` (the input's ids, consumed here, once) every distinct id starts
    :attr:`JoinOutcome.REQUESTED`, so a line for any other id is told apart by the same lookup that finds its
    standing; it is added :attr:`JoinOutcome.UNEXPECTED`. Without it, every id read counts as requested.
    """

    def __init__(self, *, requested: Iterable[str] | None, return_records: int, max_listed_ids: int) -> None:
        self.requested_only = requested is not None
        self.ids = _Ids() if requested is None else _Ids.of(requested)
        self.succeeded = self.failed = self.missing = self.unexpected = 0
        self.duplicates = self.unparseable = 0
        self.usage = dict.fromkeys(_USAGE_KEYS, 0)
        self.failed_ids: list[str] = []
        self.missing_ids: list[str] = []
        self.unexpected_ids: list[str] = []
        self.first_errors: list[str] = []
        self.records: list[dict[str, Any]] = []
        #: Per file, where each id's first failure line starts (the second pass reads only those).
        self.pending: dict[int, array[int]] = {_FAILED_IN_OUTPUT: array("Q"), _FAILED_IN_ERRORS: array("Q")}
        self._return_records = return_records
        self._max_listed_ids = max_listed_ids

    def read_file(self, source: Any, where: int, out: IO[bytes] | None) -> None:
        """Pass one over the file ``where`` stands for: write each id's first success as it is read, note where
        each id's first failure is (it may yet be superseded by a success)."""
        pending = self.pending[where]
        ids = self.ids
        find, states = ids.find, ids.states
        read = _LineReader().read
        offset = 0
        with source.open("rb") as handle:
            for raw in handle:
                start = offset
                offset += len(raw)
                fields = read(raw)
                if fields is None:
                    continue
                if not isinstance(fields, ResultRecord):
                    record = None
                    custom_id, succeeded = fields[0], True
                else:
                    record = fields
                    if record.custom_id is None:
                        self.unparseable += 1
                        self._note_error(record.error)
                        continue
                    custom_id, succeeded = record.custom_id, record.succeeded
                index = find(custom_id)
                if index < 0:
                    if self.requested_only:
                        self._add_unexpected(custom_id)
                        continue
                    index = ids.add(custom_id, _REQUESTED)
                # The common case, a requested id's first line, costs one lookup and one comparison.
                state = states[index]
                if state != _REQUESTED:
                    if state == _UNEXPECTED:
                        continue
                    self.duplicates += 1
                    if state == _SUCCEEDED or not succeeded:
                        continue
                if not succeeded:
                    states[index] = where
                    pending.append(start)
                    continue
                states[index] = _SUCCEEDED
                self.succeeded += 1
                if record is None:
                    self._emit_success(fields, out)  # type: ignore[arg-type]  # a success's fields (record is None)
                else:
                    self._emit(record, out)

    def write_winning_failures(self, source: Any, where: int, out: IO[bytes] | None) -> None:
        """Pass two: read again only the first failure of each id of the file; write it if no success came."""
        starts = self.pending[where]
        if not starts:
            return
        find, states = self.ids.find, self.ids.states
        with source.open("rb") as handle:
            for start in starts:
                handle.seek(start)
                record = parse_result_line(handle.readline())
                index = -1 if record.custom_id is None else find(record.custom_id)
                if index < 0 or states[index] != where:
                    continue  # superseded by a success (or the file changed under us)
                states[index] = _SETTLED
                self.failed += 1
                if len(self.failed_ids) < self._max_listed_ids:
                    self.failed_ids.append(record.custom_id)  # type: ignore[arg-type]
                self._note_error(record.error)
                self._emit(record, out)

    def files_with_pending_failures(self) -> list[int]:
        """Return which files hold first failures not settled yet, in reading order."""
        return [where for where, starts in self.pending.items() if starts]

    def write_missing(self, out: IO[bytes] | None) -> None:
        """After both passes: count and write each requested id with no line in either file, in input order."""
        states = self.ids.states
        index = states.find(_REQUESTED)
        while index >= 0:
            custom_id = self.ids.id_at(index)
            self.missing += 1
            if len(self.missing_ids) < self._max_listed_ids:
                self.missing_ids.append(custom_id)
            self._emit(missing_record(custom_id), out)
            index = states.find(_REQUESTED, index + 1)

    def _add_unexpected(self, custom_id: str) -> None:
        self.ids.add(custom_id, _UNEXPECTED)
        self.unexpected += 1
        if len(self.unexpected_ids) < self._max_listed_ids:
            self.unexpected_ids.append(custom_id)

    def _emit_success(self, fields: _Success, out: IO[bytes] | None) -> None:
        usage = self.usage
        usage["prompt_tokens"] += fields[5]
        usage["completion_tokens"] += fields[6]
        usage["total_tokens"] += fields[7]
        keep = len(self.records) < self._return_records
        if out is not None or keep:
            line = _success_line(fields)
            if out is not None:
                out.write(line)
            if keep:
                self.records.append(json.loads(line))

    def _emit(self, record: ResultRecord, out: IO[bytes] | None) -> None:
        for key in _USAGE_KEYS:
            self.usage[key] += record.usage.get(key, 0)
        if len(self.records) < self._return_records:
            self.records.append(record.to_dict())
        if out is not None:
            out.write(_record_line(record))

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

    Results are accounted against the input. ``expected_ids`` is read first, once, into one compact entry per
    distinct id (an id listed twice counts once). Per requested ``custom_id`` the best line wins: the first
    success, else the first failure, the output file read before the error file; every further line for that
    id counts as a duplicate. A line whose ``custom_id`` was never requested counts only in ``unexpected``
    (distinct ids, listed in ``unexpected_ids``): never as succeeded or failed, not in ``duplicates``,
    ``usage`` or ``first_errors``, and not in the records file. So with ``expected_ids``,
    ``succeeded + failed + missing == total`` is the number of distinct requested ids, and every one of them
    has exactly one record. Ids are compared exactly (byte for byte), never by a digest.

    The files are streamed once; a successful record is written as soon as it is read. A failure may still be
    superseded by a success further on (a retried request), so winning failures are written in a second pass
    that reads again only the first failure line of each id (from where pass one saw it start), once every
    id's outcome is known. Memory holds each distinct ``custom_id``'s UTF-8 bytes plus 11 to 17 bytes (no
    Python object per id), and 8 bytes per failed request, whatever the files' size.

    Without ``expected_ids``, every id read counts as requested and ``unexpected`` is 0. ``expected_total``
    (e.g. kluster's request count, when the input file is gone) then only sets ``missing`` to
    ``expected_total - succeeded - failed``, never below 0: ``total`` is ``max(expected_total, succeeded +
    failed)``. More ids than requests there are logged as a warning but not reported as ``unexpected``,
    since nothing tells which ids they are (and counting them twice would break the sum).

    The records file (JSONL, UTF-8, one line per id, :meth:`ResultRecord.to_dict` form; failed records add
    ``raw``, the line as kluster wrote it) lists successes in output order, then failures, then missing ids in
    input order. Lines naming no ``custom_id`` (or not JSON) count as ``unparseable``: they reach
    ``first_errors``, not the file.

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
        _FAILED_IN_OUTPUT: _existing(output_path, "output"),
        _FAILED_IN_ERRORS: _existing(error_path, "error"),
    }
    join = _Join(
        requested=expected_ids, return_records=max(0, return_records), max_listed_ids=max(0, max_listed_ids)
    )
    dest = as_path(records_path) if records_path is not None else None
    with _records_writer(dest) as out:
        for where, source in sources.items():
            if source is not None:
                join.read_file(source, where, out)
        for where in join.files_with_pending_failures():
            join.write_winning_failures(sources[where], where, out)
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


@contextlib.contextmanager
def _records_writer(dest: Any) -> Iterator[IO[bytes] | None]:
    """Open a temporary sibling of ``dest`` for writing; rename it onto ``dest`` only when all went well."""
    if dest is None:
        yield None
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    try:
        with tmp.open("wb") as out:
            yield out
        move_into_place(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
