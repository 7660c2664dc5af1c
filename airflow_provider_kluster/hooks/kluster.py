"""KlusterHook: the kluster.ai connection and every API call the provider makes, sync and async."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import httpx2
import openai
from airflow.sdk.bases.hook import BaseHook

# The wire constants and defaults live in the pure modules; they are imported here (and so stay importable
# from the hook, where earlier releases defined them).
from airflow_provider_kluster.batches import (
    BATCH_ENDPOINT,
    COMPLETION_WINDOWS,
    KLUSTER_METADATA_KEY,
    KlusterBatch,
)
from airflow_provider_kluster.connection import (
    CONN_TYPE,
    DEFAULT_BASE_URL,
    DEFAULT_CONN_ID,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_PLATFORM_URL,
    DEFAULT_TIMEOUT,
    HOOK_NAME,
    ui_field_behaviour,
)
from airflow_provider_kluster.exceptions import (
    KlusterAPIError,
    KlusterAuthError,
    KlusterBadRequestError,
    KlusterConfigError,
    KlusterNotFoundError,
    KlusterTransientAPIError,
    is_transient_status,
)
from airflow_provider_kluster.masking import redact
from airflow_provider_kluster.parameters import build_metadata
from airflow_provider_kluster.paths import PathLike, as_path, move_into_place, temp_sibling

if TYPE_CHECKING:
    from airflow.sdk import Connection, ObjectStoragePath

__all__ = [
    "BATCH_ENDPOINT",
    "COMPLETION_WINDOWS",
    "KLUSTER_METADATA_KEY",
    "ClientSettings",
    "KlusterHook",
    "PathLike",
    "build_metadata",
    "settings_from_connection",
]

_T = TypeVar("_T")

DOWNLOAD_CHUNK = 1024 * 1024
LIST_PAGE_SIZE = 100
#: Largest part kluster.ai's uploads API accepts, and the default part size of multipart uploads (64 MB).
UPLOAD_PART_SIZE = 64 * 1024 * 1024
#: MIME type declared for multipart uploads (the one in kluster's uploads example).
UPLOAD_MIME_TYPE = "text/jsonl"

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0")


@dataclass(frozen=True)
class ClientSettings:
    """What a client is built from, read from the Airflow connection."""

    base_url: str
    api_key: str
    timeout: float
    max_retries: int
    platform_url: str
    #: Connections of the shared async client (see :data:`~airflow_provider_kluster.connection.DEFAULT_MAX_CONNECTIONS`).
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __repr__(self) -> str:  # never show the key
        return (
            f"ClientSettings(base_url={self.base_url!r}, timeout={self.timeout}, "
            f"max_retries={self.max_retries}, max_connections={self.max_connections})"
        )

    @property
    def cache_key(self) -> tuple:
        """Return a key identifying the client these settings build, holding a digest of the key, not the key."""
        digest = hashlib.sha256(self.api_key.encode()).hexdigest()
        return (self.base_url, digest, self.timeout, self.max_retries, self.max_connections)

    @property
    def pool_limits(self) -> httpx2.Limits:
        """Return the shared async client's pool: ``max_connections`` connections, every one kept alive."""
        return httpx2.Limits(
            max_connections=self.max_connections, max_keepalive_connections=self.max_connections
        )


# One AsyncOpenAI client per (event loop, settings): a triggerer runs every trigger in one loop, and building a
# client costs ~20 ms of loop time and ~850 KB, so a thousand waiting batches share one client — and its pool of
# ``max_connections`` connections, all kept alive (the SDK's default pool, 1,000 connections of which 100 are kept,
# opened and closed hundreds of sockets under a thousand waits; its bookkeeping took two thirds of the loop's CPU).
@dataclass
class _SharedAsyncClient:
    """One async client, the loop it is bound to, and how many waits hold it.

    ``http`` is the client's own connection pool; ``base_url``, ``headers`` and ``max_retries`` are what a poll's
    lighter GET (:meth:`KlusterHook.aget_batch`) sends on it and how often it tries, read once from the client.
    """

    key: tuple
    loop: asyncio.AbstractEventLoop
    client: openai.AsyncOpenAI
    http: httpx2.AsyncClient
    base_url: str
    headers: dict[str, str] = field(repr=False)  # holds the key
    max_retries: int = 0
    users: int = 0

    @classmethod
    def build(cls, key: tuple, loop: asyncio.AbstractEventLoop, s: ClientSettings) -> _SharedAsyncClient:
        """Build the client of ``s``, its pool sized by ``s.pool_limits``."""
        http = openai.DefaultAsyncHttpxClient(timeout=s.timeout, limits=s.pool_limits)
        client = openai.AsyncOpenAI(
            base_url=s.base_url,
            api_key=s.api_key,
            timeout=s.timeout,
            max_retries=s.max_retries,
            http_client=http,
        )
        sent = {**client.default_headers, **client.auth_headers}
        headers = {name: value for name, value in sent.items() if isinstance(value, str)}
        headers.pop("Content-Type", None)  # a GET has no body
        base_url = str(client.base_url).rstrip("/")
        return cls(key, loop, client, http, base_url, headers, s.max_retries)


_ASYNC_CLIENTS: dict[tuple, _SharedAsyncClient] = {}
# Connection lookups of async hooks, reused for SETTINGS_TTL seconds: a triggerer resuming a thousand waits
# looks the connection up once (the waits that ask while it runs wait for that lookup, they start none of their
# own), and a rotated key is picked up within the TTL.
_ASYNC_SETTINGS: dict[tuple, tuple[float, ClientSettings]] = {}
_ASYNC_LOOKUPS: dict[tuple, asyncio.Task[ClientSettings]] = {}
SETTINGS_TTL = 60.0

