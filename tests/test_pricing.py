"""Table-driven tests of prices, token estimates, cost estimates and the budget check: pure, no HTTP."""

from __future__ import annotations

import json
import logging
import math

import pytest

from airflow_provider_kluster.exceptions import KlusterBudgetError, KlusterConfigError, KlusterError
from airflow_provider_kluster.pricing import (
    ANY_WINDOW,
    CHARS_PER_TOKEN,
    DEFAULT_COMPLETION_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    NO_MODEL,
    NON_TEXT_PART_TOKENS,
    PRICE_UNIT,
    CostEstimator,
    Estimate,
    Price,
    actual_cost,
    check_budget,
    completion_tokens_of,
    estimate_prompt_tokens,
    format_usd,
    merge_tables,
    price_for,
    price_table_from_user,
    prices_from_models,
)

LLAMA = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"


def _window(input_price, output_price):
    return {"input": input_price, "output": output_price}


# Shaped as the `GET /v1/models?extended=true` response schema in kluster's OpenAPI file
# (/work/shared/kluster-api/openapi.json, `paths./v1/models.get.responses.200`, first `anyOf` item): model fields
# and the `pricing` object with `realtime`, `asynchronous.{asap,1h,3h,6h,12h,24h,48h,72h}` and
# `fineTunedRealtime`, each `{input, output}` "Cost per input/output token in USD" (the schema's examples are
# 0.0004 and 0.0008). Model ids are from examples/models_list.response.json; the other prices are made up.
EXTENDED_MODELS = {
    "object": "list",
    "data": [
        {
            "id": "model_abc123",
            "internal_model_id": "internal_model_xyz789",
            "object": "model",
            "created": 1711234567,
            "release_date": 1711234567,
            "model_size": "8b",
            "owned_by": "org_456def",
            "reasoning_model": "yes",
            "tools_supported": False,
            "name": "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo",
            "description": "A lightweight, fast language model optimized for chat.",
            "context_length": 8000,
            "output_length": 1024,
            "pricing": {
                "realtime": _window(0.0004, 0.0008),
                "asynchronous": {
                    window: _window(0.0004, 0.0008)
                    for window in ("asap", "1h", "3h", "6h", "12h", "24h", "48h", "72h")
                },
                "fineTunedRealtime": _window(0.0004, 0.0008),
                "fineTuningTraining": 0.02,
            },
            "limits": {
                "concurrent_requests": 10,
                "max_async_queue_size": 50,
                "request_limit": 400,
                "request_limit_time_unit": "minute",
            },
        },
        {
            "id": LLAMA,
            "object": "model",
            "created": 1731336610,
            "owned_by": "klusterai",
            "pricing": {
                "realtime": _window(1.8e-07, 1.8e-07),
                # numbers as strings, as some docs print them
                "asynchronous": {"24h": _window("5e-08", "0.00000008"), "48h": _window(4e-08, 6e-08)},
            },
        },
        # no pricing at all (the list without ?extended=true): skipped
        {"id": "deepseek-ai/DeepSeek-R1", "object": "model", "created": 1737385699, "owned_by": "klusterai"},
        {
            "id": QWEN,
            "object": "model",
            "pricing": {
                "asynchronous": {
                    "24h": _window(-1e-07, 2e-07),  # negative: skipped
                    "48h": _window("NaN", 2e-07),  # not finite: skipped
                    "72h": {"input": 1e-07},  # no output: skipped
                    "asap": _window(3e-07, 6e-07),
                }
            },
        },
    ],
}


# -- prices from kluster ---------------------------------------------------------------------------------------


def test_prices_from_models_reads_every_asynchronous_window():
    table = prices_from_models(EXTENDED_MODELS)
    assert set(table) == {"model_abc123", LLAMA, QWEN}
    assert table["model_abc123"] == {
        window: Price(0.0004, 0.0008) for window in ("asap", "1h", "3h", "6h", "12h", "24h", "48h", "72h")
    }
    assert table[LLAMA] == {"24h": Price(5e-08, 8e-08), "48h": Price(4e-08, 6e-08)}
    assert table[QWEN] == {"asap": Price(3e-07, 6e-07)}
    assert prices_from_models(EXTENDED_MODELS["data"]) == table  # the data list alone works too


