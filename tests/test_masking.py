"""The API key is masked in every encoding a server may echo it in, and API errors carry no context holding it.

Unit tests run :func:`redact` over a table of encodings × secrets; the end-to-end tests drive the hook over real
HTTP against a server that echoes the key it was sent (read from the ``Authorization`` header) in one encoding,
and walk everything the raised exception holds.

Secrets show as ``<secret>`` and assertions name only what leaked, so a failing test does not print the key
(except in the captured logs pytest shows when the log test fails).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_provider_kluster.exceptions import (
    KlusterAPIError,
    KlusterAuthError,
    KlusterBadRequestError,
    KlusterNotFoundError,
    KlusterTransientAPIError,
)
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.masking import MASK, redact, secret_pattern
from tests.conftest import TEST_API_KEY, conn_json


class Hidden(str):
    """A secret that pytest shows as ``<secret>`` among a failing test's arguments."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<secret>"


#: kluster.ai keys are UUID-like.
REALISTIC_KEY = Hidden("3f2b9c4e-7a1d-4e8f-b6c2-9d0e1f2a3b4c")
#: Characters that URL-encoding, JSON and base64 each treat specially.
SYMBOLS_KEY = Hidden("kl/SECRET+key=7f3a/9c1e==")
SECRETS = {
    "test-key": Hidden(TEST_API_KEY),
    "realistic": REALISTIC_KEY,
    "slash-plus-equals": SYMBOLS_KEY,
    "non-ascii": Hidden("clé-sécrète/ключ-🔑+42"),
    "quote-backslash-space": Hidden('key with "quotes" \\ and/slash'),
}


def _b64(data: str, *, urlsafe: bool = False, pad: bool = True) -> str:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    text = encode(data.encode()).decode()
    return text if pad else text.rstrip("=")


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def _upper_unicode_escapes(text: str) -> str:
    return re.sub(r"\\u[0-9a-f]{4}", lambda m: "\\u" + m.group()[2:].upper(), text)


#: How a server may echo the key: each built with the standard library, independently of the masking code.
ENCODINGS: dict[str, Callable[[str], str]] = {
    "raw": lambda s: s,
    "quote-safe-empty": lambda s: urllib.parse.quote(s, safe=""),
    "quote-default-safe-slash": lambda s: urllib.parse.quote(s),
    "quote-plus": urllib.parse.quote_plus,
    "quote-lower-hex": lambda s: _lower_hex(urllib.parse.quote(s, safe="")),
    "quote-plus-lower-hex": lambda s: _lower_hex(urllib.parse.quote_plus(s)),
    "urlencode-query": lambda s: urllib.parse.urlencode({"api_key": s}),
    "json-ascii": lambda s: json.dumps(s)[1:-1],
    "json-unicode": lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    "json-escaped-slash": lambda s: json.dumps(s)[1:-1].replace("/", "\\/"),
    "json-upper-hex": lambda s: _upper_unicode_escapes(json.dumps(s)[1:-1]),
    "json-document": lambda s: json.dumps({"authorization": f"Bearer {s}"}),
    "base64": _b64,
    "base64-unpadded": lambda s: _b64(s, pad=False),
    "base64-urlsafe": lambda s: _b64(s, urlsafe=True),
    "base64-urlsafe-unpadded": lambda s: _b64(s, urlsafe=True, pad=False),
    # Inside a longer blob, starting 0, 1 and 2 bytes into a base64 group.
    "base64-basic-auth": lambda s: _b64(f"user:{s}"),
    "base64-bearer": lambda s: _b64(f"Bearer {s}"),
    "base64-offset-0-with-tail": lambda s: _b64(f"abc{s}, more"),
    "base64-offset-1": lambda s: _b64(f"a{s}z"),
    "base64-offset-2-urlsafe": lambda s: _b64(f"ab{s}yz", urlsafe=True),
    "basic-auth-header": lambda s: "Basic " + _b64(f":{s}"),
}


