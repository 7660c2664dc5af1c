"""Model objects served by the emulator's ``GET /v1/models``, plain and ``?extended=true``.

The extended shape follows the ``/v1/models`` schema of kluster's published OpenAPI file: every required
field (``internal_model_id``, ``reasoning_model``, ``tools_supported``, ``name``, ``description``,
``context_length``, ``output_length``, ``model_type``, ``model_purpose``, ``status``, ``deleted``, ``tags``,
``up_votes``, ``default``) plus ``release_date``, ``model_size``, ``limits`` and ``pricing``.

Prices are **USD per token**, as the OpenAPI file's descriptions say ("Cost per input token in USD"):
``pricing = {"realtime": {"input", "output"}, "asynchronous": {"24h": {...}, "48h": ..., "72h": ...,
"asap": ...}}``. The defaults below are made up but plausible (stated per million tokens, converted);
override them per model with :attr:`EmulatorConfig.prices
<airflow_provider_kluster.emulator.state.EmulatorConfig.prices>` or ``--price MODEL=IN,OUT`` on the CLI.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

from airflow_provider_kluster.emulator.completions import DEFAULT_MODELS

#: Multiplier of the realtime price per asynchronous completion window: longer windows are cheaper.
ASYNC_DISCOUNTS: dict[str, float] = {"asap": 0.8, "24h": 0.5, "48h": 0.45, "72h": 0.4}

#: Realtime price of unknown models, USD per million tokens ``(input, output)``.
FALLBACK_PRICE_PER_MILLION: tuple[float, float] = (0.18, 0.36)

#: Realtime prices of the default models, USD per million tokens ``(input, output)``.
DEFAULT_PRICES_PER_MILLION: dict[str, tuple[float, float]] = {
    "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo": (0.18, 0.36),
    "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo": (3.50, 4.50),
    "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo": (0.70, 0.90),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": (0.18, 0.36),
    "deepseek-ai/DeepSeek-R1": (3.00, 5.00),
    "Qwen/Qwen2.5-VL-7B-Instruct": (0.30, 0.45),
    "deepseek-ai/DeepSeek-V3-0324": (1.25, 1.50),
    "google/gemma-3-27b-it": (0.35, 0.50),
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8": (0.25, 1.00),
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": (0.20, 0.60),
    "Qwen/Qwen3-235B-A22B-FP8": (0.20, 0.60),
    "BAAI/bge-m3": (0.01, 0.02),
}

# (model_size, context_length, output_length, reasoning_model, tools_supported, model_purpose)
_METADATA: dict[str, tuple[str, int, int, str, bool, str]] = {
    "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo": ("8b", 131072, 16384, "no", True, "text"),
    "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo": ("405b", 131072, 16384, "no", True, "text"),
    "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo": ("70b", 131072, 16384, "no", True, "text"),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": ("8b", 131072, 16384, "no", True, "text"),
    "deepseek-ai/DeepSeek-R1": ("671b", 163840, 32768, "yes", False, "text"),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("7b", 32768, 8192, "no", False, "multimodal"),
    "deepseek-ai/DeepSeek-V3-0324": ("671b", 163840, 16384, "no", True, "text"),
    "google/gemma-3-27b-it": ("27b", 65536, 8192, "no", False, "multimodal"),
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8": ("400b", 1048576, 16384, "no", True, "multimodal"),
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": ("109b", 131072, 16384, "no", True, "multimodal"),
    "Qwen/Qwen3-235B-A22B-FP8": ("235b", 40960, 16384, "optional", True, "text"),
    "BAAI/bge-m3": ("568m", 8192, 0, "no", False, "embeddings"),
}
_FALLBACK_METADATA = ("unknown", 32768, 8192, "no", False, "text")

#: ``limits`` of every model (the Trial plan's published rate limits).
DEFAULT_LIMITS: dict[str, Any] = {
    "concurrent_requests": 20,
    "max_async_queue_size": 1000,
    "request_limit": 30,
    "request_limit_time_unit": "minute",
}


def _per_token(per_million: float) -> float:
    # 12 significant digits: 0.18 / 1e6 is 1.8e-07, not 1.7999999999999997e-07.
    return float(f"{per_million / 1_000_000:.12g}")


def pricing_per_million(
    input_per_million: float,
    output_per_million: float,
    *,
    discounts: Mapping[str, float] = ASYNC_DISCOUNTS,
) -> dict[str, Any]:
    """A ``pricing`` object (USD per token) from realtime prices in USD per million tokens.

    :param input_per_million: realtime price of a million input tokens.
    :param output_per_million: realtime price of a million output tokens.
    :param discounts: multiplier of the realtime price per asynchronous window.
    """
    if input_per_million < 0 or output_per_million < 0:
        raise ValueError("prices must not be negative")
    return {
        "realtime": {"input": _per_token(input_per_million), "output": _per_token(output_per_million)},
        "asynchronous": {
            window: {
                "input": _per_token(input_per_million * factor),
                "output": _per_token(output_per_million * factor),
            }
            for window, factor in discounts.items()
        },
    }


def default_pricing(model_id: str) -> dict[str, Any]:
    """The default ``pricing`` object of a model (USD per token)."""
    return pricing_per_million(*DEFAULT_PRICES_PER_MILLION.get(model_id, FALLBACK_PRICE_PER_MILLION))


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def model_pricing(model_id: str, prices: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The ``pricing`` of ``model_id``: the default, with ``prices[model_id]`` merged over it key by key.

    :param prices: per-model overrides in the API's shape and unit (USD per token), e.g.
        ``{"my/model": {"realtime": {"input": 2e-7}, "asynchronous": {"24h": {"output": 1e-7}}}}``.
    """
    return _merge(default_pricing(model_id), (prices or {}).get(model_id) or {})


def plain_model_json(model_id: str) -> dict[str, Any]:
    """The model object of ``GET /v1/models`` (``{id, object, created, owned_by}``)."""
    known = {m["id"]: m for m in DEFAULT_MODELS}.get(model_id, {})
    return {
        "id": model_id,
        "object": "model",
        "created": known.get("created", 1730000000),
        "owned_by": known.get("owned_by", model_id.split("/", 1)[0].lower()),
    }


def extended_model_json(
    model_id: str,
    *,
    prices: Mapping[str, Mapping[str, Any]] | None = None,
    default: bool = False,
) -> dict[str, Any]:
    """The model object of ``GET /v1/models?extended=true`` (the plain fields plus the extended ones)."""
    data = plain_model_json(model_id)
    size, context, output, reasoning, tools, purpose = _METADATA.get(model_id, _FALLBACK_METADATA)
    name = model_id.split("/", 1)[-1]
    data.update(
        internal_model_id=hashlib.sha256(model_id.encode()).hexdigest()[:24],
        release_date=data["created"],
        model_size=size,
        reasoning_model=reasoning,
        tools_supported=tools,
        name=model_id,
        description=f"{name}, served by the kluster.ai emulator.",
        context_length=context,
        output_length=output,
        pricing=model_pricing(model_id, prices),
        limits=dict(DEFAULT_LIMITS),
        model_type="reference",
        model_purpose=purpose,
        status="existing",
        deleted=False,
        tags=["embeddings"] if purpose == "embeddings" else ["chat", purpose],
        up_votes=0,
        down_votes=0,
        default=default,
    )
    return data