def test_prices_from_models_logs_why_a_window_is_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="airflow_provider_kluster.pricing"):
        prices_from_models(EXTENDED_MODELS)
    messages = [record.getMessage() for record in caplog.records]
    assert (
        f"Skipping kluster's 24h price of model {QWEN}: input is -1e-07, not a number of USD per token of at least 0."
        in messages
    )
    assert any("48h" in m and "'NaN'" in m for m in messages)
    assert any("72h" in m and "output is None" in m for m in messages)


@pytest.mark.parametrize(
    "models",
    [
        [],
        {"object": "list", "data": None},
        [None, "model", {"id": None, "pricing": {"asynchronous": {"24h": _window(1, 1)}}}],
        [{"id": "m", "pricing": None}],
        [{"id": "m", "pricing": {"realtime": _window(1e-7, 1e-7)}}],  # realtime is not a batch price
        [{"id": "m", "pricing": {"asynchronous": {"24h": "cheap"}}}],
        [{"id": "m", "pricing": {"asynchronous": {"24h": _window(True, 1e-7)}}}],
    ],
)
def test_prices_from_models_skips_what_it_cannot_read(models):
    assert prices_from_models(models) == {}


# -- prices from the user ----------------------------------------------------------------------------------------

ACCEPTED_USER_TABLES = [
    (None, {}),
    ("", {}),
    ({}, {}),
    ({LLAMA: {"24h": _window(1e-07, 2e-07)}}, {LLAMA: {"24h": Price(1e-07, 2e-07)}}),
    ({LLAMA: _window(1e-07, 2e-07)}, {LLAMA: {ANY_WINDOW: Price(1e-07, 2e-07)}}),
    ({LLAMA: _window(0, 0)}, {LLAMA: {ANY_WINDOW: Price(0.0, 0.0)}}),
    ({LLAMA: _window("1e-07", "2e-07")}, {LLAMA: {ANY_WINDOW: Price(1e-07, 2e-07)}}),
    (
        json.dumps({LLAMA: {"24h": _window(1e-07, 2e-07), "asap": _window(3e-07, 4e-07)}}),
        {LLAMA: {"24h": Price(1e-07, 2e-07), "asap": Price(3e-07, 4e-07)}},
    ),
]


@pytest.mark.parametrize(("value", "expected"), ACCEPTED_USER_TABLES)
def test_price_table_from_user_accepts(value, expected):
    assert price_table_from_user(value) == expected


REFUSED_USER_TABLES = [
    ("{not json", "prices is not valid JSON"),
    ([1, 2], "prices must be a dict of model id -> prices in USD per token (e.g. {'MODEL': {'24h': "),
    ({"": _window(1, 1)}, "Every prices key must be a model id (a non-empty string); got ''."),
    (
        {"m": 0.1},
        "prices['m'] must be {'input': x, 'output': y} or {'24h': {'input': x, 'output': y}, …} in USD per token; got 0.1.",
    ),
    ({"m": {}}, "prices['m'] must be {'input': x, 'output': y}"),
    ({"m": {"24h": 0.1}}, "prices['m']['24h'] must be {'input': x, 'output': y} in USD per token; got 0.1."),
    (
        {"m": {"24h": {"input": 1e-7}}},
        "prices['m']['24h'] has no 'output'; give both 'input' and 'output', in USD per token.",
    ),
    (
        {"m": {"24h": {"input": 1e-7, "ouput": 1e-7}}},
        "prices['m']['24h'] has the key 'ouput'; give only 'input' and 'output', in USD per token.",
    ),
    (
        {"m": {"input": 1e-7, "output": 1e-7, "currency": "USD"}},
        "prices['m'] has the key 'currency'; give only",
    ),
    (
        {"m": {"24h": _window(-1e-7, 1e-7)}},
        "prices['m']['24h']['input'] must be a number of USD per token of at least 0; got -1e-07.",
    ),
    (
        {"m": {"24h": _window(1e-7, math.nan)}},
        "prices['m']['24h']['output'] must be a number of USD per token of at least 0; got nan.",
    ),
    (
        {"m": {"24h": _window(1e-7, "cheap")}},
        "prices['m']['24h']['output'] must be a number of USD per token of at least 0; got 'cheap'.",
    ),
    (
        {"m": {"24h": _window(True, 1e-7)}},
        "prices['m']['24h']['input'] must be a number of USD per token of at least 0; got True.",
    ),
    (
        {"m": {"input": 1e-7, "output": 1e-7, "24h": _window(1e-7, 1e-7)}},
        "prices['m'] mixes a price for every window ('input'/'output') with one for '24h'",
    ),
    (
        {"m": {"": _window(1e-7, 1e-7)}},
        "Every prices['m'] key must be a completion window (e.g. '24h') or 'input'/'output'; got ''.",
    ),
]


