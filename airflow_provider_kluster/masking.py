"""Mask a secret (the API key) in text, in every encoding a server might echo it in.

A server may echo the key it was sent raw, URL-encoded (``quote`` with any ``safe`` set, ``quote_plus``,
upper- or lower-case hex), JSON-escaped (``\\/``, ``\\uXXXX`` with ``ensure_ascii``, either hex case) or
base64-encoded (standard or URL-safe, with or without padding) — alone or inside a longer base64 blob such as
``base64("user:" + key)`` (HTTP basic auth) or ``base64("Bearer " + key)``, where it may start at any of the
three byte offsets of a base64 group. :func:`redact` replaces each with :data:`MASK`.

The pattern for a secret is built once (``lru_cache``): error messages are redacted on every failed call.
"""

from __future__ import annotations

import base64
import functools
import re

__all__ = ["MASK", "MIN_BASE64_FRAGMENT", "MIN_SECRET_LENGTH", "redact", "secret_pattern"]

#: What every form of the secret is replaced with.
MASK = "***"
#: Secrets shorter than this are not masked: a two-letter "key" would wipe ordinary words out of messages.
MIN_SECRET_LENGTH = 4
#: A base64 form of the secret shorter than this is not masked, for the same reason.
MIN_BASE64_FRAGMENT = 8

# Characters JSON writes as a two-character escape (json.dumps); "/" may also be written "\/".
_JSON_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def redact(text: str, secret: str | None) -> str:
    """Mask every occurrence of ``secret`` in ``text``: raw, URL-encoded, JSON-escaped or base64-encoded."""
    if not secret or len(secret) < MIN_SECRET_LENGTH or not text:
        return text
    return secret_pattern(secret).sub(MASK, text)


@functools.lru_cache(maxsize=16)
def secret_pattern(secret: str) -> re.Pattern[str]:
    """Return one compiled pattern matching every encoded form of ``secret`` (built once per secret).

    Alternatives are tried longest first: the base64 forms (whole, then the inner parts that are the same
    whatever surrounds the secret in a longer blob), the raw secret, then a URL-encoded and a JSON-escaped
    form, each matched character by character so any ``safe`` set, mix of escaped and plain characters, and
    either hex case is found. Within each character's group the options start with different characters, so
    at most one can match: matching never backtracks beyond one group, whatever the secret holds.
    """
    # A base64 form takes the neighbouring characters with it: they hold a few bits of the secret's first and
    # last bytes (and the padding).
    edge = "[A-Za-z0-9+/_-]?"
    forms = sorted(_base64_forms(secret), key=len, reverse=True)
    alternatives = [f"{edge}{re.escape(form)}{edge}={{0,2}}" for form in forms]
    alternatives.append(re.escape(secret))
    alternatives.append("".join(_url_char(c) for c in secret))
    alternatives.append("".join(_json_char(c) for c in secret))
    return re.compile("|".join(alternatives))


def _base64_forms(secret: str) -> set[str]:
    data = secret.encode()
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode()
        forms.update({whole, whole.rstrip("=")})
        # Inside a longer blob the secret starts 0, 1 or 2 bytes into a 3-byte group. Characters holding only
        # its bits are the same whatever the neighbouring bytes are: from ceil(8*offset/6) to floor(8*end/6).
        for offset in range(3):
            encoded = encode(b"\0" * offset + data).decode()
            start, end = -(-8 * offset // 6), 8 * (offset + len(data)) // 6
            inner = encoded[start:end]
            if len(inner) >= MIN_BASE64_FRAGMENT:
                forms.add(inner)
    return {form for form in forms if len(form) >= MIN_BASE64_FRAGMENT}


def _hex(byte: int) -> str:
    """Return a pattern for two hex digits of ``byte``, in either case."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in f"{byte:02X}")


def _url_char(char: str) -> str:
    """Return a pattern for ``char`` URL-encoded: percent-escaped UTF-8 bytes, or left plain by ``safe``."""
    escaped = "".join(f"%{_hex(b)}" for b in char.encode())
    options = [escaped]
    if char != "%":  # a plain "%" in URL-encoded text is never the character itself
        options.append(re.escape(char))
    if char == " ":
        options.append(r"\+")  # quote_plus
    return "(?:" + "|".join(options) + ")"


def _json_char(char: str) -> str:
    r"""Return a pattern for ``char`` in a JSON string: plain, a short escape (``\/``) or ``\uXXXX``."""
    code = ord(char)
    if code > 0xFFFF:  # astral: a surrogate pair
        units = [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)]
    else:
        units = [code]
    options = ["".join(rf"\\u{_hex(u >> 8)}{_hex(u & 0xFF)}" for u in units)]
    if char in _JSON_SHORT_ESCAPES:
        options.append(re.escape(_JSON_SHORT_ESCAPES[char]))
    elif code >= 0x20:  # control characters never appear plain in JSON
        options.append(re.escape(char))
    if char == "/":
        options.append(r"\\/")
    return "(?:" + "|".join(options) + ")"