# The retry rules of the openai SDK, which the poll's lighter GET keeps: 0.5 s doubling up to 8 s, less up to
# 25 % of jitter; a server's Retry-After (or retry-after-ms) of up to two minutes is waited instead, a longer one
# is not retried; x-should-retry is obeyed; otherwise connection errors, 408, 409, 429 and 5xx are retried.
_RETRY_DELAY = 0.5
_RETRY_DELAY_MAX = 8.0
_RETRY_AFTER_MAX = 120.0


def settings_from_connection(
    conn: Connection, *, timeout: float | None = None, max_retries: int | None = None
) -> ClientSettings:
    """Read the base URL, API key, timeout, retries and pool size from a kluster connection.

    The host may be a full URL (``http://127.0.0.1:8000/v1``) or a bare host name; a bare local host is
    reached over http, any other over https, with ``port`` and ``schema`` (the URI path) appended.
    The extra ``base_url`` wins over the host.

    :raises KlusterConfigError: No API key, or an extra that is not a number (``max_connections``: not a whole
        number of at least 1).
    """
    extra = conn.extra_dejson or {}
    base_url = extra.get("base_url") or _base_url_from_host(conn.host, conn.port, conn.schema)
    api_key = conn.password or extra.get("api_key")
    if not api_key:
        raise KlusterConfigError(
            f"Connection {conn.conn_id!r} has no API key: put the kluster.ai API key in its password field."
        )

    def number(name: str, given: float | None, default: float, cast: type) -> Any:
        value = given if given is not None else extra.get(name)
        if value in (None, ""):
            return cast(default)
        try:
            return cast(value)
        except (TypeError, ValueError):
            raise KlusterConfigError(
                f"Connection {conn.conn_id!r}: extra {name!r} must be a number, got {value!r}."
            ) from None

    return ClientSettings(
        base_url=base_url.rstrip("/"),
        api_key=str(api_key),
        timeout=number("timeout", timeout, DEFAULT_TIMEOUT, float),
        max_retries=number("max_retries", max_retries, DEFAULT_MAX_RETRIES, int),
        platform_url=str(extra.get("platform_url") or DEFAULT_PLATFORM_URL).rstrip("/"),
        max_connections=_pool_size(conn.conn_id, extra.get("max_connections")),
    )


def _pool_size(conn_id: str | None, value: object) -> int:
    """Return the ``max_connections`` extra as a whole number of at least 1 (unset: the default)."""
    if value in (None, ""):
        return DEFAULT_MAX_CONNECTIONS
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or number < 1:
        raise KlusterConfigError(
            f"Connection {conn_id!r}: extra 'max_connections' must be a whole number of at least 1 (the HTTP "
            f"connections a triggerer's waits share; default {DEFAULT_MAX_CONNECTIONS}), got {value!r}."
        )
    return number


def _forget_lookup(key: tuple, lookup: asyncio.Task[ClientSettings]) -> None:
    if _ASYNC_LOOKUPS.get(key) is lookup:
        del _ASYNC_LOOKUPS[key]
    if not lookup.cancelled():
        lookup.exception()  # read: a lookup that failed for its waiters is no "exception never retrieved"


async def _let_go(shared: _SharedAsyncClient) -> None:
    """Release one hold of ``shared``; the last holder closes it."""
    shared.users -= 1
    if shared.users <= 0:
        if _ASYNC_CLIENTS.get(shared.key) is shared:
            del _ASYNC_CLIENTS[shared.key]
        await shared.client.close()


