"""Request validation and fake chat completions for the kluster.ai emulator."""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

#: Only endpoint a batch (and a batch input line) may target.
CHAT_COMPLETIONS_URL = "/v1/chat/completions"

#: Models listed by ``GET /v1/models`` unless configured otherwise:
#: every id used in kluster's published guide and examples.
DEFAULT_MODELS: list[dict[str, Any]] = [
    {"id": "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo", "created": 1731336610, "owned_by": "klusterai"},
    {"id": "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo", "created": 1731336610, "owned_by": "klusterai"},
    {"id": "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo", "created": 1733777629, "owned_by": "klusterai"},
    {"id": "meta-llama/Meta-Llama-3.1-8B-Instruct", "created": 1731336610, "owned_by": "meta"},
    {"id": "deepseek-ai/DeepSeek-R1", "created": 1737385699, "owned_by": "klusterai"},
    {"id": "Qwen/Qwen2.5-VL-7B-Instruct", "created": 1741303075, "owned_by": "qwen"},
    {"id": "deepseek-ai/DeepSeek-V3-0324", "created": 1742848965, "owned_by": "klusterai"},
    {"id": "google/gemma-3-27b-it", "created": 1742913870, "owned_by": "google"},
    {"id": "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8", "created": 1743944115, "owned_by": "meta"},
    {"id": "meta-llama/Llama-4-Scout-17B-16E-Instruct", "created": 1743944115, "owned_by": "meta"},
    {"id": "Qwen/Qwen3-235B-A22B-FP8", "created": 1746000000, "owned_by": "qwen"},
    {"id": "BAAI/bge-m3", "created": 1746000000, "owned_by": "baai"},
]


def default_model_ids() -> list[str]:
    """Ids of :data:`DEFAULT_MODELS`."""
    return [m["id"] for m in DEFAULT_MODELS]


def _text_of(content: Any) -> str:
    """Text of a message ``content`` (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    texts.append("[image]")
        return " ".join(texts)
    return "" if content is None else str(content)


def count_tokens(text: str) -> int:
    """Crude but plausible token estimate (about four characters per token)."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def validate_chat_body(body: Any) -> tuple[str, str] | None:
    """Check the shape of a chat-completion request body.

    :return: ``None`` if valid, else ``(param, message)``.
    """
    if not isinstance(body, dict):
        return "body", "body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "body.model", "body.model is required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "body.messages", "body.messages must be a non-empty array"
    for msg in messages:
        if not isinstance(msg, dict) or "role" not in msg:
            return "body.messages", "every message needs a role"
    return None


def build_completion(body: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    """Build a deterministic ``chat.completion`` for a request body.

    The reply text depends only on the model and the last user message; usage counts are derived from the
    text lengths. vLLM extras (``stop_reason``, ``prompt_logprobs``) are included as kluster returns them.

    :param body: a valid chat-completion request body.
    :param created: creation timestamp (defaults to now).
    """
    messages = body.get("messages") or []
    last_user = ""
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            last_user = _text_of(msg.get("content"))
            break
    prompt = " ".join(" ".join(last_user.split()).split(" ")[:40])
    reply = "Emulated answer from {} to: {}".format(body.get("model"), prompt or "(empty prompt)")
    prompt_tokens = 2 + sum(
        4 + count_tokens(_text_of(m.get("content"))) for m in messages if isinstance(m, dict)
    )
    completion_tokens = count_tokens(reply)
    finish_reason = "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < completion_tokens:
        reply = reply[: limit * 4]
        completion_tokens = limit
        finish_reason = "length"
    return {
        "id": f"chat-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(created if created is not None else time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            },
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        },
        "prompt_logprobs": None,
    }


def validate_input_file(path: str, *, max_errors: int = 100) -> tuple[int, list[dict[str, Any]]]:
    """Validate a batch input file line by line, streaming it from disk.

    Structural problems (not JSON, missing ``custom_id``, wrong ``method``/``url``, missing
    ``body.model``/``body.messages``, duplicate ``custom_id``) make the whole batch fail, as with OpenAI.
    Unknown models are *not* checked here: such requests fail individually into the error file.

    :param path: path of the input JSONL file.
    :param max_errors: stop collecting errors after this many.
    :return: ``(number of requests, errors)``; errors are ``{code, message, param, line}`` dicts.
    """
    total = 0
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(code: str, message: str, param: str | None, line: int | None) -> None:
        if len(errors) < max_errors:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            total += 1
            try:
                obj = json.loads(raw)
            except ValueError:
                error("invalid_json_line", "This line is not parseable as valid JSON.", None, line_no)
                continue
            if not isinstance(obj, dict):
                error("invalid_request", "Each line must be a JSON object.", None, line_no)
                continue
            custom_id = obj.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                error("missing_required_parameter", "custom_id is required.", "custom_id", line_no)
            elif custom_id in seen:
                error(
                    "duplicate_custom_id", f"The custom_id {custom_id!r} is not unique.", "custom_id", line_no
                )
            else:
                seen.add(custom_id)
            if str(obj.get("method", "")).upper() != "POST":
                error("invalid_method", "Only POST is supported.", "method", line_no)
            if obj.get("url") != CHAT_COMPLETIONS_URL:
                error("invalid_url", f"The url must be {CHAT_COMPLETIONS_URL}.", "url", line_no)
            problem = validate_chat_body(obj.get("body"))
            if problem is not None:
                error("invalid_request", problem[1], problem[0], line_no)
    if total == 0:
        error("empty_file", "The input file is empty.", None, None)
    return total, errors
