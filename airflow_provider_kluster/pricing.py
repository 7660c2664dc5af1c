"""Estimate what a batch will cost before it is submitted, and what it cost once it ran.

Prices are in **USD per token** (:data:`PRICE_UNIT`), the unit kluster.ai's ``GET /models?extended=true`` gives
them in (``pricing.asynchronous.<window>.{input, output}``, "Cost per input token in USD"); text shown to people
adds the same price in USD per 1M tokens. A :data:`PriceTable` maps a model id to a completion window (``"24h"``,
``"asap"``, … or :data:`ANY_WINDOW`) to a :class:`Price`. It comes from kluster (:func:`prices_from_models`), from
the user (:func:`price_table_from_user`), or both (:func:`merge_tables`: the user's prices win).

Token counts before a batch runs are **estimates**: prompt tokens are counted from the text of the messages at
:data:`CHARS_PER_TOKEN` characters per token (rounded up) plus :data:`MESSAGE_OVERHEAD_TOKENS` per message, and
:data:`NON_TEXT_PART_TOKENS` for each image or other non-text part; completion tokens are each request's limit
(``max_completion_tokens``, else ``max_tokens``), or :data:`DEFAULT_COMPLETION_TOKENS` when it sets none. A
model's real tokenizer may count text differently, and most answers stop before their limit, so the estimate of
a request with a limit is usually above what it really costs. A model with no price for the window is reported
in ``unpriced_models``: its cost is unknown, never counted as zero.

Nothing here talks to kluster.ai: the caller fetches the model list and passes it in.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_kluster.exceptions import KlusterBudgetError, KlusterConfigError

log = logging.getLogger(__name__)

#: The unit of every price here, stated once: kluster.ai's own (its model list gives "Cost per input token in USD").
PRICE_UNIT = "USD per token"
#: Tokens per million, for the "USD per 1M tokens" figure shown next to each price.
TOKENS_PER_MILLION = 1_000_000
#: Window key of a price that holds for every completion window (``{"model": {"input": x, "output": y}}``).
ANY_WINDOW = "*"
#: Model key of the requests whose body names no model (they can have no price).
NO_MODEL = "(no model)"

#: Characters of message text counted as one prompt token (rounded up per message): a rough rule for English.
CHARS_PER_TOKEN = 4
#: Prompt tokens added for each message (its role and the chat template's markers around it).
MESSAGE_OVERHEAD_TOKENS = 4
#: Prompt tokens counted for each content part that is not text (an image, audio, a file): a flat allowance,
#: since what such a part costs depends on its size and the model.
NON_TEXT_PART_TOKENS = 1_000
#: Completion tokens counted for a request that sets neither ``max_completion_tokens`` nor ``max_tokens``.
DEFAULT_COMPLETION_TOKENS = 1_024

#: A price above this many USD per token is most likely given in USD per 1M tokens: it is kept, with a warning.
_SUSPICIOUS_PRICE = 0.01
#: Models named one by one in a description; the rest are counted.
_DESCRIBED_MODELS = 5
_PRICE_KEYS = ("input", "output")


@dataclass(frozen=True)
class Price:
    """What one model costs at one completion window.

    :param input: USD per prompt (input) token.
    :param output: USD per completion (output) token.
    """

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Return the USD cost of this many prompt and completion tokens."""
        return prompt_tokens * self.input + completion_tokens * self.output

    def describe(self) -> str:
        """Describe the price for people, e.g. ``input 1.8e-07 = 0.18 USD per 1M tokens, output …``."""
        return f"input {_per_token(self.input)}, output {_per_token(self.output)}"


#: Model id -> completion window (``"24h"``, ``"asap"``, …, or :data:`ANY_WINDOW`) -> :class:`Price`.
PriceTable = dict[str, dict[str, Price]]