@pytest.mark.parametrize(("value", "message"), REFUSED_USER_TABLES)
def test_price_table_from_user_refuses_in_one_sentence(value, message):
    with pytest.raises(KlusterConfigError) as info:
        price_table_from_user(value)
    text = str(info.value)
    assert text.startswith(message)
    assert text.endswith(".")


def test_price_table_from_user_names_the_value():
    with pytest.raises(
        KlusterConfigError, match=r"^the connection's prices extra\['m'\]\['24h'\] has no 'input'"
    ):
        price_table_from_user({"m": {"24h": {"output": 1}}}, name="the connection's prices extra")


def test_price_table_from_user_warns_of_prices_per_million_tokens(caplog):
    with caplog.at_level(logging.WARNING, logger="airflow_provider_kluster.pricing"):
        table = price_table_from_user({LLAMA: _window(0.18, 0.18)})
    assert table == {LLAMA: {ANY_WINDOW: Price(0.18, 0.18)}}  # kept: only a warning
    assert "was it given per 1M tokens?" in caplog.text
    assert "1.8e+05 USD per 1M tokens" in caplog.text


# -- tables ---------------------------------------------------------------------------------------------------


def test_merge_tables_override_wins_per_model_and_window():
    base = {
        LLAMA: {"24h": Price(1, 1), "48h": Price(2, 2)},
        QWEN: {"24h": Price(3, 3)},
        "a": {"24h": Price(4, 4)},
    }
    override = {LLAMA: {"24h": Price(9, 9)}, QWEN: {ANY_WINDOW: Price(8, 8)}, "new": {"asap": Price(7, 7)}}
    merged = merge_tables(base, override)
    assert merged == {
        LLAMA: {"24h": Price(9, 9), "48h": Price(2, 2)},
        QWEN: {ANY_WINDOW: Price(8, 8)},  # a price for every window replaces kluster's per-window ones
        "a": {"24h": Price(4, 4)},
        "new": {"asap": Price(7, 7)},
    }
    assert base[LLAMA] == {"24h": Price(1, 1), "48h": Price(2, 2)}  # unchanged


@pytest.mark.parametrize(
    ("model", "window", "expected"),
    [
        (LLAMA, "24h", Price(1, 1)),
        (LLAMA, "72h", Price(5, 5)),  # falls back on the every-window price
        (QWEN, "24h", Price(3, 3)),
        (QWEN, "48h", None),
        ("other", "24h", None),
    ],
)
def test_price_for(model, window, expected):
    table = {LLAMA: {"24h": Price(1, 1), ANY_WINDOW: Price(5, 5)}, QWEN: {"24h": Price(3, 3)}}
    assert price_for(table, model, window) == expected


# -- token estimates --------------------------------------------------------------------------------------------


def _chat(*messages, **params):
    return {"model": LLAMA, "messages": list(messages), **params}


