"""Table-driven tests of the parameter checks: boundary values pass, one step past them is refused in a sentence."""

from __future__ import annotations

import datetime as dt
import math
import pathlib

import pytest

from airflow_provider_kluster.batches import COMPLETION_WINDOWS, KLUSTER_METADATA_KEY
from airflow_provider_kluster.exceptions import KlusterConfigError
from airflow_provider_kluster.parameters import (
    METADATA_MAX_KEY_CHARS,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    PROVIDER_METADATA_KEYS,
    build_metadata,
    check_arguments,
    check_kluster_options,
    check_positive_number,
)
from airflow_provider_kluster.reattach import FINGERPRINT_KEY, IDENTITY_KEY, MAX_TRIES_KEY

ACCEPTED = [
    ("input_file", "requests.jsonl"),
    ("input_file", pathlib.Path("requests.jsonl")),
    ("input_file", None),
    ("input_file_id", "file-abc"),
    ("input_file_id", "f" * 256),
    ("input_file_id", None),
    ("requests", ["hi"]),
    ("requests", ("hi",)),
    ("requests", []),
    ("requests", None),
    ("model", "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"),
    ("model", None),
    ("max_completion_tokens", 1),
    ("max_completion_tokens", 131_072),
    ("max_completion_tokens", None),
    ("body_defaults", None),
    ("body_defaults", {}),
    ("body_defaults", {"temperature": 0.2, "max_tokens": 100, "top_p": 1, "stop": ["\n"], "seed": None}),
    ("body_defaults", {"min_p": 0, "repetition_penalty": 0, "logprobs": False, "future_parameter": "x"}),
    ("max_requests", 1),
    ("max_requests", None),
    ("reattach_scan_limit", 1),
    ("on_changed_input", "resubmit"),
    ("on_changed_input", "fail"),
    *[("completion_window", window) for window in ("24h", "48h", "72h", "asap")],
    ("batch_id", "67533f6d1d7be1b5a7507be5"),
    ("poll_interval", 0.01),
    ("poll_interval", 60),
    ("timeout", 0.5),
    ("timeout", None),
    ("max_consecutive_errors", 0),
    ("max_consecutive_errors", 5),
    ("destination", "results"),  # only the value is checked; nothing is written
    ("destination", pathlib.Path("results")),
    ("max_failed_ratio", 0),
    ("max_failed_ratio", 0.0),
    ("max_failed_ratio", 1),
    ("max_failed_ratio", None),
    ("return_records", 0),
    ("return_records", 10),
    *[
        (name, value)
        for name in (
            "wait_for_completion",
            "wait_for_cancellation",
            "deferrable",
            "cancel_on_kill",
            "check_models",
            "reattach",
            "allow_unfinished",
        )
        for value in (True, False)
    ],
]

