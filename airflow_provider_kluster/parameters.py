"""Check every operator and hook parameter before anything is sent, each refusal one sentence.

Each check names the parameter, says what is allowed and shows what it got, and raises
:class:`~airflow_provider_kluster.exceptions.KlusterConfigError`. What is refused is what kluster.ai's server
refuses, and no more: its batch request schema (completion windows ``24h``, ``48h``, ``72h`` and ``asap``;
boolean batch options; an ``input_file_id`` of 1 to 256 characters) and the batch metadata limits of the OpenAI
batch API it follows (at most 16 keys — ``@kluster.ai`` and the provider's own two included — keys of at most
64 characters, values strings of at most 512). Numbers the provider itself uses (``poll_interval``,
``timeout``, …) must make sense: positive, finite, whole where counted.

Nothing here talks to kluster.ai: operators call :func:`check_arguments` at the start of ``execute``, after
templates are rendered, so a bad value fails the task before any upload or batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

from airflow_provider_kluster.batches import COMPLETION_WINDOWS, KLUSTER_METADATA_KEY, KLUSTER_OPTIONS
from airflow_provider_kluster.exceptions import KlusterConfigError
from airflow_provider_kluster.reattach import FINGERPRINT_KEY, IDENTITY_KEY, MAX_TRIES_KEY, ON_CHANGED_INPUT
from airflow_provider_kluster.request_files import UNSUPPORTED_BODY_PARAMS, body_param_problem

#: Most metadata keys kluster.ai keeps on a batch, ``@kluster.ai`` and the provider's own keys included.
METADATA_MAX_KEYS = 16
#: Longest metadata key, in characters.
METADATA_MAX_KEY_CHARS = 64
#: Longest metadata value, in characters.
METADATA_MAX_VALUE_CHARS = 512
#: Metadata keys the submit operator adds to every batch (it finds an earlier try's batch by them).
PROVIDER_METADATA_KEYS = (IDENTITY_KEY, FINGERPRINT_KEY, MAX_TRIES_KEY)
#: Longest ``input_file_id`` kluster.ai accepts.
MAX_FILE_ID_CHARS = 256

_SHOWN_CHARS = 60


def _got(value: Any) -> str:
    """Describe a value for a message: its kind where the repr alone would mislead (``'5'`` vs ``5``)."""
    if isinstance(value, bool):
        return f"{value!r} (a boolean)"
    if isinstance(value, str):
        text = repr(value) if len(value) <= _SHOWN_CHARS else f"{value[:_SHOWN_CHARS]!r}..."
        return f"the string {text}" if value.strip() else f"the empty string {text}"
    if value is None or isinstance(value, (int, float)):
        return repr(value)
    text = repr(value)
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return f"a {type(value).__name__} ({text})"


def _refuse(name: str, allowed: str, value: Any) -> KlusterConfigError:
    return KlusterConfigError(f"{name} must be {allowed}; got {_got(value)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _or_none(allowed: str, none_means: str | None) -> str:
    return allowed if none_means is None else f"{allowed}, or None {none_means}"


# -- single values ---------------------------------------------------------------------------------------


def check_bool(name: str, value: Any) -> None:
    """Refuse anything but ``True`` or ``False`` (a string ``"false"`` would be read as true)."""
    if not isinstance(value, bool):
        raise _refuse(name, "True or False", value)


def check_positive_number(name: str, value: Any, *, unit: str = "", none_means: str | None = None) -> None:
    """Refuse anything but a finite number greater than 0 (``None`` too, unless ``none_means`` says what it does)."""
    if value is None and none_means is not None:
        return
    if not _is_number(value) or value <= 0:
        allowed = f"a number{f' of {unit}' if unit else ''} greater than 0"
        raise _refuse(name, _or_none(allowed, none_means), value)


def check_timeout(name: str, seconds: Any) -> None:
    """Refuse a wait limit that is not a positive number of seconds or ``None`` (no limit)."""
    check_positive_number(
        name, seconds, unit="seconds (or a timedelta)", none_means="to wait without a limit"
    )


def check_int(name: str, value: Any, *, minimum: int = 1, none_means: str | None = None) -> None:
    """Refuse anything but a whole number of at least ``minimum`` (``None`` too, unless ``none_means``)."""
    if value is None and none_means is not None:
        return
    if not _is_int(value) or value < minimum:
        allowed = "a whole number greater than 0" if minimum == 1 else f"a whole number of at least {minimum}"
        raise _refuse(name, _or_none(allowed, none_means), value)


def check_ratio(name: str, value: Any, *, none_means: str | None = None) -> None:
    """Refuse anything but a number from 0 to 1 (``None`` too, unless ``none_means``)."""
    if value is None and none_means is not None:
        return
    if not _is_number(value) or not 0 <= value <= 1:
        raise _refuse(name, _or_none("a number from 0.0 to 1.0", none_means), value)


def check_non_empty_string(
    name: str, value: Any, *, what: str = "", none_means: str | None = None, max_chars: int | None = None
) -> None:
    """Refuse anything but a string with more than blanks in it, of at most ``max_chars``."""
    if value is None and none_means is not None:
        return
    allowed = f"a non-empty string{f' ({what})' if what else ''}"
    if max_chars is not None:
        allowed = f"a non-empty string of at most {max_chars} characters{f' ({what})' if what else ''}"
    if not isinstance(value, str) or not value.strip() or (max_chars is not None and len(value) > max_chars):
        raise _refuse(name, _or_none(allowed, none_means), value)


def check_batch_id(name: str, value: Any) -> None:
    """Refuse an empty batch id, saying the usual cause: an upstream submit task that returned none."""
    if isinstance(value, str) and value.strip():
        return
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        raise KlusterConfigError(
            f"{name} is empty: the task it comes from returned no batch id. A submit task marked success (or "
            "skipped) by hand before its batch finished returns none; pull the id it pushes before any wait "
            "instead: \"{{ ti.xcom_pull(task_ids='<submit task>', key='batch_id') }}\"."
        )
    check_non_empty_string(name, value, what="the id of a submitted batch")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """Refuse a value that is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise _refuse(name, f"one of {', '.join(choices)}", value)