def price_for(table: Mapping[str, Mapping[str, Price]], model: str, window: str) -> Price | None:
    """Return the price of ``model`` at ``window``: the window's own, else the model's :data:`ANY_WINDOW` one.

    :return: ``None`` when the table has no price for the model at that window.
    """
    windows = table.get(model)
    if not windows:
        return None
    return windows.get(window) or windows.get(ANY_WINDOW)


def merge_tables(
    base: Mapping[str, Mapping[str, Price]], override: Mapping[str, Mapping[str, Price]]
) -> PriceTable:
    """Return ``base`` with ``override``'s prices on top: the override wins per model and window.

    A model whose override has an :data:`ANY_WINDOW` price takes only the override's prices (it states every
    window), so kluster's per-window prices for that model no longer apply. Neither table is changed.
    """
    merged: PriceTable = {model: dict(windows) for model, windows in base.items()}
    for model, windows in override.items():
        if ANY_WINDOW in windows:
            merged[model] = dict(windows)
        else:
            merged.setdefault(model, {}).update(windows)
    return merged


# -- prices from kluster.ai ----------------------------------------------------------------------------------


def prices_from_models(models: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> PriceTable:
    """Read the prices in kluster's model list (``GET /models?extended=true``) into a :data:`PriceTable`.

    Only ``pricing.asynchronous`` is read (batches are billed at their completion window's asynchronous price;
    ``realtime`` is not a batch price), and window keys are kept as given (``"24h"``, ``"asap"``, ``"1h"``, …).
    Prices may come as numbers or numeric strings. A model without an id or pricing is skipped, and so is a
    window whose ``input`` or ``output`` is missing, not a number, negative or not finite (logged with the
    reason): such a model or window is then unpriced, never free.

    :param models: The ``data`` list of the response (or the whole response, ``{"object": "list", "data": …}``).
    """
    if isinstance(models, Mapping):
        models = models.get("data") or []
    table: PriceTable = {}
    for model in models:
        if not isinstance(model, Mapping):
            continue
        model_id = model.get("id")
        pricing = model.get("pricing")
        if not isinstance(model_id, str) or not model_id or not isinstance(pricing, Mapping):
            continue
        windows = pricing.get("asynchronous")
        if not isinstance(windows, Mapping):
            continue
        for window, price in windows.items():
            parsed, problem = _price_of(price)
            if parsed is None:
                log.warning("Skipping kluster's %s price of model %s: %s.", window, model_id, problem)
                continue
            table.setdefault(model_id, {})[str(window)] = parsed
    return table


def _price_of(value: Any) -> tuple[Price | None, str]:
    """Parse ``{"input": x, "output": y}`` from kluster's list; on failure return why."""
    if not isinstance(value, Mapping):
        return None, f"it is {_shown(value)}, not an object with input and output"
    numbers: dict[str, float] = {}
    for key in _PRICE_KEYS:
        number = _number(value.get(key))
        if number is None:
            return None, f"{key} is {_shown(value.get(key))}, not a number of {PRICE_UNIT} of at least 0"
        numbers[key] = number
    return Price(numbers["input"], numbers["output"]), ""


def _number(value: Any) -> float | None:
    """Return a finite number of at least 0 from a number or a numeric string, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


# -- prices from the user ------------------------------------------------------------------------------------


def price_table_from_user(value: Any, *, name: str = "prices") -> PriceTable:
    """Check prices given by the user (an operator parameter or the connection extra) and return them as a table.

    Two shapes per model, in :data:`PRICE_UNIT`: per window, ``{"model": {"24h": {"input": x, "output": y}, …}}``,
    or for every window, ``{"model": {"input": x, "output": y}}`` (stored under :data:`ANY_WINDOW`). Prices
    are numbers (or numeric strings) of at least 0. The whole value may also be a JSON string of the same.

    :param value: The prices; ``None`` or an empty string means none (an empty table).
    :param name: What the value is called in messages (``"prices"``, ``"the connection's prices extra"``).
    :raises KlusterConfigError: The value is not JSON or not of those shapes; the message names the model and key.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise KlusterConfigError(f"{name} is not valid JSON ({error}); got {_shown(value)}.") from None
    if not isinstance(value, Mapping):
        raise KlusterConfigError(
            f"{name} must be a dict of model id -> prices in {PRICE_UNIT} (e.g. "
            f"{_example('MODEL')}); got {_shown(value)}."
        )
    table: PriceTable = {}
    for model, windows in value.items():
        if not isinstance(model, str) or not model.strip():
            raise KlusterConfigError(
                f"Every {name} key must be a model id (a non-empty string); got {_shown(model)}."
            )
        where = f"{name}[{model!r}]"
        if not isinstance(windows, Mapping) or not windows:
            raise KlusterConfigError(
                f"{where} must be {{'input': x, 'output': y}} or {{'24h': {{'input': x, 'output': y}}, …}} in "
                f"{PRICE_UNIT}; got {_shown(windows)}."
            )
        if any(key in _PRICE_KEYS for key in windows):
            window = next((key for key in windows if key not in _PRICE_KEYS), None)
            if window is not None and isinstance(windows[window], Mapping):
                raise KlusterConfigError(
                    f"{where} mixes a price for every window ('input'/'output') with one for {window!r}; give "
                    "either {'input': x, 'output': y} or a price per window."
                )
            table[model] = {ANY_WINDOW: _user_price(windows, where)}
            continue
        table[model] = {}
        for window, price in windows.items():
            if not isinstance(window, str) or not window.strip():
                raise KlusterConfigError(
                    f"Every {where} key must be a completion window (e.g. '24h') or 'input'/'output'; "
                    f"got {_shown(window)}."
                )
            if not isinstance(price, Mapping):
                raise KlusterConfigError(
                    f"{where}[{window!r}] must be {{'input': x, 'output': y}} in {PRICE_UNIT}; got {_shown(price)}."
                )
            table[model][window] = _user_price(price, f"{where}[{window!r}]")
    return table


def _user_price(value: Mapping[Any, Any], where: str) -> Price:
    """Check one ``{"input": x, "output": y}`` the user gave, naming it as ``where`` in a refusal."""
    unknown = [key for key in value if key not in _PRICE_KEYS]
    if unknown:
        raise KlusterConfigError(
            f"{where} has the key {unknown[0]!r}; give only 'input' and 'output', in {PRICE_UNIT}."
        )
    numbers: dict[str, float] = {}
    for key in _PRICE_KEYS:
        if key not in value:
            raise KlusterConfigError(
                f"{where} has no {key!r}; give both 'input' and 'output', in {PRICE_UNIT}."
            )
        number = _number(value[key])
        if number is None:
            raise KlusterConfigError(
                f"{where}[{key!r}] must be a number of {PRICE_UNIT} of at least 0; got {_shown(value[key])}."
            )
        if number > _SUSPICIOUS_PRICE:
            log.warning(
                "%s[%r] is %s %s (%s USD per 1M tokens): was it given per 1M tokens? Prices are %s.",
                where,
                key,
                number,
                PRICE_UNIT,
                _format_number(number * TOKENS_PER_MILLION),
                PRICE_UNIT,
            )
        numbers[key] = number
    return Price(numbers["input"], numbers["output"])


# -- token estimates -----------------------------------------------------------------------------------------


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimate the prompt tokens of a chat-completions request body (an estimate, not the model's tokenizer).

    Each message counts :data:`MESSAGE_OVERHEAD_TOKENS` plus its text at :data:`CHARS_PER_TOKEN` characters per
    token, rounded up: string content, ``{"type": "text"}`` parts of list content, an assistant's tool-call names
    and arguments. Every other content part (an image, audio, a file) counts :data:`NON_TEXT_PART_TOKENS`.
    Tool definitions (``tools``) count as their JSON text.
    """
    if not isinstance(body, Mapping):
        return 0
    tokens = 0
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        chars, parts = _message_size(message)
        tokens += MESSAGE_OVERHEAD_TOKENS + _tokens_of_chars(chars) + parts * NON_TEXT_PART_TOKENS
    tools = body.get("tools")
    if tools:
        tokens += _tokens_of_chars(len(json.dumps(tools, separators=(",", ":"), default=str)))
    return tokens


def _message_size(message: Any) -> tuple[int, int]:
    """Return the characters of a message's text and its number of non-text content parts."""
    if not isinstance(message, Mapping):
        return 0, 0
    chars, parts = 0, 0
    content = message.get("content")
    if isinstance(content, str):
        chars += len(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                text = part.get("text")
                chars += len(text) if isinstance(text, str) else 0
            else:
                parts += 1
    tool_calls = message.get("tool_calls")
    for call in tool_calls if isinstance(tool_calls, list) else ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            chars += sum(
                len(v) for v in (function.get("name"), function.get("arguments")) if isinstance(v, str)
            )
    return chars, parts


def _tokens_of_chars(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def completion_tokens_of(body: Mapping[str, Any], default: int = DEFAULT_COMPLETION_TOKENS) -> int:
    """Return the completion tokens to count for a request: its limit, the most it can be billed for.

    :return: ``max_completion_tokens``, else ``max_tokens`` (each when a whole number of at least 1), else
        ``default``.
    """
    if isinstance(body, Mapping):
        for key in ("max_completion_tokens", "max_tokens"):
            limit = body.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
                return limit
    return default


# -- estimates -----------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """The estimated cost of a set of requests at one completion window's prices.

    :param window: The completion window whose prices were used.
    :param per_model: Per model: ``requests``, ``prompt_tokens``, ``completion_tokens``, ``input_price`` and
        ``output_price`` (in :data:`PRICE_UNIT`, ``None`` when unpriced) and ``usd`` (``None`` when unpriced).
    :param unpriced_models: Models with no price at the window: their cost is unknown and not in ``total_usd``.
    :param source: Whose prices they are, for the description (``"kluster's"``); empty when not said.
    :param default_completion_tokens: What a request without a token limit was counted for.
    :param unit: The unit of the prices: always :data:`PRICE_UNIT`.
    """

    window: str
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    unpriced_models: list[str] = field(default_factory=list)
    source: str = ""
    default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS
    unit: str = PRICE_UNIT

    @property
    def total_usd(self) -> float:
        """Return the USD cost of the priced models (unpriced ones are unknown, not in it)."""
        return sum(entry["usd"] for entry in self.per_model.values() if entry["usd"] is not None)

    @property
    def requests(self) -> int:
        """Return the number of requests counted."""
        return sum(entry["requests"] for entry in self.per_model.values())

    @property
    def prompt_tokens(self) -> int:
        """Return the estimated prompt tokens of all requests."""
        return sum(entry["prompt_tokens"] for entry in self.per_model.values())

    @property
    def completion_tokens(self) -> int:
        """Return the completion tokens counted for all requests (their limits)."""
        return sum(entry["completion_tokens"] for entry in self.per_model.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the estimate as JSON-native data (for XCom or a log line)."""
        return {
            "window": self.window,
            "unit": self.unit,
            "total_usd": self.total_usd,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "per_model": {model: dict(entry) for model, entry in self.per_model.items()},
            "unpriced_models": list(self.unpriced_models),
            "default_completion_tokens": self.default_completion_tokens,
        }

    def describe(self) -> str:
        """Describe the estimate in two lines for a log or error message: the cost with each model's prices (in
        :data:`PRICE_UNIT` and USD per 1M tokens, costliest first), then how tokens were estimated."""
        prices = f"{self.source} {self.window}" if self.source else self.window
        priced = sorted(
            ((model, entry) for model, entry in self.per_model.items() if entry["usd"] is not None),
            key=lambda item: -item[1]["usd"],
        )  # the costliest first: they are the ones shown when there are many
        shown = "; ".join(
            f"{model} {Price(entry['input_price'], entry['output_price']).describe()}"
            for model, entry in priced[:_DESCRIBED_MODELS]
        )
        if len(priced) > _DESCRIBED_MODELS:
            shown += f"; and {len(priced) - _DESCRIBED_MODELS} more models"
        text = (
            f"Estimated cost: {format_usd(self.total_usd)} USD for {_count(self.requests, 'request')} "
            f"({self.prompt_tokens:,} prompt tokens, {self.completion_tokens:,} completion tokens) at {prices} "
            f"prices ({PRICE_UNIT}: {shown or 'no model priced'})."
        )
        if self.unpriced_models:
            text += (
                f" No {self.window} price for {_names(self.unpriced_models)}: "
                f"{'its' if len(self.unpriced_models) == 1 else 'their'} cost is unknown and not included."
            )
        text += (
            f"\nTokens are estimates: prompts at ~{CHARS_PER_TOKEN} characters per token, completions at each "
            f"request's token limit ({self.default_completion_tokens:,} where none is set)."
        )
        return text


class CostEstimator:
    """Add up requests one at a time (streaming a request file) and estimate their cost at a window's prices.

    Memory grows with the number of distinct models, never with the number of requests.

    :param default_completion_tokens: Completion tokens counted for a request that sets no token limit.
    """

    def __init__(self, default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS) -> None:
        self.default_completion_tokens = default_completion_tokens
        self._totals: dict[str, list[int]] = {}

    def add(self, body: Mapping[str, Any], *, count: int = 1) -> None:
        """Count ``count`` requests with this chat-completions body (a whole batch line's ``body`` is taken too).

        :param body: The request body, ``{model, messages, max_completion_tokens, …}``, or a batch input line
            ``{custom_id, method, url, body}``.
        :param count: How many such requests (for a body repeated over many prompts).
        """
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"count must be a whole number of at least 0; got {count!r}.")
        if isinstance(body, Mapping) and "messages" not in body and isinstance(body.get("body"), Mapping):
            body = body["body"]
        model = body.get("model") if isinstance(body, Mapping) else None
        key = model if isinstance(model, str) and model else NO_MODEL
        totals = self._totals.setdefault(key, [0, 0, 0])
        totals[0] += count
        totals[1] += count * estimate_prompt_tokens(body)
        totals[2] += count * completion_tokens_of(body, self.default_completion_tokens)

    @property
    def per_model(self) -> dict[str, dict[str, int]]:
        """Return per model the ``requests``, ``prompt_tokens`` and ``completion_tokens`` counted so far."""
        return {
            model: {"requests": r, "prompt_tokens": p, "completion_tokens": c}
            for model, (r, p, c) in self._totals.items()
        }

    @property
    def requests(self) -> int:
        """Return the number of requests counted so far."""
        return sum(totals[0] for totals in self._totals.values())

    def estimate(
        self, table: Mapping[str, Mapping[str, Price]], window: str, *, source: str = ""
    ) -> Estimate:
        """Price what was counted at ``window``'s prices in ``table``.

        :param source: Whose prices they are, shown in the description (``"kluster's"``, ``"the given"``).
        """
        per_model: dict[str, dict[str, Any]] = {}
        unpriced: list[str] = []
        for model, counted in self.per_model.items():
            price = price_for(table, model, window)
            if price is None:
                unpriced.append(model)
            per_model[model] = {
                **counted,
                "input_price": None if price is None else price.input,
                "output_price": None if price is None else price.output,
                "usd": None
                if price is None
                else price.cost(counted["prompt_tokens"], counted["completion_tokens"]),
            }
        return Estimate(
            window=window,
            per_model=per_model,
            unpriced_models=unpriced,
            source=source,
            default_completion_tokens=self.default_completion_tokens,
        )


def actual_cost(
    usage_by_model: Mapping[str, Mapping[str, int]], table: Mapping[str, Mapping[str, Price]], window: str
) -> tuple[float, list[str]]:
    """Return what the requests really cost, from the usage kluster reported, at ``window``'s prices.

    :param usage_by_model: Per model, ``prompt_tokens`` and ``completion_tokens`` (missing counts as 0).
    :return: The USD cost of the priced models, and the models that used tokens but have no price (their cost
        is unknown and not in the sum).
    """
    total = 0.0
    unpriced: list[str] = []
    for model, usage in usage_by_model.items():
        prompt = _tokens(usage.get("prompt_tokens"))
        completion = _tokens(usage.get("completion_tokens"))
        price = price_for(table, model, window)
        if price is not None:
            total += price.cost(prompt, completion)
        elif prompt or completion:
            unpriced.append(model)
    return total, unpriced


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# -- budget --------------------------------------------------------------------------------------------------


def check_budget(
    estimate: Estimate, max_cost: float | None, *, spent: float = 0.0, what: str = "the job"
) -> None:
    """Refuse to go on when ``what`` would cost more than ``max_cost`` USD, ``spent`` included.

    ``max_cost=None`` never refuses. With a budget, a model without a price at the estimate's window is refused
    too: its cost is unknown, so the budget cannot be checked.

    :param max_cost: The most ``what`` may cost, in USD; ``None`` for no limit.
    :param spent: USD already spent towards the same budget (e.g. by earlier batches).
    :raises KlusterConfigError: ``max_cost`` or ``spent`` is not a number of at least 0.
    :raises KlusterBudgetError: The estimate plus ``spent`` is above ``max_cost``, or a model is unpriced.
    """
    if max_cost is None:
        return
    for label, number in (("max_cost", max_cost), ("spent", spent)):
        if (
            isinstance(number, bool)
            or not isinstance(number, (int, float))
            or not math.isfinite(number)
            or number < 0
        ):
            raise KlusterConfigError(f"{label} must be a number of USD of at least 0; got {_shown(number)}.")
    if estimate.unpriced_models:
        model = estimate.unpriced_models[0]
        raise KlusterBudgetError(
            f"Cannot check max_cost={max_cost:g} USD for {what}: no price for "
            f"model{'' if len(estimate.unpriced_models) == 1 else 's'} {_names(estimate.unpriced_models)} at "
            f"window {estimate.window}; give prices="
            f"{_example(model, estimate.window)} (in {PRICE_UNIT}) or max_cost=None. {estimate.describe()}",
            estimate_usd=estimate.total_usd,
            max_cost=max_cost,
            spent=spent,
            unpriced_models=estimate.unpriced_models,
        )
    total = spent + estimate.total_usd
    if total > max_cost:
        already = f" plus {format_usd(spent)} USD already spent = {format_usd(total)} USD" if spent else ""
        raise KlusterBudgetError(
            f"{what[:1].upper()}{what[1:]} would cost more than max_cost={max_cost:g} USD"
            f"{already}: {estimate.describe()}",
            estimate_usd=estimate.total_usd,
            max_cost=max_cost,
            spent=spent,
        )


# -- text ----------------------------------------------------------------------------------------------------


def format_usd(amount: float) -> str:
    """Format a USD amount for people: cents from 1 cent up (``12.34``, ``1,234.50``), else 2 significant digits."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"{amount:,.2f}"
    return f"{amount:.2g}"


def _format_number(number: float) -> str:
    return f"{number:.4g}"


def _per_token(price: float) -> str:
    return f"{price:.3g} = {_format_number(price * TOKENS_PER_MILLION)} USD per 1M tokens"


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _names(models: list[str]) -> str:
    shown = ", ".join(models[:_DESCRIBED_MODELS])
    return (
        shown if len(models) <= _DESCRIBED_MODELS else f"{shown} and {len(models) - _DESCRIBED_MODELS} more"
    )


def _example(model: str, window: str = "24h") -> str:
    return f"{{{model!r}: {{{window!r}: {{'input': 1.8e-07, 'output': 1.8e-07}}}}}}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."