# -- a leak detector that decodes rather than re-encodes -----------------------------------------------------


def _json_unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        try:
            return str(json.loads(f'"{match.group()}"'))
        except ValueError:
            return match.group()

    return re.sub(r"(?:\\u[0-9a-fA-F]{4})+|\\.", one, text)


def _base64_decodings(text: str) -> Iterator[str]:
    for run in re.findall(r"[A-Za-z0-9+/_-]{6,}={0,2}", text):
        for start in range(4):
            chunk = run[start:].rstrip("=")
            chunk = chunk[: len(chunk) - len(chunk) % 4] if len(chunk) % 4 == 1 else chunk
            for altchars in (b"+/", b"-_"):
                try:
                    raw = base64.b64decode(chunk + "=" * (-len(chunk) % 4), altchars=altchars)
                except ValueError:
                    continue
                yield raw.decode("utf-8", "replace")


def _decodings(text: str) -> Iterator[str]:
    for url_decoded in {text, urllib.parse.unquote(text), urllib.parse.unquote_plus(text)}:
        for decoded in {url_decoded, _json_unescape(url_decoded)}:
            yield decoded
            yield from _base64_decodings(decoded)


def exposes(text: str, secret: str, *, fragment: int = 8) -> bool:
    """Tell whether ``text`` holds ``secret``, or any ``fragment`` characters of it, in any decoding."""
    size = min(fragment, len(secret))
    pieces = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    return any(piece in decoded for decoded in _decodings(text) for piece in pieces)


# -- redact: unit --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
def test_the_detector_sees_every_encoding(secret, encoding):
    """The leak check is not vacuous: it finds the key in each encoding before masking."""
    found = exposes(f"error: {ENCODINGS[encoding](secret)} end", secret)
    assert found, f"the detector misses {encoding}"


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
def test_redact_masks_every_encoding(secret, encoding):
    text = f"error: {ENCODINGS[encoding](secret)} end"
    masked = redact(text, secret)
    leaked = exposes(masked, secret)
    assert not leaked, f"{encoding} is not masked"
    assert MASK in masked
    assert masked.startswith("error: ")
    assert masked.endswith(" end")


@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
def test_redact_masks_every_occurrence_in_one_text(secret):
    text = " | ".join(encode(secret) for encode in ENCODINGS.values())
    masked = redact(text, secret)
    leaked = exposes(masked, secret)
    assert not leaked, "an encoding is not masked"
    assert masked.count(" | ") == len(ENCODINGS) - 1


UNRELATED = (
    "kluster.ai get batch b-1 failed with HTTP 401: Invalid API key (code 401) (request id req-42). "
    "See https://docs.kluster.ai/api?x=a%2Fb&y=1+2 for details; payload "
    '{"path": "a\\/b", "name": "caf\\u00e9", "blob": "dXNlcjpwYXNzd29yZA==", "id": "3f2b9c4e-0000-4000-8000"}'
)


@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
def test_redact_leaves_unrelated_text_alone(secret):
    redacted = redact(UNRELATED, secret)
    assert redacted == UNRELATED


@pytest.mark.parametrize("secret", [None, "", "abc"])
def test_no_or_too_short_secrets_mask_nothing(secret):
    assert redact("abc abcd YWJj", secret) == "abc abcd YWJj"


def test_a_short_secret_masks_only_whole_forms_not_base64_fragments():
    """A 4-character secret is masked raw and as padded base64, but base64 forms shorter than 8 characters
    (unpadded, or inside a blob) are not looked for: they would match ordinary words."""
    assert redact("key abcd, b64 YWJjZA==, fine", "abcd") == f"key {MASK}, b64 {MASK}, fine"
    assert redact("token YWJjZA stays", "abcd") == "token YWJjZA stays"


def test_the_pattern_is_built_once_per_secret():
    secret_pattern.cache_clear()
    for _ in range(50):
        redact(f"x {TEST_API_KEY} y", TEST_API_KEY)
    assert secret_pattern.cache_info().misses == 1
    assert secret_pattern.cache_info().hits == 49


