"""Build and validate kluster.ai batch request files (JSONL) before anything is uploaded.

Validation streams the file as bytes, one line at a time, in constant memory apart from one 8-byte digest per
``custom_id`` (for duplicate detection). Every problem is reported with its 1-based line number, so a user can
fix a whole file in one go instead of learning about one problem per failed batch.

A line is refused for what kluster.ai's request schema refuses, and only that: each line must be one JSON object
(no key named twice in an object, no ``NaN`` or ``Infinity``) that ``POST``s to ``/v1/chat/completions`` with a
model and messages, each message with a known ``role`` and a ``content``; chat parameters whose type the schema
fixes must have it (token limits whole numbers of at least 1, sampling parameters numbers, switches booleans).
Parameters the schema leaves open, and ones it does not know, pass unchecked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from airflow_provider_kluster.batches import BATCH_ENDPOINT
from airflow_provider_kluster.exceptions import KlusterRequestFileError
from airflow_provider_kluster.paths import PathLike, as_path, move_into_place, temp_sibling

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUESTS = 100_000  # Core plan; Trial 1,000; Scale 500,000; Enterprise unlimited
MAX_FILE_BYTES = 100 * 1024 * 1024  # kluster's per-file upload limit
BATCH_URL = BATCH_ENDPOINT

#: Chat parameters kluster.ai's batch endpoint rejects.
UNSUPPORTED_BODY_PARAMS = ("n", "response_format", "store", "service_tier", "modalities", "stream_options")
#: Message roles kluster.ai accepts: its request schema's (assistant, function, tool, user) and ``system``,
#: which every one of its examples uses.
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "function")

_ROLES = frozenset(MESSAGE_ROLES)
_ROLE_LIST = ", ".join(MESSAGE_ROLES)
_UNSUPPORTED = frozenset(UNSUPPORTED_BODY_PARAMS)
_PLAN_LIMITS = "Trial 1,000; Core 100,000; Scale 500,000; Enterprise unlimited"
_LISTED_MODELS = 5
_SHOWN_VALUE_CHARS = 80


@dataclass(frozen=True)
class RequestFileSummary:
    """What a valid request file holds.

    :param path: The file, as given (local path or URI).
    :param requests: Number of requests (lines).
    :param bytes: Size of the file in bytes.
    :param sha256: Hex SHA-256 of the file's bytes, an input fingerprint.
    :param models: Sorted distinct ``body.model`` values.
    """

    path: str
    requests: int
    bytes: int
    sha256: str
    models: tuple[str, ...]


# -- validation ------------------------------------------------------------------------------------------


def validate_request_file(
    path: PathLike,
    *,
    max_requests: int | None = DEFAULT_MAX_REQUESTS,
    max_bytes: int | None = MAX_FILE_BYTES,
    known_models: Collection[str] | None = None,
    max_errors: int = 20,
    check_duplicates: bool = True,
) -> RequestFileSummary:
    """Check a request file line by line and summarise it; raise with every problem found, by line.

    :param path: Local path, ``file://`` or object-storage URI, or ObjectStoragePath of the JSONL file.
    :param max_requests: Most lines allowed (your plan's per-batch limit); ``None`` for no limit.
    :param max_bytes: Largest file allowed; ``None`` for no limit. 100 MB is kluster.ai's per-file limit.
    :param known_models: Model ids available to the account; when given, every ``body.model`` must be one.
    :param max_errors: Stop reading after this many problems.
    :param check_duplicates: Refuse a ``custom_id`` used twice (with one 8-byte digest per id in memory);
        ``False`` leaves that to the caller (the job operator checks it on disk, for inputs of any size).
    :raises KlusterRequestFileError: The file is invalid; ``errors`` lists each problem.
    :return: The file's summary.
    """
    source = as_path(path)
    too_big = _size_problem(_stat_size(source), max_bytes)
    if too_big:
        _raise_problems(source, [too_big], truncated=False)
    checker = _LineChecker(known_models=known_models, max_errors=max_errors)
    checker.check_duplicates = check_duplicates
    digest = hashlib.sha256()
    size = requests = 0
    update, common = digest.update, checker.check_common  # the loop runs per line: no lookups in it
    with _open_request_file(source) as handle:
        for lineno, raw in enumerate(handle, start=1):
            update(raw)
            size += len(raw)
            if max_bytes is not None and size > max_bytes:
                checker.add_problem(
                    f"{_size_problem(size, max_bytes, exact=False)} (passed at line {lineno})"
                )
                break
            if raw.isspace():
                checker.add_line_problem(lineno, _BLANK_LINE)
            else:
                requests += 1
                if max_requests is not None and requests > max_requests:
                    checker.add_line_problem(lineno, _too_many_requests(max_requests))
                    break
                if common(raw):
                    continue
                checker.check_strict(lineno, raw)
            if checker.truncated:  # only a problem can fill the list
                break
    if requests == 0 and not checker.truncated:
        _raise_problems(source, ["the file has no requests (it is empty or holds only blank lines)"], False)
    if checker.problems:
        checker.resolve_duplicates(source)
        _raise_problems(source, checker.problems, checker.truncated)
    return RequestFileSummary(
        path=str(source),
        requests=requests,
        bytes=size,
        sha256=digest.hexdigest(),
        models=tuple(sorted(checker.models)),
    )


_BLANK_LINE = "empty line; remove it (only a single newline may end the file)"


def _too_many_requests(max_requests: int) -> str:
    return (
        f"more than max_requests={max_requests:,} requests; stopped reading here. Shard the file into several "
        f"batches, or raise max_requests to your plan's per-batch limit ({_PLAN_LIMITS})"
    )


def _size_problem(size: int | None, max_bytes: int | None, *, exact: bool = True) -> str | None:
    if size is None or max_bytes is None or size <= max_bytes:
        return None
    return (
        f"the file is {_human_bytes(size)}{'' if exact else ' or more'}, over max_bytes={max_bytes:,} bytes; 100 MB is kluster.ai's "
        "per-file upload limit: shard the requests into several files and batches"
    )


def _human_bytes(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB ({size:,} bytes)"
    return f"{size:,} bytes"


def _stat_size(source: Any) -> int | None:
    """Return the file's size from its stat, or ``None`` when the store cannot tell (it is then counted)."""
    try:
        return int(source.stat().st_size)
    except (OSError, AttributeError, TypeError, ValueError, NotImplementedError):
        return None


@contextlib.contextmanager
def _open_request_file(source: Any) -> Iterator[IO[bytes]]:
    try:
        handle = source.open("rb")
    except FileNotFoundError:
        raise KlusterRequestFileError(
            f"Request file {source} does not exist; nothing was uploaded.", [f"{source}: no such file"]
        ) from None
    except IsADirectoryError:
        raise KlusterRequestFileError(
            f"Request file {source} is a directory, not a JSONL file; nothing was uploaded.",
            [f"{source}: is a directory"],
        ) from None
    with handle:
        yield handle


def _raise_problems(source: Any, problems: list[str], truncated: bool) -> None:
    count = f"more than {len(problems)} problems" if truncated else _plural(len(problems), "problem")
    lines = [f"Request file {source} has {count}; nothing was uploaded:"]
    lines.extend(f"  {problem}" for problem in problems)
    if truncated:
        lines.append("  ...and more")
    raise KlusterRequestFileError("\n".join(lines), problems)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else f"{text[:_SHOWN_VALUE_CHARS]}..."


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


# -- strict JSON ------------------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    """A JSON object names the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NonFiniteNumber(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python reads them, JSON (and kluster.ai) does not."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _non_finite(name: str) -> Any:
    raise _NonFiniteNumber(name)


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_constant=_non_finite)
# Builder output: compact UTF-8, and NaN/Infinity refused instead of written as invalid JSON.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _parse_line(text: str) -> Any:
    """Parse one line as strict JSON: duplicate keys raise :class:`_DuplicateKey`, ``NaN`` and ``Infinity``
    :class:`_NonFiniteNumber`, anything else invalid ``json.JSONDecodeError``."""
    return _DECODER.decode(text)