REFUSED = [
    ("input_file", "", "input_file must be the path or URI"),
    ("input_file", "   ", "input_file"),
    ("input_file", 42, "input_file"),
    ("input_file_id", "", "input_file_id must be a non-empty string of at most 256"),
    ("input_file_id", " ", "input_file_id"),
    ("input_file_id", "f" * 257, "at most 256"),
    ("input_file_id", 7, "input_file_id"),
    ("requests", "What is 2+2?", "requests must be a list"),
    ("requests", {"messages": []}, "requests must be a list"),
    ("model", "", "model must be a non-empty string"),
    ("model", 3, "model"),
    ("max_completion_tokens", 0, "max_completion_tokens must be a whole number greater than 0"),
    ("max_completion_tokens", -5, "got -5"),
    ("max_completion_tokens", "100", "got the string '100'"),
    ("max_completion_tokens", 10.0, "max_completion_tokens"),
    ("max_completion_tokens", True, "True (a boolean)"),
    ("body_defaults", "temperature=0", "body_defaults must be a dict"),
    ("body_defaults", {"max_tokens": 0}, "body_defaults['max_tokens'] must be a whole number of at least 1"),
    ("body_defaults", {"max_completion_tokens": "5"}, "body_defaults['max_completion_tokens']"),
    ("body_defaults", {"temperature": "hot"}, "body_defaults['temperature'] must be a number"),
    ("body_defaults", {"logprobs": "yes"}, "body_defaults['logprobs'] must be a boolean"),
    ("body_defaults", {"min_p": 1.5}, "from 0 to 1"),
    ("body_defaults", {"n": 2}, "body_defaults['n'] is a chat parameter kluster.ai batches do not support"),
    ("body_defaults", {"stream": True}, "cannot stream"),
    ("body_defaults", {1: 2}, "body_defaults key"),
    ("max_requests", 0, "max_requests"),
    ("max_requests", "1000", "max_requests"),
    ("reattach_scan_limit", 0, "reattach_scan_limit"),
    ("reattach_scan_limit", None, "reattach_scan_limit"),
    ("on_changed_input", "ignore", "on_changed_input must be one of resubmit, fail"),
    ("completion_window", "2h", "completion_window must be one of 24h, 48h, 72h, asap"),
    ("completion_window", "ASAP", "completion_window"),
    ("completion_window", "", "the empty string"),
    ("completion_window", None, "completion_window"),
    ("batch_id", "", "batch_id is empty"),
    ("batch_id", None, "batch_id"),
    ("poll_interval", 0, "poll_interval must be a number of seconds greater than 0"),
    ("poll_interval", -1, "got -1"),
    ("poll_interval", math.nan, "poll_interval"),
    ("poll_interval", math.inf, "poll_interval"),
    ("poll_interval", "60", "poll_interval"),
    ("poll_interval", None, "poll_interval"),
    ("timeout", 0, "timeout must be a number of seconds (or a timedelta) greater than 0, or None"),
    ("timeout", -5.0, "got -5.0"),
    ("timeout", math.inf, "timeout"),
    ("max_consecutive_errors", -1, "max_consecutive_errors must be a whole number of at least 0"),
    ("max_consecutive_errors", 2.5, "max_consecutive_errors"),
    ("destination", "", "destination"),
    ("destination", None, "destination"),
    ("max_failed_ratio", 1.5, "max_failed_ratio must be a number from 0.0 to 1.0"),
    ("max_failed_ratio", -0.1, "max_failed_ratio"),
    ("max_failed_ratio", "0.1", "max_failed_ratio"),
    ("return_records", -1, "return_records must be a whole number of at least 0"),
    ("return_records", None, "return_records"),
    ("wait_for_completion", "yes", "wait_for_completion must be True or False; got the string 'yes'"),
    ("deferrable", "false", "deferrable"),
    ("cancel_on_kill", 1, "cancel_on_kill"),
    ("check_models", None, "check_models"),
    ("reattach", "True", "reattach"),
    ("allow_unfinished", 0, "allow_unfinished"),
    ("wait_for_cancellation", "no", "wait_for_cancellation"),
]


def _id(case: tuple) -> str:
    return f"{case[0]}={case[1]!r}"[:60]


@pytest.mark.parametrize(("name", "value"), ACCEPTED, ids=[_id(c) for c in ACCEPTED])
def test_accepted(name, value):
    check_arguments(**{name: value})


@pytest.mark.parametrize(("name", "value", "fragment"), REFUSED, ids=[_id(c) for c in REFUSED])
def test_refused_in_one_sentence_naming_the_parameter(name, value, fragment):
    with pytest.raises(KlusterConfigError) as info:
        check_arguments(**{name: value})
    message = str(info.value)
    assert fragment in message
    assert name in message
    assert message.endswith(".")
    assert "\n" not in message


def test_every_switch_and_number_has_a_rule():
    """The rule table covers each name the operators pass; a typo is a programming error, not a config one."""
    with pytest.raises(TypeError, match="no rule for 'pol_interval'"):
        check_arguments(pol_interval=1)


def test_cancel_timeout_has_no_none():
    check_positive_number("timeout", 900.0, unit="seconds")
    with pytest.raises(
        KlusterConfigError, match=r"^timeout must be a number of seconds greater than 0; got None\.$"
    ):
        check_positive_number("timeout", None, unit="seconds")


def test_every_completion_window_of_the_schema_is_accepted():
    assert set(COMPLETION_WINDOWS) == {"asap", "24h", "48h", "72h"}


# -- metadata --------------------------------------------------------------------------------------------