def _retry_after(headers: httpx2.Headers) -> float | None:
    """Return the seconds a server asked to wait (``retry-after-ms``, ``retry-after`` in seconds or as a date)."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            with contextlib.suppress(ValueError):
                return float(value) / divisor
    value = headers.get("retry-after")
    if value:
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    return None


def _should_retry(response: httpx2.Response) -> bool:
    """Tell whether a failed answer is worth another try (the openai SDK's rules)."""
    after = _retry_after(response.headers)
    if after is not None and after > _RETRY_AFTER_MAX:
        return False
    told = response.headers.get("x-should-retry")
    if told in ("true", "false"):
        return told == "true"
    return is_transient_status(response.status_code)


def _retry_delay(retry: int, headers: httpx2.Headers | None) -> float:
    """Return the seconds before retry number ``retry + 1``: what the server asked for, else the backoff."""
    after = _retry_after(headers) if headers is not None else None
    if after is not None and math.isfinite(after) and 0 < after <= _RETRY_AFTER_MAX:
        return after
    return min(_RETRY_DELAY * 2.0**retry, _RETRY_DELAY_MAX) * (1 - 0.25 * random.random())


def _status_error(response: httpx2.Response) -> openai.APIStatusError:
    """Return the SDK's error for a failed answer, as the SDK builds it (body parsed if it is JSON)."""
    text = response.text.strip()
    body: object = text
    with contextlib.suppress(ValueError):
        body = json.loads(text)
    return openai.APIStatusError(f"Error code: {response.status_code}", response=response, body=body)


def _quiet_request_log() -> None:
    """Keep httpx2's line per request (``HTTP Request: GET …`` at INFO) out of the task logs.

    Airflow sets the ``httpx`` logger to WARNING in every process it configures, but (3.3) not ``httpx2``, which
    the openai SDK 3 rides on: every poll of every wait wrote that line into its task log, beside the progress
    line, and every upload or create beside the hook's own line saying what it did. A level configured for
    ``httpx2`` (in Airflow's logging config or anywhere else) is left as it is.
    """
    transport_log = logging.getLogger("httpx2")
    if transport_log.level == logging.NOTSET:
        transport_log.setLevel(logging.WARNING)


def _base_url_from_host(host: str | None, port: int | None, schema: str | None) -> str:
    if not host:
        return DEFAULT_BASE_URL
    if "://" in host:
        return host
    scheme = "http" if host in _LOCAL_HOSTS else "https"
    netloc = f"{host}:{port}" if port else host
    path = (schema or "v1").strip("/")
    return f"{scheme}://{netloc}/{path}"


def api_error(exc: Exception, *, call: str, resource_id: str | None, secret: str | None) -> KlusterAPIError:
    """Translate an openai/httpx failure into the provider exception that names the call and resource.

    Reads kluster's envelopes (``{"error": {"message", "errorCode"}}`` and ``{"message", "errorCode"}``), then
    the raw text. The API key is masked wherever the server echoed it, in any encoding (see
    :mod:`~airflow_provider_kluster.masking`): in the message, the request id and the resource id. The result
    holds only strings and numbers, never ``exc``: raise it outside the ``except`` block, so that it has no
    ``__context__`` either.
    """
    target = f"{call} {resource_id}" if resource_id else call
    status_code: int | None = None
    request_id: str | None = None
    if isinstance(exc, openai.APIStatusError):
        status_code = exc.status_code
        request_id = exc.request_id or exc.response.headers.get("x-kluster-request-id")
        detail = _error_detail(exc.body, exc.response, secret)
    elif isinstance(exc, (openai.APIConnectionError, httpx2.TransportError)):
        detail = f"could not reach kluster.ai ({type(exc).__name__}: {exc})"
    else:
        detail = f"{type(exc).__name__}: {exc}"
    parts = [f"kluster.ai {target} failed"]
    if status_code is not None:
        parts.append(f" with HTTP {status_code}")
    parts.append(f": {detail}")
    if request_id:
        parts.append(f" (request id {request_id})")
    cls: type[KlusterAPIError]
    if status_code in (401, 403):
        cls = KlusterAuthError
        parts.append(". Check the API key in the connection's password field.")
    elif status_code == 404:
        cls = KlusterNotFoundError
        parts.append(". Check the id, and that the connection uses the API key that created it.")
    elif status_code in (400, 422):
        cls = KlusterBadRequestError
    elif is_transient_status(status_code):
        cls = KlusterTransientAPIError
        parts.append(". This looks transient and persisted through every retry; try again later.")
    else:
        cls = KlusterAPIError
    message = redact("".join(parts), secret)
    if request_id:
        request_id = redact(request_id, secret)
    if resource_id:
        resource_id = redact(resource_id, secret)
    return cls(message, call=call, resource_id=resource_id, status_code=status_code, request_id=request_id)


def _error_detail(body: object, response: httpx2.Response | None, secret: str | None = None) -> str:
    # Mask before cutting to length: a cut through the key would leave a piece no pattern matches.
    if isinstance(body, dict):
        error = body.get("error")
        inner: dict[str, Any] = error if isinstance(error, dict) else body
        message = inner.get("message") or body.get("message")
        if message:
            code = inner.get("errorCode", inner.get("code"))
            return f"{message} (code {code})" if code not in (None, "") else str(message)
    if isinstance(body, str) and body.strip():
        return redact(body.strip(), secret)[:500]
    if response is not None:
        with contextlib.suppress(Exception):
            text = response.text.strip()
            if text:
                return redact(text, secret)[:500]
    return "no error message in the response"


class KlusterHook(BaseHook):
    """Talk to the kluster.ai batch API through an Airflow connection of type ``kluster``.

    The connection's password holds the API key; its host the base URL (default ``https://api.kluster.ai/v1``);
    extras ``timeout`` (seconds per request) and ``max_retries`` (per call, on connection errors, 408, 409,
    429 honouring ``Retry-After``, and 5xx) tune the client.

    :param kluster_conn_id: The Airflow connection to use.
    :param timeout: Override the connection's request timeout.
    :param max_retries: Override the connection's retries per call.
    """

    conn_name_attr = "kluster_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = HOOK_NAME

    def __init__(
        self,
        kluster_conn_id: str = default_conn_name,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kluster_conn_id = kluster_conn_id
        self._timeout = timeout
        self._max_retries = max_retries
        self._async_settings: ClientSettings | None = None

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> KlusterHook:
        """Return a hook that uses ``settings`` as they are, without looking a connection up."""
        hook = cls()
        hook.__dict__["settings"] = settings
        return hook

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Return the connection form layout (Airflow 3.1 reads this; 3.2+ reads the provider info)."""
        return ui_field_behaviour()

    # -- connection and clients ------------------------------------------------------------------------

    @cached_property
    def settings(self) -> ClientSettings:
        """Return the client settings read from the connection (looked up once per hook)."""
        conn = self.get_connection(self.kluster_conn_id)
        return settings_from_connection(conn, timeout=self._timeout, max_retries=self._max_retries)

    async def aget_settings(self) -> ClientSettings:
        """Return the client settings, looking the connection up without blocking the event loop."""
        if "settings" in self.__dict__:
            return self.settings
        if self._async_settings is None:
            key = (self.kluster_conn_id, self._timeout, self._max_retries)
            cached = _ASYNC_SETTINGS.get(key)
            if cached is not None and cached[0] > time.monotonic():
                self._async_settings = cached[1]
            else:
                loop = asyncio.get_running_loop()
                lookup_key = (id(loop), *key)
                lookup = _ASYNC_LOOKUPS.get(lookup_key)
                if lookup is None or lookup.get_loop() is not loop:
                    lookup = _ASYNC_LOOKUPS[lookup_key] = loop.create_task(self._alookup_settings(key))
                    lookup.add_done_callback(lambda done: _forget_lookup(lookup_key, done))
                # Shielded: a wait cancelled meanwhile does not cancel the lookup the others wait for.
                self._async_settings = await asyncio.shield(lookup)
        return self._async_settings

    async def _alookup_settings(self, key: tuple) -> ClientSettings:
        conn = await self._alookup_connection()
        settings = settings_from_connection(conn, timeout=self._timeout, max_retries=self._max_retries)
        _ASYNC_SETTINGS[key] = (time.monotonic() + SETTINGS_TTL, settings)
        return settings

    async def _alookup_connection(self) -> Connection:
        """Look the connection up without blocking the loop, from wherever Airflow keeps it.

        The async lookup does not reach every source everywhere (under ``dag.test()`` it misses the metadata
        database); then the sync lookup runs in a thread, so every source works for every wait.
        """
        aget = getattr(BaseHook, "aget_connection", None)
        if aget is not None:
            try:
                return await aget(self.kluster_conn_id)
            except Exception as exc:
                self.log.debug(
                    "Async lookup of %s failed (%s); looking it up in a thread", self.kluster_conn_id, exc
                )
        return await asyncio.to_thread(self.get_connection, self.kluster_conn_id)

    @cached_property
    def client(self) -> openai.OpenAI:
        """Return the synchronous client (built once per hook)."""
        return self.get_conn()

    def get_conn(self) -> openai.OpenAI:
        """Build a synchronous ``openai.OpenAI`` client pointed at kluster.ai."""
        s = self.settings
        _quiet_request_log()  # the hook logs what each call did; httpx2's line per request only repeats it
        return openai.OpenAI(
            base_url=s.base_url, api_key=s.api_key, timeout=s.timeout, max_retries=s.max_retries
        )

    @cached_property
    def client_without_retries(self) -> openai.OpenAI:
        """Return the synchronous client with the client's own retries off, for calls that create something."""
        return self.client.with_options(max_retries=0)

    def _create_without_duplicates(
        self, create: Callable[[], _T], find_created: Callable[[], _T | None] | None, *, what: str
    ) -> _T:
        """Run a call that creates something, never blindly twice.

        When its outcome is unknown (a transient error: the server may have created it and lost the answer),
        first ask ``find_created`` whether it exists, and reuse it; only then try again (up to the connection's
        ``max_retries`` times). Without ``find_created`` an unknown outcome is not retried at all.
        """
        attempts = self.settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return create()
            except KlusterAPIError as exc:
                if not exc.is_transient:
                    raise
                if find_created is None:
                    exc.message += (
                        f" Not retried: kluster.ai may have created the {what} before the answer was lost; "
                        "check before trying again."
                    )
                    exc.args = (exc.message,)
                    raise
                found = find_created()
                if found is not None:
                    self.log.warning(
                        "The answer to creating a %s was lost (%s), but kluster.ai had created it: reusing it",
                        what,
                        exc.message,
                    )
                    return found
                if attempt == attempts:
                    raise
                delay = min(0.5 * 2 ** (attempt - 1), 8.0)
                self.log.warning(
                    "Creating a %s failed (%s) and nothing was created; trying again in %.1fs (%d of %d)",
                    what,
                    exc.message,
                    delay,
                    attempt + 1,
                    attempts,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _shared_client(self) -> _SharedAsyncClient:
        s = await self.aget_settings()
        loop = asyncio.get_running_loop()
        key = (id(loop), *s.cache_key)
        shared = _ASYNC_CLIENTS.get(key)
        if shared is not None and shared.loop is loop and not shared.client.is_closed():
            return shared
        # Drop clients of loops that are gone so the cache does not grow.
        for stale in [k for k, v in _ASYNC_CLIENTS.items() if v.loop.is_closed()]:
            del _ASYNC_CLIENTS[stale]
        _quiet_request_log()
        shared = _ASYNC_CLIENTS[key] = _SharedAsyncClient.build(key, loop, s)
        return shared

    async def get_async_conn(self) -> openai.AsyncOpenAI:
        """Return an ``openai.AsyncOpenAI`` client, shared by every hook in this event loop with the same settings.

        It stays open until the last :meth:`async_client_lease` of it ends; prefer a lease.
        """
        return (await self._shared_client()).client

    @contextlib.asynccontextmanager
    async def async_client_lease(self) -> AsyncIterator[openai.AsyncOpenAI]:
        """Hold the shared async client for a while (a whole wait); the last holder to let go closes it.

        A triggerer's thousand waits share one client; a wait that runs in an event loop of its own (tests,
        ``dag.test()``) closes its client before its loop ends, so none is left bound to a closed loop.
        """
        shared = await self._shared_client()
        shared.users += 1
        try:
            yield shared.client
        finally:
            await _let_go(shared)

    def _secret(self) -> str | None:
        settings = self.__dict__.get("settings") or self._async_settings
        return settings.api_key if settings else None

    def _error(self, exc: Exception, call: str, resource_id: str | None = None) -> KlusterAPIError:
        return api_error(exc, call=call, resource_id=resource_id, secret=self._secret())

    def _json(
        self,
        method: str,
        path: str,
        *,
        call: str,
        resource_id: str | None = None,
        client: openai.OpenAI | None = None,
        **kw: Any,
    ) -> Any:
        try:
            data = getattr(client or self.client, method)(path, cast_to=object, **kw)
        except (openai.OpenAIError, httpx2.TransportError) as exc:
            error = self._error(exc, call, resource_id)
        except ValueError as exc:  # a body that is not JSON
            error = _malformed(exc, call, resource_id)
        else:
            return _expect_object(data, call, resource_id)
        raise error  # outside the except block: no __context__ (the client's error, its body)

    async def _ajson(
        self, method: str, path: str, *, call: str, resource_id: str | None = None, **kw: Any
    ) -> Any:
        async with self.async_client_lease() as client:
            try:
                data = await getattr(client, method)(path, cast_to=object, **kw)
            except (openai.OpenAIError, httpx2.TransportError) as exc:
                error = self._error(exc, call, resource_id)
            except ValueError as exc:  # a body that is not JSON
                error = _malformed(exc, call, resource_id)
            else:
                return _expect_object(data, call, resource_id)
        raise error  # outside the except block: no __context__ (the client's error, its body)

    # -- connection test and models --------------------------------------------------------------------

    def list_models(self) -> list[str]:
        """Return the ids of every model this key can use, fine-tuned and dedicated ones included."""
        data = self._json("get", "/models", call="list models")
        return [str(m["id"]) for m in data.get("data") or [] if isinstance(m, dict) and m.get("id")]

    def list_models_extended(self) -> list[dict[str, Any]]:
        """Return the raw model objects of ``GET /models?extended=true`` (pricing, limits, context length...).

        Only the dicts of the ``data`` list, as kluster.ai sent them; prices are USD per token.
        """
        data = self._json("get", "/models", call="list models", options={"params": {"extended": "true"}})
        return [m for m in data.get("data") or [] if isinstance(m, dict)]

    def test_connection(self) -> tuple[bool, str]:
        """Check the connection by listing models; say clearly when the key is rejected."""
        try:
            models = self.list_models()
        except KlusterAuthError as exc:
            return (
                False,
                f"kluster.ai rejected the API key (HTTP {exc.status_code}) at {self.settings.base_url}.",
            )
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected to {self.settings.base_url}: {len(models)} models available."

    # -- files -----------------------------------------------------------------------------------------

    def upload_file(
        self,
        path: PathLike,
        purpose: str = "batch",
        *,
        filename: str | None = None,
        find_created: Callable[[], str | None] | None = None,
        multipart_threshold: int | None = None,
        part_size: int = UPLOAD_PART_SIZE,
    ) -> str:
        """Upload a local file or ObjectStoragePath, streamed from a file handle; return the file id.

        An upload whose answer is lost (transient error) is never blindly sent again: ``find_created`` (given
        by the operators, which name uploads after task and input) says whether kluster.ai stored it anyway;
        without it the error is raised. Each attempt re-reads the file from its start, so a dropped connection
        never uploads a truncated file.

        A file larger than ``multipart_threshold`` bytes (default ``None``: never) goes through kluster.ai's
        uploads API instead (``/uploads``, up to 8 GB; the 100 MB limit of ``/files`` does not apply), in
        parts of ``part_size`` bytes (at most 64 MB) streamed from the file handle; see
        :meth:`_upload_multipart` for what is retried.
        """
        source = as_path(path)
        name = filename or source.name
        if multipart_threshold is not None:
            if not 0 < part_size <= UPLOAD_PART_SIZE:
                raise KlusterConfigError(
                    f"part_size must be between 1 and {UPLOAD_PART_SIZE} bytes, got {part_size}."
                )
            size = _size_of(source)
            if size is not None and size > multipart_threshold:
                return self._upload_multipart(source, name, purpose, size, part_size, find_created)
        file_id = self._create_without_duplicates(
            lambda: self._upload_once(source, name, purpose), find_created, what="file upload"
        )
        return file_id

    def _upload_once(self, source: Any, name: str, purpose: str) -> str:
        error: KlusterAPIError | KlusterConfigError | None = None
        try:
            with source.open("rb") as handle:
                response = self.client_without_retries.files.with_raw_response.create(
                    file=(name, handle),
                    purpose=purpose,  # type: ignore[arg-type]
                )
                data = response.http_response.json()
        except (openai.OpenAIError, httpx2.TransportError) as exc:
            error = self._error(exc, "upload file", str(source))
        except FileNotFoundError:
            error = KlusterConfigError(f"Cannot upload {source}: no such file.")
        except ValueError as exc:
            error = _malformed(exc, "upload file", str(source))
        if error is not None:
            raise error  # outside the except block: no __context__ (the client's error, its body)
        data = _expect_object(data, "upload file", str(source))
        if not data.get("id"):
            raise KlusterAPIError(
                f"kluster.ai upload of {source} returned no file id (fields: "
                f"{redact(', '.join(sorted(map(str, data)))[:300], self._secret())}).",
                call="upload file",
                resource_id=str(source),
            )
        self.log.info("Uploaded %s as kluster.ai file %s (%s bytes)", source, data["id"], data.get("bytes"))
        return str(data["id"])

    def _upload_multipart(
        self,
        source: Any,
        name: str,
        purpose: str,
        size: int,
        part_size: int,
        find_created: Callable[[], str | None] | None,
    ) -> str:
        """Upload through ``/uploads`` in parts; return the id of the file the completed upload made.

        What is retried, and why it cannot make two files:

        * creating the upload and sending each part use the client's retries: a retry after a lost answer
          leaves at most an unused upload (it expires after an hour) or an unused part (only the part ids
          named in ``complete`` make up the file). A part is re-read from the file for every attempt.
        * ``complete`` is not retried blindly: after a transient error ``find_created`` (if given) is asked
          whether the file exists, then ``complete`` is sent again **for the same upload with the same
          parts** (never a new upload): an upload completes at most once, so this cannot make a second
          file; the emulator answers a repeated complete with the same file. If the server instead refuses
          the repeat (HTTP 400), the error says that the first attempt may have made the file.
        * on any other failure the upload is cancelled (best effort) so its parts are dropped.

        The MD5 of the whole file, computed while the parts are read, is sent with ``complete``.
        """
        where = str(source)
        created = self._raw_json(
            lambda: self.client.uploads.with_raw_response.create(
                bytes=size,
                filename=name,
                mime_type=UPLOAD_MIME_TYPE,
                purpose=purpose,  # type: ignore[arg-type]
            ),
            "create upload for",
            where,
        )
        upload_id = str(created.get("id") or "")
        if not upload_id:
            raise KlusterAPIError(
                f"kluster.ai returned no upload id for {source}.", call="create upload for", resource_id=where
            )
        count = -(-size // part_size)
        self.log.info(
            "Uploading %s (%d bytes) as kluster.ai upload %s in %d parts", source, size, upload_id, count
        )
        digest = _PrefixDigest()
        part_ids: list[str] = []
        try:
            with source.open("rb") as handle:
                for index, start in enumerate(range(0, size, part_size), start=1):
                    reader = _PartReader(handle, start, min(part_size, size - start), digest)
                    part = self._raw_json(
                        lambda reader=reader: self.client.uploads.parts.with_raw_response.create(  # type: ignore[misc]
                            upload_id, data=(name, reader)
                        ),
                        f"upload part {index} of {count} of",
                        upload_id,
                    )
                    if not part.get("id"):
                        raise KlusterAPIError(
                            f"kluster.ai returned no part id for part {index} of upload {upload_id}.",
                            call="upload part",
                            resource_id=upload_id,
                        )
                    part_ids.append(str(part["id"]))
                    self.log.debug("Sent part %d of %d of upload %s", index, count, upload_id)
            md5 = digest.hexdigest() if digest.upto == size else None
            return self._complete_upload(upload_id, part_ids, md5, where, find_created)
        except FileNotFoundError:
            self._cancel_upload(upload_id)
            raise KlusterConfigError(f"Cannot upload {source}: no such file.") from None
        except BaseException:
            self._cancel_upload(upload_id)
            raise

    def _complete_upload(
        self,
        upload_id: str,
        part_ids: list[str],
        md5: str | None,
        where: str,
        find_created: Callable[[], str | None] | None,
    ) -> str:
        attempts = self.settings.max_retries + 1
        lost_answer = False
        body: dict[str, Any] = {"part_ids": part_ids, **({"md5": md5} if md5 else {})}
        for attempt in range(1, attempts + 1):
            try:
                data = self._raw_json(
                    lambda: self.client_without_retries.uploads.with_raw_response.complete(upload_id, **body),
                    "complete upload",
                    upload_id,
                )
                break
            except KlusterAPIError as exc:
                if not exc.is_transient:
                    if lost_answer:
                        exc.message += (
                            f" An earlier complete of this upload had no answer: kluster.ai may have stored the "
                            f"file of {where} anyway; check its files before uploading again."
                        )
                        exc.args = (exc.message,)
                    raise
                lost_answer = True
                found = find_created() if find_created is not None else None
                if found is not None:
                    self.log.warning(
                        "The answer to completing upload %s was lost (%s), but the file exists: reusing %s",
                        upload_id,
                        exc.message,
                        found,
                    )
                    return found
                if attempt == attempts:
                    raise
                delay = min(0.5 * 2 ** (attempt - 1), 8.0)
                self.log.warning(
                    "Completing upload %s failed (%s); asking again for the same upload in %.1fs (%d of %d)",
                    upload_id,
                    exc.message,
                    delay,
                    attempt + 1,
                    attempts,
                )
                time.sleep(delay)
        file = data.get("file")
        file_id = file.get("id") if isinstance(file, dict) else None
        if not file_id:
            raise KlusterAPIError(
                f"kluster.ai completed upload {upload_id} of {where} but named no file (status "
                f"{redact(str(data.get('status'))[:50], self._secret())}).",
                call="complete upload",
                resource_id=upload_id,
            )
        self.log.info("Uploaded %s as kluster.ai file %s (upload %s)", where, file_id, upload_id)
        return str(file_id)

    def _cancel_upload(self, upload_id: str) -> None:
        """Cancel an unfinished upload, best effort (it expires after an hour anyway)."""
        try:
            self._raw_json(
                lambda: self.client_without_retries.uploads.with_raw_response.cancel(upload_id),
                "cancel upload",
                upload_id,
            )
        except KlusterAPIError as exc:
            self.log.warning("Could not cancel unfinished upload %s: %s", upload_id, exc.message)

    def _raw_json(self, request: Callable[[], Any], call: str, resource_id: str | None) -> Any:
        """Run an SDK ``with_raw_response`` call; return its JSON object, errors mapped like :meth:`_json`."""
        try:
            data = request().http_response.json()
        except (openai.OpenAIError, httpx2.TransportError) as exc:
            error = self._error(exc, call, resource_id)
        except ValueError as exc:  # a body that is not JSON
            error = _malformed(exc, call, resource_id)
        else:
            return _expect_object(data, call, resource_id)
        raise error  # outside the except block: no __context__ (the client's error, its body)

    def get_file(self, file_id: str) -> dict[str, Any]:
        """Return a file object: ``{id, object, bytes, created_at, filename, purpose}``."""
        return self._json("get", f"/files/{file_id}", call="get file", resource_id=file_id)

    def delete_file(self, file_id: str) -> bool:
        """Delete a file; return whether kluster.ai says it was deleted."""
        data = self._json("delete", f"/files/{file_id}", call="delete file", resource_id=file_id)
        return bool(data.get("deleted", data.get("success", True)))

    def download_file(
        self, file_id: str, destination: PathLike, *, chunk_size: int = DOWNLOAD_CHUNK, attempts: int = 5
    ) -> pathlib.Path | ObjectStoragePath:
        """Stream a file's content to ``destination`` atomically, in constant memory; return the destination.

        The bytes go to a temporary sibling first and are renamed into place only when complete, so a failed
        download never leaves a partial file under the destination name. A connection dropped mid-stream is
        resumed with an HTTP ``Range`` request when the server allows it, restarted otherwise.
        """
        dest = as_path(destination)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(dest)
        written = 0
        error: KlusterAPIError | None = None
        try:
            for attempt in range(1, attempts + 1):
                try:
                    written = self._download_into(file_id, tmp, written, chunk_size)
                    break
                except (openai.APIConnectionError, httpx2.TransportError) as exc:
                    if attempt == attempts:
                        error = self._error(exc, "download file", file_id)
                        break
                    written = tmp.stat().st_size if tmp.exists() else 0  # what reached the disk: resume there
                    self.log.warning(
                        "Download of file %s broke after %d bytes (%s); resuming (attempt %d of %d)",
                        file_id,
                        written,
                        type(exc).__name__,
                        attempt + 1,
                        attempts,
                    )
                except openai.OpenAIError as exc:
                    error = self._error(exc, "download file", file_id)
                    break
            if error is not None:
                raise error  # outside the except block: no __context__ (the client's error, its body)
            move_into_place(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError, OSError):
                if tmp.exists():
                    tmp.unlink()
        self.log.info("Downloaded kluster.ai file %s to %s (%d bytes)", file_id, dest, written)
        return dest

    def _download_into(self, file_id: str, tmp: Any, offset: int, chunk_size: int) -> int:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.client.files.with_streaming_response.content(file_id, extra_headers=headers) as response:
            resumed = offset > 0 and response.status_code == 206
            written = offset if resumed else 0
            with tmp.open("ab" if resumed else "wb") as out:
                for chunk in response.iter_bytes(chunk_size):
                    out.write(chunk)
                    written += len(chunk)
            return written

    def iter_file_lines(self, file_id: str) -> Iterator[bytes]:
        """Yield a file's content line by line, streamed (for small files and inspection; prefer download)."""
        try:
            with self.client.files.with_streaming_response.content(file_id) as response:
                yield from response.iter_lines()  # type: ignore[misc]
        except (openai.OpenAIError, httpx2.TransportError) as exc:
            error = self._error(exc, "read file", file_id)
        else:
            return
        raise error  # outside the except block: no __context__ (the client's error, its body)

    # -- batches ---------------------------------------------------------------------------------------

    def create_batch(
        self,
        input_file_id: str,
        *,
        completion_window: str = "24h",
        metadata: dict[str, Any] | None = None,
        kluster_options: dict[str, bool] | None = None,
        endpoint: str = BATCH_ENDPOINT,
        find_created: Callable[[], KlusterBatch | None] | None = None,
    ) -> KlusterBatch:
        """Create a batch over an uploaded request file — never two when an answer is lost.

        A create whose outcome is unknown (transient error, dropped connection, timeout) is not blindly sent
        again: ``find_created`` (the submit operator's: the batch with this try's identity and fingerprint)
        says whether kluster.ai created it anyway, and it is reused; without it the error is raised.

        :param input_file_id: The uploaded JSONL file of requests.
        :param completion_window: ``24h``, ``48h``, ``72h`` or ``asap``.
        :param metadata: Your own string metadata, kept on the batch.
        :param kluster_options: kluster-only switches (``greedy``, ``strict_completion_window``,
            ``remove_input_after_processing``), sent as ``metadata["@kluster.ai"]``.
        :param endpoint: Only ``/v1/chat/completions`` is accepted by kluster.ai.
        :param find_created: Return the batch this call may have created, or ``None``.
        """
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": build_metadata(metadata, kluster_options),
        }

        def create() -> KlusterBatch:
            data = self._json(
                "post",
                "/batches",
                call="create batch on file",
                resource_id=input_file_id,
                body=body,
                client=self.client_without_retries,
            )
            batch = KlusterBatch.from_api(data)
            self.log.info(
                "Created kluster.ai batch %s on file %s (%s)", batch.id, input_file_id, batch.status_text
            )
            return batch

        return self._create_without_duplicates(create, find_created, what="batch")

    def get_batch(self, batch_id: str) -> KlusterBatch:
        """Return a batch, normalized."""
        return KlusterBatch.from_api(
            self._json("get", f"/batches/{batch_id}", call="get batch", resource_id=batch_id)
        )

    async def aget_batch(self, batch_id: str) -> KlusterBatch:
        """Return a batch, normalized, without blocking the event loop.

        This is the one call each poll of a wait makes, a thousand waits of a triggerer making it every few
        seconds: it goes straight to the shared client's connection pool (:meth:`_aget_object`), not through the
        SDK's request building, with the same headers, retries and errors.
        """
        data = await self._aget_object(f"/batches/{batch_id}", call="get batch", resource_id=batch_id)
        return KlusterBatch.from_api(data)

    async def _aget_object(self, path: str, *, call: str, resource_id: str | None = None) -> Any:
        """GET ``path`` on the shared async client's pool; return the JSON object it answers.

        What the SDK would do, minus its per-request machinery (options models, copies, the response wrapper):
        the client's own headers, its timeout and ``max_retries`` retries by the SDK's rules (see
        ``_RETRY_DELAY``), and a final failure mapped by :func:`api_error` like every other call's.
        """
        shared = await self._shared_client()
        shared.users += 1
        try:
            url = shared.base_url + path
            retry = 0
            while True:
                try:
                    response = await shared.http.get(url, headers=shared.headers)
                except (httpx2.RequestError, ssl.SSLError) as exc:  # no answer: connection, timeout, TLS
                    if retry >= shared.max_retries:
                        error = self._error(exc, call, resource_id)
                        break
                    delay, why = _retry_delay(retry, None), type(exc).__name__
                else:
                    if response.is_success:
                        try:
                            data = response.json()
                        except ValueError as exc:  # a body that is not JSON
                            error = _malformed(exc, call, resource_id)
                            break
                        return _expect_object(data, call, resource_id)
                    if retry >= shared.max_retries or not _should_retry(response):
                        error = self._error(_status_error(response), call, resource_id)
                        break
                    delay, why = _retry_delay(retry, response.headers), f"HTTP {response.status_code}"
                retry += 1
                self.log.info(
                    "kluster.ai %s %s failed (%s); retrying in %.1fs (%d of %d)",
                    call,
                    resource_id or "",
                    why,
                    delay,
                    retry,
                    shared.max_retries,
                )
                await asyncio.sleep(delay)
        finally:
            await _let_go(shared)
        raise error  # outside the except block: no __context__ (the response, its body)

    def cancel_batch(self, batch_id: str) -> KlusterBatch:
        """Ask kluster.ai to cancel a batch; it usually answers ``cancelling`` and stops within 10 minutes.

        The body is ``{}``: kluster answered HTTP 500 to a JSON content type with an empty body.
        """
        data = self._json(
            "post", f"/batches/{batch_id}/cancel", call="cancel batch", resource_id=batch_id, body={}
        )
        batch = KlusterBatch.from_api(data)
        self.log.info("Asked kluster.ai to cancel batch %s; it is now %s", batch_id, batch.status_text)
        return batch

    async def acancel_batch(self, batch_id: str) -> KlusterBatch:
        """Cancel a batch without blocking the event loop (see :meth:`cancel_batch`)."""
        data = await self._ajson(
            "post", f"/batches/{batch_id}/cancel", call="cancel batch", resource_id=batch_id, body={}
        )
        batch = KlusterBatch.from_api(data)
        self.log.info("Asked kluster.ai to cancel batch %s; it is now %s", batch_id, batch.status_text)
        return batch

    def iter_batches(self, *, page_size: int = LIST_PAGE_SIZE) -> Iterator[KlusterBatch]:
        """Yield every batch of this key, newest first, following the ``after`` cursor page by page."""
        for item in self._iter_pages("/batches", "list batches", page_size=page_size):
            yield KlusterBatch.from_api(item)

    def iter_files(
        self, *, purpose: str | None = "batch", page_size: int = LIST_PAGE_SIZE
    ) -> Iterator[dict[str, Any]]:
        """Yield the file objects of this key, newest first, page by page."""
        params = {"order": "desc", **({"purpose": purpose} if purpose else {})}
        yield from self._iter_pages("/files", "list files", page_size=page_size, params=params)

    def _iter_pages(
        self, path: str, call: str, *, page_size: int, params: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        after: str | None = None
        seen_cursors: set[str] = set()
        while True:
            query: dict[str, Any] = {**(params or {}), "limit": page_size}
            if after:
                query["after"] = after
            data = self._json("get", path, call=call, options={"params": query})
            items = [item for item in data.get("data") or [] if isinstance(item, dict)]
            yield from items
            last = data.get("last_id") or (items[-1].get("id") if items else None)
            has_more = data.get("has_more")
            if has_more is None:
                has_more = len(items) >= page_size
            if not items or not has_more or not last or last in seen_cursors:
                return
            seen_cursors.add(last)
            after = str(last)

    def list_batches(self, limit: int | None = None) -> list[KlusterBatch]:
        """Return the batches of this key, newest first: all of them, or the first ``limit``."""
        result: list[KlusterBatch] = []
        page_size = min(LIST_PAGE_SIZE, limit) if limit else LIST_PAGE_SIZE
        for batch in self.iter_batches(page_size=max(page_size, 1)):
            if limit is not None and len(result) >= limit:
                break
            result.append(batch)
        return result


def _size_of(source: Any) -> int | None:
    """Size of a local file or ObjectStoragePath in bytes, or ``None`` if unknown (missing: the upload says so)."""
    try:
        return int(source.stat().st_size)
    except Exception:
        return None


class _PrefixDigest:
    """MD5 of a file's bytes fed in order: bytes read again (a retried part) are not hashed twice."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.upto = 0

    def feed(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if offset <= self.upto < end:
            self._md5.update(data[self.upto - offset :])
            self.upto = end

    def hexdigest(self) -> str:
        return self._md5.hexdigest()


class _PartReader(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of an open file, for one multipart-upload part.

    httpx streams it in 64 KB chunks and learns its length from ``seek``/``tell`` (it has no ``fileno``, so
    the whole file's size is never taken for the part's); it rewinds it with ``seek(0)`` for each attempt.
    """

    def __init__(self, handle: Any, start: int, length: int, digest: _PrefixDigest) -> None:
        super().__init__()
        self._handle = handle
        self._start = start
        self._length = length
        self._pos = 0
        self._digest = digest

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        self._handle.seek(self._start + self._pos)
        data = self._handle.read(size)
        self._digest.feed(self._start + self._pos, data)
        self._pos += len(data)
        return bytes(data)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _malformed(exc: Exception, call: str, resource_id: str | None) -> KlusterTransientAPIError:
    target = f"{call} {resource_id}" if resource_id else call
    return KlusterTransientAPIError(
        f"kluster.ai {target} returned a body that is not valid JSON ({exc}); try again later.",
        call=call,
        resource_id=resource_id,
    )


def _expect_object(data: object, call: str, resource_id: str | None) -> Any:
    if not isinstance(data, dict):
        target = f"{call} {resource_id}" if resource_id else call
        raise KlusterTransientAPIError(
            # Say what came back, not what it held: the body may echo the key in any quoting.
            f"kluster.ai {target} returned a JSON {type(data).__name__}, not an object; try again later.",
            call=call,
            resource_id=resource_id,
        )
    return data