# -- chat parameters ---------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is int or kind is float or (isinstance(value, (int, float)) and kind is not bool)


def _is_whole_number_from_one(value: Any) -> bool:
    if type(value) is int:
        return value >= 1
    return _is_number(value) and value >= 1 and (isinstance(value, int) or value.is_integer())


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


_ANY_NUMBER: tuple[Callable[[Any], bool], str] = (_is_number, "a number")
_TOKEN_LIMIT: tuple[Callable[[Any], bool], str] = (_is_whole_number_from_one, "a whole number of at least 1")
_BOOLEAN: tuple[Callable[[Any], bool], str] = (_is_bool, "a boolean (true or false)")
#: The chat parameters whose type kluster.ai's request schema fixes: name -> (accepts, what is allowed).
#: ``null`` is allowed for each; parameters the schema leaves open (and unknown ones) are not checked.
_BODY_PARAM_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": _TOKEN_LIMIT,
    "max_completion_tokens": _TOKEN_LIMIT,
    "temperature": _ANY_NUMBER,
    "top_p": _ANY_NUMBER,
    "frequency_penalty": _ANY_NUMBER,
    "presence_penalty": _ANY_NUMBER,
    "seed": _ANY_NUMBER,
    "top_logprobs": _ANY_NUMBER,
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "repetition_penalty": (lambda v: _is_number(v) and v >= 0, "a number of at least 0"),
    "logprobs": _BOOLEAN,
    "parallel_tool_calls": _BOOLEAN,
    "stream": _BOOLEAN,
    "stop": (_is_stop, "a string or an array of strings"),
    "logit_bias": (lambda v: isinstance(v, dict), "an object"),
    "tools": (lambda v: isinstance(v, list), "an array"),
    "user": (lambda v: isinstance(v, str), "a string"),
}