def keys(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


LIMIT_WITH_PROVIDER_KEYS = METADATA_MAX_KEYS - len(PROVIDER_METADATA_KEYS)


@pytest.mark.parametrize(
    ("metadata", "options"),
    [
        (None, None),
        ({}, {}),
        (keys(LIMIT_WITH_PROVIDER_KEYS), None),
        (keys(LIMIT_WITH_PROVIDER_KEYS - 1), {"greedy": True}),
        ({**keys(LIMIT_WITH_PROVIDER_KEYS - 1), KLUSTER_METADATA_KEY: {"greedy": False}}, None),
        ({"k" * METADATA_MAX_KEY_CHARS: "v" * METADATA_MAX_VALUE_CHARS}, None),
        ({"": ""}, None),
    ],
    ids=[
        "none",
        "empty",
        "16-keys-with-the-provider's",
        "16-keys-with-options-and-the-provider's",
        "16-keys-with-own-kluster-key",
        "longest-key-and-value",
        "empty-key-and-value",
    ],
)
def test_metadata_at_the_limits_is_accepted(metadata, options):
    merged = build_metadata(metadata, options, reserved_keys=PROVIDER_METADATA_KEYS)
    assert len(merged) + len(PROVIDER_METADATA_KEYS) <= METADATA_MAX_KEYS


@pytest.mark.parametrize(
    ("metadata", "options", "fragment"),
    [
        (
            "a=b",
            None,
            "metadata must be a dict of string keys to string values, or None; got the string 'a=b'.",
        ),
        (["a", "b"], None, "metadata must be a dict"),
        (keys(LIMIT_WITH_PROVIDER_KEYS + 1), None, "metadata would have 17 keys"),
        (
            keys(LIMIT_WITH_PROVIDER_KEYS),
            {"greedy": True},
            "metadata would have 17 keys (13 in metadata + '@kluster.ai' for kluster_options + the provider's own "
            "airflow_task_identity, airflow_input_fingerprint, airflow_max_tries), over kluster.ai's limit of 16; "
            "remove 1.",
        ),
        (
            {"k" * (METADATA_MAX_KEY_CHARS + 1): "v"},
            None,
            "is 65 characters long; kluster.ai allows keys of at most 64",
        ),
        ({"team": "v" * (METADATA_MAX_VALUE_CHARS + 1)}, None, "metadata['team'] is 513 characters long"),
        ({"n": 1}, None, "metadata['n'] must be a string"),
        ({"flag": True}, None, "metadata['flag'] must be a string"),
        ({"none": None}, None, "metadata['none'] must be a string"),
        ({3: "x"}, None, "Every metadata key must be a string"),
        ({IDENTITY_KEY: "x"}, None, f"metadata key {IDENTITY_KEY!r} is set by the provider itself"),
        ({FINGERPRINT_KEY: "x"}, None, FINGERPRINT_KEY),
        (
            {KLUSTER_METADATA_KEY: {"greedy": "no"}},
            None,
            "metadata['@kluster.ai']['greedy'] must be True or False",
        ),
        ({KLUSTER_METADATA_KEY: "greedy"}, None, "metadata['@kluster.ai'] must be a dict"),
        (
            None,
            {"greedy": "false"},
            "kluster_options['greedy'] must be True or False; got the string 'false'.",
        ),
        (None, {"greedy": 1}, "kluster_options['greedy']"),
        (None, {"turbo": True}, "Unknown kluster_options key 'turbo'"),
        (None, "greedy", "kluster_options must be a dict"),
    ],
    ids=[
        "a-string",
        "a-list",
        "17-keys-with-the-provider's",
        "17-keys-with-options",
        "key-too-long",
        "value-too-long",
        "number-value",
        "boolean-value",
        "null-value",
        "number-key",
        "identity-key",
        "fingerprint-key",
        "kluster-option-string",
        "kluster-key-not-a-dict",
        "option-string-false",
        "option-number",
        "unknown-option",
        "options-not-a-dict",
    ],
)
def test_metadata_past_the_limits_is_refused(metadata, options, fragment):
    with pytest.raises(KlusterConfigError) as info:
        build_metadata(metadata, options, reserved_keys=PROVIDER_METADATA_KEYS)
    assert fragment in str(info.value)


def test_options_keep_their_booleans():
    assert check_kluster_options({"greedy": False, "strict_completion_window": True}) == {
        "greedy": False,
        "strict_completion_window": True,
    }
    assert check_kluster_options(None) == {}


def test_build_metadata_checks_what_the_hook_sends():
    """The hook's path: the provider keys are already in the metadata, so they count and are not refused."""
    sent = build_metadata(
        {**keys(LIMIT_WITH_PROVIDER_KEYS - 1), IDENTITY_KEY: "i", FINGERPRINT_KEY: "f", MAX_TRIES_KEY: "0"},
        {"greedy": True},
    )
    assert len(sent) == METADATA_MAX_KEYS
    assert sent[KLUSTER_METADATA_KEY] == {"greedy": True}
    with pytest.raises(KlusterConfigError, match="over kluster.ai's limit of 16"):
        build_metadata(keys(METADATA_MAX_KEYS), {"greedy": True})
    with pytest.raises(KlusterConfigError, match="Unknown kluster_options"):
        build_metadata(None, {"fast": True})


def test_timedelta_timeouts_are_checked_in_seconds():
    """The submit operator converts a timedelta to seconds in __init__; the check sees those seconds."""
    check_arguments(timeout=dt.timedelta(minutes=5).total_seconds())
    with pytest.raises(KlusterConfigError, match="got -60.0"):
        check_arguments(timeout=dt.timedelta(minutes=-1).total_seconds())