PROMPT_ESTIMATES = [
    (_chat(), 0),
    (_chat({"role": "user", "content": ""}), MESSAGE_OVERHEAD_TOKENS),
    (_chat({"role": "user", "content": "abcd"}), MESSAGE_OVERHEAD_TOKENS + 1),
    (_chat({"role": "user", "content": "abcde"}), MESSAGE_OVERHEAD_TOKENS + 2),  # rounded up
    (
        _chat({"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 41}),
        2 * MESSAGE_OVERHEAD_TOKENS + 10 + 11,
    ),
    (
        _chat(
            {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "text", "text": "efgh"}]}
        ),
        MESSAGE_OVERHEAD_TOKENS + 2,
    ),
    (
        _chat(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},  # 22 characters: 6 tokens
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
                ],
            }
        ),
        MESSAGE_OVERHEAD_TOKENS + 6 + NON_TEXT_PART_TOKENS,
    ),
    (
        _chat(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "{}x"}}],
            }
        ),
        MESSAGE_OVERHEAD_TOKENS + 1,
    ),
    (
        _chat({"role": "user", "content": "abcd"}, tools=[{"a": 1}]),
        MESSAGE_OVERHEAD_TOKENS + 1 + 3,
    ),  # '[{"a":1}]'
    ({"model": LLAMA}, 0),
    ({"messages": "not a list"}, 0),
]


@pytest.mark.parametrize(("body", "tokens"), PROMPT_ESTIMATES)
def test_estimate_prompt_tokens(body, tokens):
    assert CHARS_PER_TOKEN == 4
    assert estimate_prompt_tokens(body) == tokens


COMPLETION_TOKENS = [
    ({"max_completion_tokens": 100, "max_tokens": 200}, 100),
    ({"max_tokens": 200}, 200),
    ({"max_completion_tokens": None, "max_tokens": 200}, 200),
    ({"max_completion_tokens": True, "max_tokens": 200}, 200),  # not a number of tokens
    ({"max_completion_tokens": 0}, DEFAULT_COMPLETION_TOKENS),
    ({"max_tokens": "100"}, DEFAULT_COMPLETION_TOKENS),
    ({}, DEFAULT_COMPLETION_TOKENS),
]


@pytest.mark.parametrize(("body", "tokens"), COMPLETION_TOKENS)
def test_completion_tokens_of_precedence(body, tokens):
    assert completion_tokens_of(body, DEFAULT_COMPLETION_TOKENS) == tokens


def test_completion_tokens_default_is_1024_and_can_be_given():
    assert DEFAULT_COMPLETION_TOKENS == 1_024
    assert completion_tokens_of({}) == 1_024
    assert completion_tokens_of({}, 50) == 50
    assert completion_tokens_of({"max_tokens": 7}, 50) == 7


# -- cost estimates ---------------------------------------------------------------------------------------------

TABLE = {LLAMA: {"24h": Price(1e-07, 2e-07)}, QWEN: {"24h": Price(5e-07, 1e-06), "asap": Price(1e-06, 2e-06)}}