def body_param_problem(name: str, value: Any, *, null: str = "null") -> str | None:
    """Tell what is wrong with one chat parameter, as ``"must be …, got …"``; ``None`` when kluster.ai takes it.

    Only parameters whose type kluster.ai's request schema fixes are judged (token limits, sampling numbers,
    switches, ``stop``, …); any other name, and ``null`` for every one, passes.

    :param null: How the message spells null (``"None"`` for Python arguments).
    """
    rule = _BODY_PARAM_RULES.get(name)
    if rule is None or value is None or rule[0](value):
        return None
    return f"must be {rule[1]} (or {null}), got {_shown(value)}"


def _message_problem(message: Any) -> str | None:
    """Tell what is wrong with one chat message (``None``: nothing)."""
    if not isinstance(message, dict):
        return f"must be an object with a role and a content, got {_type_name(message)}"
    role = message.get("role")
    if role is None:
        return f"has no role; give one of {_ROLE_LIST}"
    if not isinstance(role, str) or role not in _ROLES:
        return f"role must be one of {_ROLE_LIST}, got {_shown(role)}"
    content = message.get("content")
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return None  # an assistant turn that only calls tools
        return "has no content; give a string or an array of content parts"
    if not isinstance(content, (str, list)):
        return f"content must be a string or an array of content parts, got {_type_name(content)}"
    return None


def _id_digest(custom_id: str) -> int:
    """A 64-bit digest of one ``custom_id``: the interpreter's own string hash (SipHash, computed in C and cached
    on the string), which is stable for the life of the process, the only place the digests live."""
    return hash(custom_id)