def check_input_file(value: Any) -> None:
    """Refuse an empty path (it would name the working directory); ``None`` is fine (another input is used)."""
    if isinstance(value, str):
        if not value.strip():
            raise _refuse("input_file", "the path or URI of a JSONL request file", value)
    elif value is not None and not hasattr(value, "__fspath__") and not hasattr(value, "fs"):
        raise _refuse("input_file", "a path, URI or ObjectStoragePath of a JSONL request file", value)


def check_requests(value: Any) -> None:
    """Refuse ``requests`` that is not a list (or ``None``)."""
    if value is not None and not isinstance(value, (list, tuple)):
        raise KlusterConfigError(
            "requests must be a list (of batch lines, chat bodies or prompts), "
            f"got {type(value).__name__}; a single prompt goes in a list too."
        )


def check_destination(value: Any) -> None:
    """Refuse a missing or empty results destination."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _refuse("destination", "a directory, URI or ObjectStoragePath to write the results to", value)


def check_body_defaults(value: Any) -> None:
    """Refuse ``body_defaults`` that is not a dict of chat parameters kluster.ai accepts (``None`` is fine)."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise _refuse(
            "body_defaults", "a dict of chat parameters (e.g. {'temperature': 0.2}), or None", value
        )
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise _refuse("Every body_defaults key", "a parameter name (a non-empty string)", key)
        if key in UNSUPPORTED_BODY_PARAMS:
            raise KlusterConfigError(
                f"body_defaults[{key!r}] is a chat parameter kluster.ai batches do not support; remove it."
            )
        problem = body_param_problem(key, item, null="None")
        if problem:
            raise KlusterConfigError(f"body_defaults[{key!r}] {problem}.")
    if value.get("stream") is True:
        raise KlusterConfigError("body_defaults['stream'] is True; batch requests cannot stream: remove it.")


# -- batch options and metadata ----------------------------------------------------------------------------