def test_redact_is_linear_even_for_a_pathological_secret():
    secret = "\\%" * 40
    text = ("\\\\%25" * 39 + "x") * 200
    started = time.perf_counter()
    assert redact(text, secret) == text
    assert time.perf_counter() - started < 5


# -- end to end: a server echoing the key it was sent ----------------------------------------------------------

#: What the echoing server answers, by the batch id asked for: (status, body form).
ANSWERS = {
    "auth-text": (401, "text"),
    "auth-envelope": (401, "envelope"),
    "not-found-flat": (404, "flat"),
    "bad-request-envelope": (400, "envelope"),
    "server-error-text": (500, "text"),
    "not-json": (200, "not-json"),
    "not-an-object": (200, "list"),
}
CLASSES: dict[str, type[KlusterAPIError]] = {
    "auth-text": KlusterAuthError,
    "auth-envelope": KlusterAuthError,
    "not-found-flat": KlusterNotFoundError,
    "bad-request-envelope": KlusterBadRequestError,
    "server-error-text": KlusterTransientAPIError,
    "not-json": KlusterTransientAPIError,
    "not-an-object": KlusterTransientAPIError,
}


class EchoServer:
    """Answer ``GET /v1/batches/<answer>/<encoding>`` with the Authorization header's key, encoded, in the body
    (and, with ``echo_in_request_id``, in the ``x-request-id`` header)."""

    def __init__(self, *, echo_in_request_id: bool = False) -> None:
        self.echo_in_request_id = echo_in_request_id
        self.keys_seen: list[str] = []

    def __enter__(self) -> EchoServer:
        echo = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                key = Hidden((self.headers.get("Authorization") or "").removeprefix("Bearer "))
                echo.keys_seen.append(key)
                _, _, _, answer, encoding = self.path.split("?", 1)[0].split("/")
                status, form = ANSWERS[answer]
                echoed = ENCODINGS[encoding](key)
                text = f"Invalid API key {echoed} was rejected"
                if form == "text":
                    body, content_type = text, "text/plain"
                elif form == "envelope":
                    envelope = {"error": {"message": text, "errorCode": echoed, "type": "auth"}}
                    body, content_type = json.dumps(envelope), "application/json"
                elif form == "flat":
                    body, content_type = (
                        json.dumps({"message": text, "errorCode": echoed}),
                        "application/json",
                    )
                elif form == "list":  # a 200 with JSON that is not an object: quoted in the error
                    body, content_type = json.dumps([text, echoed]), "application/json"
                else:  # "not-json": a 200 whose body the client cannot parse, holding the key
                    body, content_type = f'{{"id": "{echoed}", "status": ', "application/json"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if echo.echo_in_request_id:
                    self.send_header("x-request-id", f"req-{echoed}")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


E2E_KEYS = {"test-key": SECRETS["test-key"], "slash-plus-equals": SYMBOLS_KEY}  # header values are ASCII


@pytest.fixture(scope="module")
def echo_server():
    with EchoServer() as server:
        yield server


@pytest.fixture(params=E2E_KEYS.values(), ids=E2E_KEYS.keys())
def echoing(request, echo_server, monkeypatch):
    """The echoing server and a connection ``echo`` to it with this key; return (server, key)."""
    echo_server.keys_seen.clear()
    monkeypatch.setenv("AIRFLOW_CONN_ECHO", conn_json(echo_server.base_url, api_key=request.param))
    return echo_server, request.param


def _everything_it_holds(exc: BaseException) -> Iterator[tuple[str, str]]:
    """Yield (where, text) for an exception and every exception chained to it: str, repr, args, attributes."""
    seen: set[int] = set()
    pending: list[tuple[str, BaseException]] = [("error", exc)]
    while pending:
        where, current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield f"str({where})", str(current)
        yield f"repr({where})", repr(current)
        yield from ((f"{where}.args[{i}]", repr(arg)) for i, arg in enumerate(current.args))
        yield from ((f"{where}.{name}", repr(value)) for name, value in vars(current).items())
        for link in ("__cause__", "__context__"):
            chained = getattr(current, link)
            if chained is not None:
                pending.append((f"{where}.{link}", chained))