def _request_lines():
    """25,000 batch input lines, streamed: 20,000 Llama text requests and 5,000 Qwen image requests."""
    for n in range(25_000):
        if n % 5:
            body = {
                "model": LLAMA,
                "messages": [{"role": "user", "content": f"{n:040d}"}],  # 40 characters: 10 tokens
                "max_completion_tokens": 100,
            }
        else:
            body = {
                "model": QWEN,
                "messages": [
                    {"role": "system", "content": "Describe"},  # 8 characters: 2 tokens
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": f"{n:010d}"},  # 10 characters: 3 tokens
                            {"type": "image_url", "image_url": {"url": f"https://example.com/{n}.png"}},
                        ],
                    },
                ],
            }  # no token limit: DEFAULT_COMPLETION_TOKENS
        yield json.dumps(
            {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )


def test_a_25000_line_estimate_gives_the_exact_totals():
    estimator = CostEstimator()
    for line in _request_lines():
        estimator.add(json.loads(line)["body"])
    llama_prompt = 20_000 * (MESSAGE_OVERHEAD_TOKENS + 10)
    qwen_prompt = 5_000 * (2 * MESSAGE_OVERHEAD_TOKENS + 2 + 3 + NON_TEXT_PART_TOKENS)
    assert estimator.requests == 25_000
    assert estimator.per_model == {
        LLAMA: {"requests": 20_000, "prompt_tokens": 280_000, "completion_tokens": 2_000_000},
        QWEN: {"requests": 5_000, "prompt_tokens": 5_065_000, "completion_tokens": 5_120_000},
    }
    assert (llama_prompt, qwen_prompt) == (280_000, 5_065_000)

    estimate = estimator.estimate(TABLE, "24h", source="kluster's")
    assert estimate.unpriced_models == []
    assert estimate.per_model[LLAMA]["usd"] == pytest.approx(280_000 * 1e-07 + 2_000_000 * 2e-07)  # 0.428
    assert estimate.per_model[QWEN]["usd"] == pytest.approx(5_065_000 * 5e-07 + 5_120_000 * 1e-06)  # 7.6525
    assert estimate.total_usd == pytest.approx(8.0805)
    assert (estimate.requests, estimate.prompt_tokens, estimate.completion_tokens) == (
        25_000,
        5_345_000,
        7_120_000,
    )

    data = estimate.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-native
    assert data["unit"] == PRICE_UNIT == "USD per token"
    assert data["window"] == "24h"
    assert data["per_model"][LLAMA] == {
        "requests": 20_000,
        "prompt_tokens": 280_000,
        "completion_tokens": 2_000_000,
        "input_price": 1e-07,
        "output_price": 2e-07,
        "usd": pytest.approx(0.428),
    }

    text = estimate.describe()
    assert text.startswith(
        "Estimated cost: 8.08 USD for 25,000 requests (5,345,000 prompt tokens, 7,120,000 completion tokens) "
        "at kluster's 24h prices (USD per token: "
        f"{QWEN} input 5e-07 = 0.5 USD per 1M tokens, output 1e-06 = 1 USD per 1M tokens; "  # costliest first
        f"{LLAMA} input 1e-07 = 0.1 USD per 1M tokens, output 2e-07 = 0.2 USD per 1M tokens)."
    )
    assert len(text.splitlines()) == 2
    assert "1,024 where none is set" in text


def test_add_takes_a_whole_line_and_a_count():
    estimator = CostEstimator(default_completion_tokens=10)
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "abcd"}]}
    estimator.add({"custom_id": "a", "body": body}, count=3)
    estimator.add({"messages": []})  # names no model
    assert estimator.per_model == {
        LLAMA: {"requests": 3, "prompt_tokens": 15, "completion_tokens": 30},
        NO_MODEL: {"requests": 1, "prompt_tokens": 0, "completion_tokens": 10},
    }
    with pytest.raises(ValueError, match="count must be a whole number of at least 0; got -1"):
        estimator.add(body, count=-1)


def test_an_unpriced_model_is_unknown_not_free():
    estimator = CostEstimator()
    estimator.add({"model": LLAMA, "messages": [], "max_tokens": 1_000_000})
    estimator.add({"model": "mystery/model", "messages": [], "max_tokens": 1_000_000})
    estimate = estimator.estimate(TABLE, "24h")
    assert estimate.unpriced_models == ["mystery/model"]
    assert estimate.per_model["mystery/model"]["usd"] is None
    assert estimate.total_usd == pytest.approx(0.2)
    assert " at 24h prices (" in estimate.describe()
    assert "No 24h price for mystery/model: its cost is unknown and not included." in estimate.describe()

    assert estimator.estimate(TABLE, "48h").unpriced_models == [LLAMA, "mystery/model"]  # priced only at 24h


# -- budget ----------------------------------------------------------------------------------------------------


def _estimate(usd_per_model: dict[str, float | None], window: str = "24h") -> Estimate:
    return Estimate(
        window=window,
        per_model={
            model: {
                "requests": 1,
                "prompt_tokens": 1_000,
                "completion_tokens": 1_000,
                "input_price": None if usd is None else usd / 2_000,
                "output_price": None if usd is None else usd / 2_000,
                "usd": usd,
            }
            for model, usd in usd_per_model.items()
        },
        unpriced_models=[model for model, usd in usd_per_model.items() if usd is None],
    )


@pytest.mark.parametrize(
    ("usd", "max_cost", "spent"),
    [(12.0, None, 0.0), (12.0, None, 1e9), (12.0, 12.0, 0.0), (10.0, 12.0, 2.0), (0.0, 0, 0.0)],
)
def test_check_budget_passes(usd, max_cost, spent):
    check_budget(_estimate({LLAMA: usd}), max_cost, spent=spent)


