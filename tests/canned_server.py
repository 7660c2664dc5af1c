"""A loopback HTTP server that answers fixed bodies per route: for wire forms the emulator never produces.

The published kluster.ai examples (verbatim, including the invalid-JSON list response) are served through it
so the hook parses exactly what the docs show, over real HTTP.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int] = ("", 0)  # the client's address: one port per TCP connection


@dataclass
class CannedServer:
    routes: dict[tuple[str, str], tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    #: HTTP/1.1 with keep-alive (connections reused, as kluster's are) instead of one connection per request.
    keep_alive: bool = False
    #: Seconds each answer takes.
    delay: float = 0.0

    def add(self, method: str, path: str, body: bytes | str, status: int = 200, **headers: str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.routes[(method, path)] = (status, data, {"Content-Type": "application/json", **headers})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> CannedServer:
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if canned.keep_alive else "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                canned.requests.append(
                    Recorded(self.command, self.path, dict(self.headers), body, tuple(self.client_address))
                )
                if canned.delay:
                    time.sleep(canned.delay)
                status, data, headers = canned.routes.get(
                    (self.command, path), (404, b'{"message": "no canned route", "errorCode": -1}', {})
                )
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