def check_kluster_options(options: Any, *, name: str = "kluster_options") -> dict[str, bool]:
    """Check kluster's own batch options and return them as a dict: known names only, values ``True``/``False``.

    :raises KlusterConfigError: Not a dict, an unknown option, or a value that is not a boolean (``"false"``
        would otherwise be sent as ``True``).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise _refuse(
            name, f"a dict of kluster.ai batch options ({_option_list()}) to True or False", options
        )
    for key, value in options.items():
        if key not in KLUSTER_OPTIONS:
            raise KlusterConfigError(
                f"Unknown {name} key {key!r}: kluster.ai's batch options are {_option_list()}."
            )
        if not isinstance(value, bool):
            raise _refuse(f"{name}[{key!r}]", "True or False", value)
    return dict(options)


def _option_list() -> str:
    return ", ".join(sorted(KLUSTER_OPTIONS))


def build_metadata(
    metadata: Any,
    kluster_options: Any = None,
    *,
    reserved_keys: Collection[str] = (),
) -> dict[str, Any]:
    """Check batch metadata as it will be sent and return it merged with ``kluster_options`` (``@kluster.ai``).

    Keys are strings of at most :data:`METADATA_MAX_KEY_CHARS`, values strings of at most
    :data:`METADATA_MAX_VALUE_CHARS`; ``@kluster.ai`` (kluster's own options) holds an options dict. At most
    :data:`METADATA_MAX_KEYS` keys in all: the user's, ``@kluster.ai`` when options are given, and
    ``reserved_keys`` — keys the caller adds afterwards, which the user's metadata may not set.

    :raises KlusterConfigError: The first problem, in one sentence naming the key.
    """
    if metadata is None:
        merged: dict[str, Any] = {}
    elif isinstance(metadata, Mapping):
        merged = dict(metadata)
    else:
        raise _refuse("metadata", "a dict of string keys to string values, or None", metadata)
    for key, value in merged.items():
        if not isinstance(key, str):
            raise _refuse("Every metadata key", "a string", key)
        if len(key) > METADATA_MAX_KEY_CHARS:
            raise KlusterConfigError(
                f"metadata key {key[:_SHOWN_CHARS]!r}... is {len(key)} characters long; kluster.ai allows "
                f"keys of at most {METADATA_MAX_KEY_CHARS}."
            )
        if key in reserved_keys:
            raise KlusterConfigError(
                f"metadata key {key!r} is set by the provider itself (it finds an earlier try's batch by it); "
                "use another key."
            )
        if key == KLUSTER_METADATA_KEY:
            check_kluster_options(value, name=f"metadata[{KLUSTER_METADATA_KEY!r}]")
        elif not isinstance(value, str):
            raise _refuse(f"metadata[{key!r}]", "a string (convert numbers and the like with str())", value)
        elif len(value) > METADATA_MAX_VALUE_CHARS:
            raise KlusterConfigError(
                f"metadata[{key!r}] is {len(value)} characters long; kluster.ai allows values of at most "
                f"{METADATA_MAX_VALUE_CHARS}."
            )
    options = check_kluster_options(kluster_options)
    pieces = [f"{len(merged)} in metadata"]
    if options and KLUSTER_METADATA_KEY not in merged:
        pieces.append(f"{KLUSTER_METADATA_KEY!r} for kluster_options")
    if options:
        merged[KLUSTER_METADATA_KEY] = options
    added = [key for key in reserved_keys if key not in merged]
    if added:
        pieces.append(f"the provider's own {', '.join(added)}")
    total = len(merged) + len(added)
    if total > METADATA_MAX_KEYS:
        raise KlusterConfigError(
            f"metadata would have {total} keys ({' + '.join(pieces)}), over kluster.ai's limit of "
            f"{METADATA_MAX_KEYS}; remove {total - METADATA_MAX_KEYS}."
        )
    return merged


# -- operator arguments, by name -------------------------------------------------------------------------


_RULES: dict[str, Callable[[str, Any], None]] = {
    # inputs
    "input_file": lambda _, v: check_input_file(v),
    "input_file_id": lambda n, v: check_non_empty_string(
        n,
        v,
        what="the id of an uploaded file",
        none_means="to use input_file or requests",
        max_chars=MAX_FILE_ID_CHARS,
    ),
    "requests": lambda _, v: check_requests(v),
    "model": lambda n, v: check_non_empty_string(
        n, v, what="a model id", none_means="when every request names one"
    ),
    "max_completion_tokens": lambda n, v: check_int(n, v, none_means="for each model's default"),
    "body_defaults": lambda _, v: check_body_defaults(v),
    "max_requests": lambda n, v: check_int(n, v, none_means="for no limit"),
    "reattach_scan_limit": lambda n, v: check_int(n, v),
    "on_changed_input": lambda n, v: check_choice(n, v, ON_CHANGED_INPUT),
    # the batch
    "completion_window": lambda n, v: check_choice(n, v, COMPLETION_WINDOWS),
    "batch_id": lambda n, v: check_batch_id(n, v),
    # waiting
    "poll_interval": lambda n, v: check_positive_number(n, v, unit="seconds"),
    "timeout": check_timeout,
    "max_consecutive_errors": lambda n, v: check_int(n, v, minimum=0),
    # results
    "destination": lambda _, v: check_destination(v),
    "max_failed_ratio": lambda n, v: check_ratio(n, v, none_means="to never fail on failed requests"),
    "return_records": lambda n, v: check_int(n, v, minimum=0),
    # whole jobs
    "max_file_bytes": lambda n, v: check_int(n, v, minimum=1024, none_means="for no limit"),
    "max_concurrent_batches": lambda n, v: check_int(n, v, none_means="for no limit"),
    "multipart_threshold": lambda n, v: check_int(n, v, none_means="to upload every file in one request"),
    "max_attempts": lambda n, v: check_int(n, v),
    "stall_timeout": lambda n, v: check_positive_number(
        n, v, unit="seconds", none_means="to never give up on a stalled batch"
    ),
    "max_cost": lambda n, v: check_positive_number(n, v, unit="USD", none_means="for no budget"),
    "default_completion_tokens": lambda n, v: check_int(n, v),
    # switches
    **{
        name: check_bool
        for name in (
            "wait_for_completion",
            "wait_for_cancellation",
            "deferrable",
            "cancel_on_kill",
            "cancel_on_mark_success",
            "check_models",
            "reattach",
            "allow_unfinished",
        )
    },
}


def check_arguments(**arguments: Any) -> None:
    """Check operator arguments by their parameter names, in the order given; raise on the first bad one.

    ``timeout`` is in seconds (a timedelta already converted) and may be ``None``. Every name must be one this
    module knows (a typo is a programming error: ``TypeError``).

    :raises KlusterConfigError: One sentence naming the parameter, what is allowed and what it got.
    """
    for name, value in arguments.items():
        rule = _RULES.get(name)
        if rule is None:
            raise TypeError(f"check_arguments() has no rule for {name!r}")
        rule(name, value)