def test_check_budget_refuses_with_the_estimate_and_the_unit():
    estimator = CostEstimator()
    for line in _request_lines():
        estimator.add(json.loads(line))
    estimate = estimator.estimate(TABLE, "24h", source="kluster's")
    with pytest.raises(KlusterBudgetError) as info:
        check_budget(estimate, 5, what="the batch 'daily'")
    error = info.value
    assert isinstance(error, KlusterError)
    text = str(error)
    assert text.startswith(
        "The batch 'daily' would cost more than max_cost=5 USD: Estimated cost: 8.08 USD for 25,000"
    )
    assert estimate.describe() in text
    assert "USD per token" in text
    assert "USD per 1M tokens" in text
    assert (error.estimate_usd, error.max_cost, error.spent) == (pytest.approx(8.0805), 5, 0.0)


def test_check_budget_counts_what_was_spent():
    with pytest.raises(
        KlusterBudgetError,
        match=r"^The job would cost more than max_cost=10 USD plus 3.00 USD already spent = 11.00 USD: Estimated cost: 8.00 USD",
    ) as info:
        check_budget(_estimate({LLAMA: 8.0}), 10, spent=3.0)
    assert (info.value.estimate_usd, info.value.max_cost, info.value.spent) == (8.0, 10, 3.0)


def test_check_budget_refuses_an_unpriced_model_when_there_is_a_budget():
    estimate = _estimate({LLAMA: 1.0, "mystery/model": None}, window="48h")
    check_budget(estimate, None)  # no budget: nothing to check
    with pytest.raises(KlusterBudgetError) as info:
        check_budget(estimate, 100.0)
    assert str(info.value).startswith(
        "Cannot check max_cost=100 USD for the job: no price for model mystery/model at window 48h; "
        "give prices={'mystery/model': {'48h': {'input': 1.8e-07, 'output': 1.8e-07}}} (in USD per token) or "
        "max_cost=None. Estimated cost: 1.00 USD"
    )
    assert info.value.unpriced_models == ["mystery/model"]


@pytest.mark.parametrize(
    ("max_cost", "spent", "message"),
    [
        (-1, 0.0, "max_cost must be a number of USD of at least 0; got -1."),
        (math.inf, 0.0, "max_cost must be a number of USD of at least 0; got inf."),
        ("10", 0.0, "max_cost must be a number of USD of at least 0; got '10'."),
        (10, -1.0, "spent must be a number of USD of at least 0; got -1.0."),
    ],
)
def test_check_budget_refuses_bad_numbers(max_cost, spent, message):
    with pytest.raises(KlusterConfigError) as info:
        check_budget(_estimate({LLAMA: 1.0}), max_cost, spent=spent)
    assert str(info.value) == message


# -- actual cost ---------------------------------------------------------------------------------------------


def test_actual_cost_from_usage():
    usage = {
        LLAMA: {"prompt_tokens": 1_000_000, "completion_tokens": 500_000, "total_tokens": 1_500_000},
        QWEN: {"prompt_tokens": 2_000_000},  # completion_tokens missing: 0
        "mystery/model": {"prompt_tokens": 10, "completion_tokens": 10},
        "idle/model": {"prompt_tokens": 0, "completion_tokens": 0},
    }
    usd, unpriced = actual_cost(usage, TABLE, "24h")
    assert usd == pytest.approx(1_000_000 * 1e-07 + 500_000 * 2e-07 + 2_000_000 * 5e-07)  # 0.1 + 0.1 + 1.0
    assert unpriced == ["mystery/model"]  # a model that used no tokens cost nothing, priced or not
    assert actual_cost(usage, TABLE, "asap") == (pytest.approx(2.0), [LLAMA, "mystery/model"])
    assert actual_cost({}, TABLE, "24h") == (0.0, [])


@pytest.mark.parametrize(
    ("amount", "text"),
    [(0, "0.00"), (8.0805, "8.08"), (1234.5, "1,234.50"), (0.01, "0.01"), (0.0012, "0.0012")],
)
def test_format_usd(amount, text):
    assert format_usd(amount) == text
