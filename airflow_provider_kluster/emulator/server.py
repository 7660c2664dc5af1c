"""Run the kluster.ai emulator with uvicorn, in a background thread or in the foreground."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from airflow_provider_kluster.emulator.app import CONNECTION_TRANSPORTS
from airflow_provider_kluster.emulator.state import KlusterEmulator

log = logging.getLogger(__name__)


class EmulatorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, registering each connection's transport so a fault can drop it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Register the transport, keyed by ``(server address, client address)``."""
        super().connection_made(transport)
        self._emulator_key = (tuple(self.server or ()), tuple(self.client or ()))
        CONNECTION_TRANSPORTS[self._emulator_key] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the transport."""
        CONNECTION_TRANSPORTS.pop(getattr(self, "_emulator_key", None), None)  # type: ignore[arg-type]
        super().connection_lost(exc)


def make_uvicorn_config(
    emulator: KlusterEmulator,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    timeout_keep_alive: int = 5,
) -> uvicorn.Config:
    """uvicorn settings for serving ``emulator``."""
    return uvicorn.Config(
        emulator.app,
        host=host,
        port=port,
        log_level=log_level,
        http=EmulatorH11Protocol,
        loop="asyncio",
        lifespan="off",
        timeout_keep_alive=timeout_keep_alive,
        timeout_graceful_shutdown=1,
        access_log=False,
    )


class EmulatorServer:
    """Serve a :class:`KlusterEmulator` over HTTP from a background thread.

    :param emulator: the emulator to serve (a new one, built from ``config_overrides``, by default).
    :param host: interface to bind.
    :param port: port to bind; ``0`` picks a free one.
    :param timeout_keep_alive: seconds an idle keep-alive connection stays open.
    :param config_overrides: :class:`~airflow_provider_kluster.emulator.EmulatorConfig` fields for the
        emulator built when ``emulator`` is not given.

    Usage::

        with EmulatorServer(requests_per_second=1000) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)
    """

    def __init__(
        self,
        emulator: KlusterEmulator | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout_keep_alive: int = 5,
        **config_overrides: Any,
    ) -> None:
        if emulator is not None and config_overrides:
            raise TypeError("pass either an emulator or config overrides, not both")
        self._owns_emulator = emulator is None
        self.emulator = emulator if emulator is not None else KlusterEmulator(**config_overrides)
        self.host = host
        self.port = port
        self.timeout_keep_alive = timeout_keep_alive
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>/v1`` (what an OpenAI client's ``base_url`` needs)."""
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """``http://<host>:<port>`` (admin endpoints live under ``/_emulator``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_key(self) -> str:
        """The key the emulator accepts."""
        return self.emulator.config.api_key

    def start(self, timeout: float = 10.0) -> EmulatorServer:
        """Start serving; return once the server accepts connections.

        :raises RuntimeError: if the server does not come up within ``timeout`` seconds.
        """
        if self._thread is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = make_uvicorn_config(
            self.emulator,
            host=self.host,
            port=self.port,
            timeout_keep_alive=self.timeout_keep_alive,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"kluster-emulator-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"kluster emulator failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kluster emulator did not start within {timeout} s")
            time.sleep(0.01)
        log.info("kluster emulator listening on %s", self.base_url)
        return self

    def _run(self) -> None:
        assert self._server is not None
        assert self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # pragma: no cover - reported by start()
            self._error = exc
            log.exception("kluster emulator server crashed")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait for the server thread (forcing exit if it lingers)."""
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
        if self._owns_emulator:
            self.emulator.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