def _leaks(exc: BaseException, key: str) -> list[str]:
    """Name what in ``exc`` holds the key, and any exception chained to it (``__cause__``, ``__context__``).

    Called before asserting, so that a failure shows these names only, not the exception holding the key.
    """
    chained = [link for link in ("__cause__", "__context__") if getattr(exc, link) is not None]
    return chained + [where for where, text in _everything_it_holds(exc) if exposes(text, key)]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("answer", ANSWERS)
def test_an_echoed_key_reaches_no_exception(echoing, answer, encoding):
    server, key = echoing
    with pytest.raises(CLASSES[answer]) as info:
        KlusterHook("echo", max_retries=0).get_batch(f"{answer}/{encoding}")
    assert server.keys_seen == [key]  # the server really had the key to echo
    assert type(info.value) is CLASSES[answer]
    assert info.value.call == "get batch"
    assert info.value.resource_id == f"{answer}/{encoding}"
    leaks = _leaks(info.value, key)
    assert leaks == [], "the error holds the key or is chained"


@pytest.mark.parametrize("answer", ["auth-envelope", "server-error-text", "not-json"])
def test_an_echoed_key_reaches_no_exception_of_the_async_hook(echoing, answer):
    server, key = echoing

    async def get() -> None:
        await KlusterHook("echo", max_retries=0).aget_batch(f"{answer}/base64-basic-auth")

    with pytest.raises(CLASSES[answer]) as info:
        asyncio.run(get())
    assert type(info.value) is CLASSES[answer]
    assert server.keys_seen == [key]
    leaks = _leaks(info.value, key)
    assert leaks == [], "the error holds the key or is chained"


@pytest.mark.parametrize("encoding", ["raw", "quote-plus", "base64-bearer"])
def test_a_key_echoed_in_the_request_id_is_masked_there(monkeypatch, encoding):
    with EchoServer(echo_in_request_id=True) as server:
        monkeypatch.setenv("AIRFLOW_CONN_ECHO", conn_json(server.base_url, api_key=SYMBOLS_KEY))
        with pytest.raises(KlusterAuthError) as info:
            KlusterHook("echo", max_retries=0).get_batch(f"auth-envelope/{encoding}")
    assert type(info.value) is KlusterAuthError
    assert info.value.request_id is not None
    assert info.value.request_id.startswith("req-")
    leaked = exposes(info.value.request_id, SYMBOLS_KEY)
    assert not leaked, "the request id holds the key"
    leaks = _leaks(info.value, SYMBOLS_KEY)
    assert leaks == [], "the error holds the key or is chained"


@pytest.mark.parametrize("answer", ["auth-text", "server-error-text", "not-json"])
def test_an_echoed_key_reaches_no_log(echoing, answer, caplog, capfd):
    """Nothing logged on the way — the hook's, the client's or the transport's, down to DEBUG — holds the key,
    nor does the error once logged with its traceback."""
    server, key = echoing
    caplog.set_level(logging.DEBUG)
    hook = KlusterHook("echo", max_retries=0)
    for encoding in ENCODINGS:
        with pytest.raises(CLASSES[answer]) as info:
            hook.get_batch(f"{answer}/{encoding}")
        logging.getLogger("tests.masking").error("the call failed", exc_info=info.value)
    assert len(server.keys_seen) == len(ENCODINGS)
    assert caplog.records
    captured = capfd.readouterr()
    leaks = [
        name
        for name, text in {"log records": caplog.text, "stdout": captured.out, "stderr": captured.err}.items()
        if exposes(text, key)
    ]
    assert leaks == [], "the key was logged"