#: The C scanner with no object hook: the fast path's parse. Duplicate keys are found without a hook, by counting
#: (see :meth:`_LineChecker.check_common`); ``NaN`` and ``Infinity`` still raise.
_PLAIN_SCAN = json.JSONDecoder(parse_constant=_non_finite).scan_once  # type: ignore[attr-defined]


class _LineChecker:
    """Check request lines one at a time and collect numbered problems, up to ``max_errors``.

    Duplicate ``custom_id`` values are found with a set of 8-byte digests; the line where a duplicated id first
    appeared is looked up afterwards, in a second pass that runs only when duplicates were found.
    """

    def __init__(self, *, known_models: Collection[str] | None, max_errors: int) -> None:
        self.problems: list[str] = []
        self.truncated = False
        self.models: set[str] = set()
        self._max_errors = max(1, max_errors)
        self._known = None if known_models is None else frozenset(known_models)
        self._seen: set[int] = set()
        self.check_duplicates = True
        self._duplicates: dict[int, tuple[int, int, str]] = {}  # problem index -> (digest, line, custom_id)

    def add_problem(self, problem: str) -> None:
        """Record a problem, or mark the list truncated when it is full."""
        if len(self.problems) >= self._max_errors:
            self.truncated = True
        else:
            self.problems.append(problem)

    def add_line_problem(self, lineno: int, problem: str) -> None:
        """Record a problem of one line."""
        self.add_problem(f"line {lineno}: {problem}")

    def check_strict(self, lineno: int, raw: bytes) -> None:
        """Decode and parse one line strictly, then check it and word every problem (no fast path)."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.add_line_problem(
                lineno,
                f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8",
            )
            return
        if lineno == 1 and text.startswith("\ufeff"):
            self.add_line_problem(
                lineno, "starts with a UTF-8 byte-order mark; save the file as UTF-8 without BOM"
            )
            return
        try:
            line = _parse_line(text)
        except _DuplicateKey as exc:
            self.add_line_problem(
                lineno,
                f"duplicate key {_shown(exc.key)} in one JSON object; name each key once, so the line "
                "means one thing",
            )
            return
        except _NonFiniteNumber as exc:
            self.add_line_problem(
                lineno, f"{exc.name} is not valid JSON (kluster.ai refuses it); write a finite number or null"
            )
            return
        except ValueError as exc:
            detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            self.add_line_problem(lineno, f"invalid JSON ({detail})")
            return
        except RecursionError:
            self.add_line_problem(lineno, "invalid JSON (nested too deeply to read)")
            return
        self.check(lineno, line)

    def check_common(self, raw: bytes) -> bool:
        """Check a line of the common shape at C speed; ``True`` when it is that shape and has no problem.

        The common shape: one JSON object with exactly ``custom_id``, ``method``, ``url`` and ``body``; a body
        whose ``model`` is a string, whose ``messages`` are objects of exactly ``role`` and string ``content``,
        and whose other values are scalars. Anything else, and any line with a problem, gives ``False`` and is
        checked again, slowly and exactly, by :meth:`check_strict`, which words every problem.

        The line is parsed without the duplicate-key hook. A dropped duplicate key is found by counting
        instead: the text's quote characters are two per string literal (keys and string values) plus the
        escaped ones inside them. The parsed line's strings can only account for all of them when no key, and
        so no literal, was dropped (a ``\\u0022`` escape, a quote with no quote character, is left to the
        strict path).
        """
        try:
            text = raw.decode("utf-8")
            line, end = _PLAIN_SCAN(text, 0)
        except (StopIteration, ValueError, RecursionError):
            return False
        if end != len(text) and (end != len(text) - 1 or text[end] != "\n"):
            return False
        escaped = "\\" in text
        if escaped and "\\u0022" in text:
            return False
        if type(line) is not dict or len(line) != 4:
            return False
        custom_id = line.get("custom_id")
        body = line.get("body")
        if (
            type(custom_id) is not str
            or not custom_id
            or type(body) is not dict
            or line.get("method") != "POST"
            or line.get("url") != BATCH_URL
        ):
            return False
        model = body.get("model")
        messages = body.get("messages")
        if type(model) is not str or not model or type(messages) is not list or not messages:
            return False
        if self._known is not None and model not in self._known:
            return False
        if not _UNSUPPORTED.isdisjoint(body) or body.get("stream") is True:
            return False
        # String literals the parsed line accounts for: its keys and its string values. The line's four keys
        # and three strings are known, and each message is two keys and two strings.
        strings = 7 + len(body) + 4 * len(messages)
        quotes = 0  # quote characters inside them (escaped in the text)
        if escaped:
            quotes = custom_id.count('"')
        for message in messages:
            if type(message) is not dict or len(message) != 2:
                return False
            role = message.get("role")
            content = message.get("content")
            if type(content) is not str or type(role) is not str or role not in _ROLES:
                return False
            if escaped and '"' in content:
                quotes += content.count('"')
        rules = _BODY_PARAM_RULES
        for name, value in body.items():
            kind = type(value)
            if kind is str:
                strings += 1
                if escaped and '"' in value:
                    quotes += value.count('"')
            elif kind is list or kind is dict:
                if value is not messages:
                    return False
                continue
            elif value is None:
                continue
            rule = rules.get(name)
            if rule is not None and not rule[0](value):
                return False
        if escaped:
            quotes += sum(name.count('"') for name in body if '"' in name)
        if 2 * strings + quotes != text.count('"'):
            return False
        if self.check_duplicates:
            digest = _id_digest(custom_id)
            seen = self._seen
            if digest in seen:
                return False
            seen.add(digest)
        self.models.add(model)
        return True

    def check(self, lineno: int, line: Any) -> None:
        """Check one parsed request line."""
        if not isinstance(line, dict):
            self.add_line_problem(lineno, f"expected a JSON object, got {_type_name(line)}")
            return
        self.check_custom_id(lineno, line)
        self._check_method_and_url(lineno, line)
        body = line.get("body")
        if body is None:
            self.add_line_problem(lineno, "missing body (the chat completion request)")
        elif not isinstance(body, dict):
            self.add_line_problem(lineno, f"body must be a JSON object, got {_type_name(body)}")
        else:
            self._check_body(lineno, body)

    def check_custom_id(self, lineno: int, line: dict[str, Any]) -> None:
        """Check one line's ``custom_id``, duplicates included."""
        custom_id = line.get("custom_id")
        if custom_id is None:
            self.add_line_problem(lineno, "missing custom_id")
            return
        if not isinstance(custom_id, str) or not custom_id:
            self.add_line_problem(lineno, f"custom_id must be a non-empty string, got {_shown(custom_id)}")
            return
        if not self.check_duplicates:
            return
        digest = _id_digest(custom_id)
        if digest not in self._seen:
            self._seen.add(digest)
            return
        self.add_line_problem(lineno, f"duplicate custom_id {_shown(custom_id)}")
        if not self.truncated:
            self._duplicates[len(self.problems) - 1] = (digest, lineno, custom_id)

    def _check_method_and_url(self, lineno: int, line: dict[str, Any]) -> None:
        method = line.get("method")
        if method != "POST":
            got = "it is missing" if method is None else f"got {_shown(method)}"
            self.add_line_problem(lineno, f'method must be "POST", {got}')
        url = line.get("url")
        if url != BATCH_URL:
            got = "it is missing" if url is None else f"got {_shown(url)}"
            self.add_line_problem(
                lineno, f'url must be "{BATCH_URL}" (the only endpoint kluster.ai batches accept), {got}'
            )

    def _check_body(self, lineno: int, body: dict[str, Any]) -> None:
        self._check_model(lineno, body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            got = "it is missing" if messages is None else f"got {_shown(messages)}"
            self.add_line_problem(lineno, f"body.messages must be a non-empty list of messages, {got}")
        else:
            self._check_messages(lineno, messages)
        for name, value in body.items():
            rule = _BODY_PARAM_RULES.get(name)
            if rule is not None and value is not None and not rule[0](value):
                self.add_line_problem(lineno, f"body.{name} {body_param_problem(name, value)}")
        unsupported = [name for name in UNSUPPORTED_BODY_PARAMS if name in body]
        if unsupported:
            names = ", ".join(f"body.{name}" for name in unsupported)
            verb = "is" if len(unsupported) == 1 else "are"
            self.add_line_problem(lineno, f"{names} {verb} not supported by kluster.ai batch; remove it")
        if body.get("stream") is True:
            self.add_line_problem(lineno, "body.stream is true; batch requests cannot stream: remove it")

    def _check_messages(self, lineno: int, messages: list[Any]) -> None:
        for index, message in enumerate(messages):
            if type(message) is dict:  # the usual message, checked without a call
                role = message.get("role")
                if type(role) is str and role in _ROLES and type(message.get("content")) is str:
                    continue
            problem = _message_problem(message)
            if problem:
                self.add_line_problem(lineno, f"body.messages[{index}] {problem}")

    def _check_model(self, lineno: int, model: Any) -> None:
        if model is None:
            self.add_line_problem(lineno, "missing body.model")
            return
        if not isinstance(model, str) or not model:
            self.add_line_problem(lineno, f"body.model must be a non-empty string, got {_shown(model)}")
            return
        self.models.add(model)
        if self._known is not None and model not in self._known:
            self.add_line_problem(lineno, _unknown_model(model, self._known))

    def resolve_duplicates(self, source: Any) -> None:
        """Name, in each duplicate problem, the line where that ``custom_id`` first appeared."""
        if not self._duplicates:
            return
        wanted = {digest for digest, _, _ in self._duplicates.values()}
        first = _first_lines(source, wanted)
        for index, (digest, lineno, custom_id) in self._duplicates.items():
            if digest in first:
                self.problems[index] = (
                    f"line {lineno}: duplicate custom_id {_shown(custom_id)} (first used on line {first[digest]})"
                )


def _unknown_model(model: str, known: frozenset[str]) -> str:
    available = sorted(known)
    shown = ", ".join(available[:_LISTED_MODELS]) or "none"
    if len(available) > _LISTED_MODELS:
        shown += f", ... ({len(available) - _LISTED_MODELS} more)"
    return (
        f"model {_shown(model)} is not available on kluster.ai (available: {shown}); pass "
        "check_models=False to the operator to skip this check"
    )


def _first_lines(source: Any, wanted: set[int]) -> dict[int, int]:
    """Return, for each wanted ``custom_id`` digest, the first line of ``source`` holding that id."""
    found: dict[int, int] = {}
    with source.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            custom_id = _custom_id_of(raw)
            if custom_id is None:
                continue
            digest = _id_digest(custom_id)
            if digest in wanted and digest not in found:
                found[digest] = lineno
                if len(found) == len(wanted):
                    break
    return found


def _custom_id_of(raw: bytes | str) -> str | None:
    if not raw.strip():
        return None
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    custom_id = line.get("custom_id") if isinstance(line, dict) else None
    return custom_id if isinstance(custom_id, str) and custom_id else None


def iter_custom_ids(path: PathLike) -> Iterator[str]:
    """Yield the ``custom_id`` of every request in a request file, streamed, in file order.

    Lines without a usable ``custom_id`` (blank, invalid) are skipped: validate the file first.
    """
    with as_path(path).open("rb") as handle:
        yield from custom_ids_of_lines(handle)


def custom_ids_of_lines(lines: Iterable[bytes | str]) -> Iterator[str]:
    """Yield the ``custom_id`` of each request line (e.g. a request file streamed from kluster)."""
    for raw in lines:
        custom_id = _custom_id_of(raw)
        if custom_id is not None:
            yield custom_id


# -- building --------------------------------------------------------------------------------------------


def build_request_lines(
    requests: Iterable[str | Mapping[str, Any]],
    *,
    model: str | None = None,
    body_defaults: Mapping[str, Any] | None = None,
    custom_id_prefix: str = "request",
) -> Iterator[dict[str, Any]]:
    """Turn prompts, chat bodies or batch lines into complete batch lines, one at a time.

    Each item may be a full batch line (a mapping with ``body``), a chat body (a mapping with ``messages``;
    a ``custom_id`` key in it is moved to the line), or a prompt string (sent as one user message). Missing
    ``method``, ``url``, ``body.model`` (from ``model``) and body keys from ``body_defaults`` are filled in;
    nothing an item sets is overridden. An item without ``custom_id`` gets ``f"{custom_id_prefix}-{index}"``
    (0-based position), so the same list always yields the same ids.

    :param requests: The items, consumed lazily.
    :param model: Model for items that name none.
    :param body_defaults: Chat parameters for items that do not set them, e.g. ``{"temperature": 0.2}``.
    :param custom_id_prefix: Prefix of generated ids.
    :raises KlusterRequestFileError: An item is of no known form or ends up with no model.
    """
    for line, _ in _built_lines(requests, model, body_defaults, custom_id_prefix):
        yield line


def _built_lines(
    requests: Iterable[str | Mapping[str, Any]],
    model: str | None,
    body_defaults: Mapping[str, Any] | None,
    custom_id_prefix: str,
) -> Iterator[tuple[dict[str, Any], bool]]:
    """:func:`build_request_lines`, each line with whether it was built from a prompt string.

    Every line built from a prompt has the same shape and the same body apart from its content, so a writer
    that checked one of them fully need only check the ids of the others.
    """
    # What a body gets filled with, as setdefault of the model and then of each default would fill it.
    fill: dict[str, Any] = {} if model is None else {"model": model}
    for key, value in (body_defaults or {}).items():
        fill.setdefault(key, value)
    prompt_fill = {key: value for key, value in fill.items() if key != "messages"}
    for index, item in enumerate(requests):
        if type(item) is str:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": item}]}
            body.update(prompt_fill)
            line: dict[str, Any] = {"custom_id": None, "method": "POST", "url": BATCH_URL, "body": body}
            prompt = True
        else:
            line = _line_of(index, item)
            body = line["body"]
            for key, value in fill.items():
                body.setdefault(key, value)
            prompt = False
        if not body.get("model"):
            message = (
                f"Request item {index} has no model: set body.model in it, or pass model= for every item."
            )
            raise KlusterRequestFileError(message, [message])
        if line.get("custom_id") is None:
            line["custom_id"] = f"{custom_id_prefix}-{index}"
        yield line, prompt


def _line_of(index: int, item: Any) -> dict[str, Any]:
    """Return a fresh batch line (with its own body dict) for one item; never mutate the item."""
    if isinstance(item, str):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": item}]}
        return {"custom_id": None, "method": "POST", "url": BATCH_URL, "body": body}
    if isinstance(item, Mapping) and "body" in item:
        if not isinstance(item["body"], Mapping):
            message = f"Request item {index}: body must be a mapping, got {type(item['body']).__name__}."
            raise KlusterRequestFileError(message, [message])
        line = dict(item)
        line["body"] = dict(item["body"])
        line.setdefault("method", "POST")
        line.setdefault("url", BATCH_URL)
        return line
    if isinstance(item, Mapping) and "messages" in item:
        body = dict(item)
        custom_id = body.pop("custom_id", None)
        return {"custom_id": custom_id, "method": "POST", "url": BATCH_URL, "body": body}
    message = (
        f"Request item {index} is {_shown(item) if isinstance(item, Mapping) else type(item).__name__}: "
        "expected a prompt string, a chat body with 'messages', or a batch line with 'body'."
    )
    raise KlusterRequestFileError(message, [message])


def write_request_file(
    requests: Iterable[str | Mapping[str, Any]],
    path: PathLike,
    *,
    model: str | None = None,
    body_defaults: Mapping[str, Any] | None = None,
    custom_id_prefix: str = "request",
    max_errors: int = 20,
) -> RequestFileSummary:
    """Write requests as a batch request file, streamed and atomically; validate and summarise it.

    Lines are built with :func:`build_request_lines`, checked as they are written (same checks as
    :func:`validate_request_file`, without plan limits or a model list), hashed on the way, and written as
    compact UTF-8 JSON to a temporary sibling that is renamed onto ``path`` only when every line is valid.
    Nothing is left at ``path`` (or beside it) when building or checking fails.

    :param requests: Prompt strings, chat bodies or batch lines (see :func:`build_request_lines`).
    :param path: Local path, URI or ObjectStoragePath to write.
    :param model: Model for items that name none.
    :param body_defaults: Chat parameters for items that do not set them.
    :param custom_id_prefix: Prefix of generated ids.
    :param max_errors: Stop collecting problems after this many.
    :raises KlusterRequestFileError: An item is invalid (e.g. duplicate ``custom_id``); nothing was written.
    :return: The written file's summary.
    """
    dest = as_path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    checker = _LineChecker(known_models=None, max_errors=max_errors)
    digest = hashlib.sha256()
    size = count = 0
    lines = _built_lines(requests, model, body_defaults, custom_id_prefix)
    prompts_checked = False  # one prompt line passed every check: the others differ only in content and id
    try:
        with tmp.open("wb") as out:
            for count, (line, prompt) in enumerate(lines, start=1):
                if prompt and prompts_checked:
                    checker.check_custom_id(count, line)
                else:
                    problems = len(checker.problems)
                    checker.check(count, line)
                    if prompt:
                        prompts_checked = len(checker.problems) == problems and not checker.truncated
                data = _encode_line(checker, count, line)
                if data is not None:
                    out.write(data)
                    digest.update(data)
                    size += len(data)
                if checker.truncated:
                    break
        if count == 0:
            message = f"No requests to write to {dest}; nothing was written."
            raise KlusterRequestFileError(message, [message])
        if checker.problems:
            checker.resolve_duplicates(tmp)
            _raise_write_problems(dest, checker)
        move_into_place(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
    log.info("Wrote %d requests (%d bytes) to %s", count, size, dest)
    return RequestFileSummary(
        path=str(dest),
        requests=count,
        bytes=size,
        sha256=digest.hexdigest(),
        models=tuple(sorted(checker.models)),
    )


def _encode_line(checker: _LineChecker, lineno: int, line: dict[str, Any]) -> bytes | None:
    """Return a built line as compact UTF-8 JSON with its newline; ``None`` (a problem noted) if JSON cannot carry it."""
    try:
        return (_ENCODER.encode(line) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        problem = f"holds text that cannot be written as UTF-8 ({exc.reason})"
    except ValueError as exc:
        problem = (
            "holds NaN or Infinity, which is not valid JSON (kluster.ai refuses it); use a finite number or None"
            if "Out of range float" in str(exc)
            else f"cannot be written as JSON ({exc})"
        )
    except (TypeError, RecursionError) as exc:
        problem = f"cannot be written as JSON ({exc})"
    checker.add_line_problem(lineno, problem)
    return None


def _raise_write_problems(dest: Any, checker: _LineChecker) -> None:
    problems = checker.problems
    count = f"more than {len(problems)} problems" if checker.truncated else _plural(len(problems), "problem")
    lines = [f"Request file {dest} would have {count} (line n holds request item n-1); nothing was written:"]
    lines.extend(f"  {problem}" for problem in problems)
    if checker.truncated:
        lines.append("  ...and more")
    raise KlusterRequestFileError("\n".join(lines), problems)
