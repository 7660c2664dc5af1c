"""HTTP layer of the kluster.ai emulator: FastAPI routes plus an ASGI wrapper for counters, faults and auth.

Error envelopes follow the two styles seen from the real service:

* ``{"error": {"message": ..., "errorCode": 4000, "type": "invalid_request_error"}}`` for auth and
  validation errors (:func:`kluster_error`);
* ``{"message": ..., "errorCode": -1}`` for 404s, 500s and injected 5xx (:func:`plain_error`).

Admin endpoints (no authentication; not counted):

* ``GET /_emulator/faults`` — ``{rules, stuck, fail_share, cancel_delay, transient_share, transient_repeats,
  lost_share, lost_repeats, stall_after, stalled}``;
* ``PUT /_emulator/faults`` — a rule object (``{"route", "status", "times", "rate", "retry_after",
  "latency", "drop_connection", "malformed_body", "message", "after_commit"}``, appended), a list of
  rules (appended), or a full document with any of the keys above (replaces the rules, stuck and stalled
  batches unless ``?replace=false``; ``stalled`` maps a batch id, ``"*"`` or ``"next"`` to a request count). ``"after_commit": true`` runs the route first and only
  then replaces its answer by the fault (see :class:`~airflow_provider_kluster.emulator.faults.FaultRule`);
* ``DELETE /_emulator/faults`` — clear all faults;
* ``GET /_emulator/counters`` — request counters;
* ``POST /_emulator/reset`` — forget files, batches, faults and counters;
* ``GET /_emulator/batches/{id}`` — the batch object;
* ``POST /_emulator/batches/{id}/status`` with ``{"status": "failed"}`` — force a status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Match

from airflow_provider_kluster.emulator.completions import (
    CHAT_COMPLETIONS_URL,
    build_completion,
    validate_chat_body,
)
from airflow_provider_kluster.emulator.faults import FaultRule, normalize_route
from airflow_provider_kluster.emulator.models import extended_model_json, plain_model_json
from airflow_provider_kluster.emulator.state import ALL_STATUSES, ALLOWED_WINDOWS, UploadError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from airflow_provider_kluster.emulator.state import KlusterEmulator

log = logging.getLogger(__name__)

#: Transports of live connections, keyed by ``(server address, client address)``; filled by
#: :class:`airflow_provider_kluster.emulator.server.EmulatorH11Protocol` so a fault can drop a connection.
CONNECTION_TRANSPORTS: dict[tuple[Any, Any], asyncio.Transport] = {}

_COPY_CHUNK = 1024 * 1024
_MULTIPART_OVERHEAD = 64 * 1024


def kluster_error(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: int = 4000,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A ``{"error": {"message", "errorCode", "type"}}`` response."""
    body = {"error": {"message": message, "errorCode": code, "type": error_type}}
    return JSONResponse(body, status_code=status, headers=headers)


def plain_error(status: int, message: str, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """A ``{"message", "errorCode": -1}`` response."""
    return JSONResponse({"message": message, "errorCode": -1}, status_code=status, headers=headers)


def _bad_request(message: str) -> JSONResponse:
    return kluster_error(400, message)


class EmulatorMiddleware:
    """Outer ASGI layer: counts requests per route, injects faults, then checks the bearer key.

    A fault normally answers instead of the route. An ``after_commit`` fault lets the request through
    (auth check and route run, their answer is swallowed) and then answers with the fault, or drops the
    connection, as if the response had been lost on the way back.
    """

    def __init__(self, app: FastAPI, emulator: KlusterEmulator) -> None:
        self.app = app
        self.emulator = emulator

    def _route_key(self, scope: Scope) -> str:
        method = scope["method"].upper()
        partial = None
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return normalize_route("{} {}".format(method, getattr(route, "path", scope["path"])))
            if match == Match.PARTIAL and partial is None:
                partial = getattr(route, "path", None)
        return normalize_route("{} {}".format(method, partial or scope["path"]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        key = self._route_key(scope)
        self.emulator.count(key)
        rule = self.emulator.faults.pick(scope["method"], key, scope["path"])
        if rule is not None:
            log.info("injecting fault %s on %s", rule.id, key)
            if rule.latency:
                await asyncio.sleep(rule.latency)
            if rule.after_commit and rule.replaces_response:
                await self._handle_and_discard(scope, receive)
            if rule.drop_connection:
                await self._drop(scope, send)
                return
            response = self._fault_response(rule)
            if response is not None:
                await response(scope, receive, send)
                return
        await self._handle(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the bearer key, then run the route."""
        if not self._authorised(scope):
            await kluster_error(401, "Invalid API key")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _handle_and_discard(self, scope: Scope, receive: Receive) -> None:
        """Handle the request normally (state changes happen) but throw its response away."""
        status: list[int] = []

        async def swallow(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))

        try:
            await self._handle(scope, receive, swallow)
        except Exception:
            # the route's own answer is replaced anyway; report the crash and still inject the fault
            log.exception("route crashed under an after_commit fault")
        log.info("after_commit: discarded the route's answer (status %s)", status[0] if status else None)

    def _authorised(self, scope: Scope) -> bool:
        expected = f"Bearer {self.emulator.config.api_key}"
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value.decode("latin-1").strip().encode(), expected.encode())
        return False

    @staticmethod
    def _fault_response(rule: FaultRule) -> Response | None:
        headers = {}
        if rule.retry_after is not None:
            value = rule.retry_after
            headers["Retry-After"] = str(int(value)) if float(value).is_integer() else str(value)
        if rule.malformed_body:
            return Response(
                b'{"id": "67533f6d1d7be1b5a7507be5", "object": "batch", "status": ',
                status_code=rule.status or 200,
                media_type="application/json",
                headers=headers,
            )
        if rule.status is None:
            return None
        try:
            phrase = HTTPStatus(rule.status).phrase
        except ValueError:
            phrase = "Error"
        message = rule.message or f"{phrase} (injected by the kluster emulator)"
        if rule.status == 429:
            return kluster_error(429, message, error_type="rate_limit_error", code=4290, headers=headers)
        if rule.status < 500:
            return kluster_error(rule.status, message, headers=headers)
        return plain_error(rule.status, message, headers=headers)

    @staticmethod
    async def _drop(scope: Scope, send: Send) -> None:
        """Close the connection without any response."""
        transport = CONNECTION_TRANSPORTS.get(
            (tuple(scope.get("server") or ()), tuple(scope.get("client") or ())),
        )
        if transport is not None:
            transport.abort()
            # let the server notice the disconnection so it does not try to answer
            await asyncio.sleep(0.01)
            return
        # Fallback for other servers: promise a body, send part of it, and abort.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
            },
        )
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise ConnectionAbortedError("connection dropped by the kluster emulator")


def create_app(emulator: KlusterEmulator) -> ASGIApp:
    """Build the ASGI app serving ``emulator``."""
    api = FastAPI(
        title="kluster.ai emulator", docs_url="/_emulator/docs", openapi_url="/_emulator/openapi.json"
    )
    _add_error_handlers(api)
    _add_file_routes(api, emulator)
    _add_upload_routes(api, emulator)
    _add_batch_routes(api, emulator)
    _add_model_routes(api, emulator)
    _add_admin_routes(api, emulator)
    return EmulatorMiddleware(api, emulator)


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return plain_error(404, f"Not found: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return plain_error(405, "Method not allowed")
        return plain_error(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _bad_request(f"Invalid request: {exc.errors()[:3]}")

    @api.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:  # pragma: no cover - safety net
        log.error("emulator route crashed")
        return plain_error(500, "Internal server error")


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


def _page(items: list[Any], after: str | None, limit: int, key: Any) -> tuple[list[Any], bool]:
    if after:
        ids = [key(i) for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


def _add_file_routes(api: FastAPI, emulator: KlusterEmulator) -> None:
    @api.post("/v1/files")
    async def upload_file(request: Request) -> Response:
        limit = emulator.config.max_file_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + _MULTIPART_OVERHEAD:
            return _bad_request(f"File too large: the limit is {limit} bytes.")
        try:
            form = await request.form(max_files=2, max_fields=20)
        except Exception as exc:
            return _bad_request(f"Could not parse the multipart body: {exc}")
        try:
            upload = form.get("file")
            purpose = form.get("purpose")
            if not isinstance(upload, UploadFile):
                return _bad_request("A multipart 'file' field is required.")
            if not isinstance(purpose, str) or not purpose:
                return _bad_request("'purpose' is required.")
            if purpose != "batch":
                return _bad_request(f"Invalid purpose {purpose!r}: only 'batch' is supported.")
            file_id, dest, server_name = emulator.new_upload_target(upload.filename)
            size = 0
            try:
                with open(dest, "wb") as fh:
                    while True:
                        chunk = await upload.read(_COPY_CHUNK)
                        if not chunk:
                            break
                        size += len(chunk)
                        if size > limit:
                            raise OverflowError
                        fh.write(chunk)
            except OverflowError:
                emulator.discard_upload(dest)
                return _bad_request(f"File too large: the limit is {limit} bytes.")
            rec = emulator.register_file(file_id, dest, filename=server_name, purpose=purpose)
            emulator.count("files_uploaded")
            return JSONResponse(emulator.file_json(rec))
        finally:
            await form.close()

    @api.get("/v1/files")
    async def list_files(request: Request) -> Response:
        try:
            limit = _int_param(request, "limit", 10000, 1, 10000)
        except ValueError as exc:
            return _bad_request(str(exc))
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            return _bad_request("order must be 'asc' or 'desc'")
        files = emulator.list_files()
        purpose = request.query_params.get("purpose")
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        if order == "desc":
            files.reverse()
        data, has_more = _page(files, request.query_params.get("after"), limit, lambda f: f.id)
        return JSONResponse(
            {
                "object": "list",
                "data": [emulator.file_json(f) for f in data],
                "first_id": data[0].id if data else None,
                "last_id": data[-1].id if data else None,
                "has_more": has_more,
            },
        )

    @api.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        rec = emulator.get_file(file_id)
        if rec is None:
            return plain_error(404, f"File {file_id} not found")
        return JSONResponse(emulator.file_json(rec))

    @api.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        if not emulator.delete_file(file_id):
            return plain_error(404, f"File {file_id} not found")
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @api.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        rec = emulator.get_file(file_id)
        if rec is None or not rec.path.exists():
            return plain_error(404, f"File {file_id} not found")
        # FileResponse streams from disk in chunks and honours Range / If-Range (206, 416).
        return FileResponse(
            rec.path, media_type="application/octet-stream", content_disposition_type="attachment"
        )


def _add_upload_routes(api: FastAPI, emulator: KlusterEmulator) -> None:
    """``/v1/uploads``: create, add parts (multipart field ``data``, streamed to disk), complete, cancel."""

    def refused(exc: UploadError) -> Response:
        return kluster_error(
            400, str(exc), error_type="expired" if exc.code == "expired" else "invalid_request_error"
        )

    @api.post("/v1/uploads")
    async def create_upload(request: Request) -> Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        if not isinstance(body, dict):
            return _bad_request("The request body must be a JSON object.")
        try:
            rec = emulator.create_upload(
                bytes=body.get("bytes"),
                filename=body.get("filename"),
                mime_type=body.get("mime_type"),
                purpose=body.get("purpose"),
            )
        except UploadError as exc:
            return refused(exc)
        return JSONResponse(emulator.upload_json(rec))

    @api.post("/v1/uploads/{upload_id}/parts")
    async def add_part(upload_id: str, request: Request) -> Response:
        limit = emulator.config.max_part_bytes
        too_large = f"Part too large: the limit is {limit} bytes per part."
        try:
            part_id, dest = emulator.new_part_target(upload_id)
        except KeyError:
            return plain_error(404, f"Upload {upload_id} not found")
        except UploadError as exc:
            return refused(exc)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + _MULTIPART_OVERHEAD:
            return _bad_request(too_large)
        try:
            form = await request.form(max_files=2, max_fields=20)
        except Exception as exc:
            return _bad_request(f"Could not parse the multipart body: {exc}")
        try:
            data = form.get("data")
            if not isinstance(data, UploadFile):
                return _bad_request("A multipart 'data' field is required.")
            size = 0
            try:
                with open(dest, "wb") as fh:
                    while chunk := await data.read(_COPY_CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise OverflowError
                        fh.write(chunk)
            except OverflowError:
                dest.unlink(missing_ok=True)
                return _bad_request(too_large)
        finally:
            await form.close()
        try:
            part = emulator.register_part(upload_id, part_id, dest)
        except KeyError:
            return plain_error(404, f"Upload {upload_id} not found")
        except UploadError as exc:
            return refused(exc)
        return JSONResponse(emulator.part_json(part))

    @api.post("/v1/uploads/{upload_id}/complete")
    async def complete_upload(upload_id: str, request: Request) -> Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        if not isinstance(body, dict):
            return _bad_request("The request body must be a JSON object with 'part_ids'.")
        try:
            # joining up to 8 GB of parts: off the event loop
            rec = await asyncio.to_thread(
                emulator.complete_upload, upload_id, body.get("part_ids"), body.get("md5")
            )
        except KeyError:
            return plain_error(404, f"Upload {upload_id} not found")
        except UploadError as exc:
            return refused(exc)
        return JSONResponse(emulator.upload_json(rec))

    @api.post("/v1/uploads/{upload_id}/cancel")
    async def cancel_upload(upload_id: str) -> Response:
        try:
            rec = emulator.cancel_upload(upload_id)
        except KeyError:
            return plain_error(404, f"Upload {upload_id} not found")
        except UploadError as exc:
            return refused(exc)
        return JSONResponse(emulator.upload_json(rec))


async def _json_body(request: Request) -> tuple[Any, Response | None]:
    raw = await request.body()
    if not raw.strip():
        return None, None
    try:
        return json.loads(raw), None
    except ValueError:
        return None, _bad_request("The request body is not valid JSON.")


def _add_batch_routes(api: FastAPI, emulator: KlusterEmulator) -> None:
    @api.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        if not isinstance(body, dict):
            return _bad_request("The request body must be a JSON object.")
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        metadata = body.get("metadata")
        if not isinstance(input_file_id, str) or not input_file_id:
            return _bad_request("input_file_id is required.")
        if endpoint != CHAT_COMPLETIONS_URL:
            return _bad_request(f"Invalid endpoint {endpoint!r}: only {CHAT_COMPLETIONS_URL} is supported.")
        if window not in ALLOWED_WINDOWS:
            return _bad_request(f"Invalid completion_window {window!r}: use 24h, 48h or 72h.")
        if metadata is not None and not isinstance(metadata, dict):
            return _bad_request("metadata must be an object or null.")
        if metadata is not None and len(metadata) > 16:
            return _bad_request("metadata may have at most 16 keys.")
        if emulator.get_file(input_file_id) is None:
            return plain_error(404, f"Input file {input_file_id} not found")
        batch = emulator.create_batch(input_file_id, endpoint, window, metadata)
        return JSONResponse(emulator.batch_json(batch))

    @api.get("/v1/batches")
    async def list_batches(request: Request) -> Response:
        try:
            limit = _int_param(request, "limit", 20, 1, 100)
        except ValueError as exc:
            return _bad_request(str(exc))
        batches = emulator.list_batches()
        status = request.query_params.get("status")
        if status:
            if status.lower() not in ALL_STATUSES:
                return _bad_request(f"Invalid status {status!r}.")
            batches = [b for b in batches if b.status == status.lower()]
        data, has_more = _page(batches, request.query_params.get("after"), limit, lambda b: b.id)
        payload: dict[str, Any] = {
            "object": "list",
            "data": [emulator.batch_json(b) for b in data],
            "first_id": data[0].id if data else None,
            "last_id": data[-1].id if data else None,
            "has_more": has_more,
        }
        if emulator.config.timestamps == "kluster":
            payload.update(count=len(data), page=1, page_count=-1, items_per_page=9223372036854775807)
        return JSONResponse(payload)

    @api.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> Response:
        emulator.note_poll(batch_id)
        batch = emulator.get_batch(batch_id)
        if batch is None:
            return plain_error(404, f"Batch {batch_id} not found")
        return JSONResponse(emulator.batch_json(batch))

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> Response:
        raw = await request.body()
        content_type = request.headers.get("content-type", "")
        if emulator.config.empty_json_body_500 and "application/json" in content_type and not raw:
            # Quirk of the real service: JSON content type with an empty body → HTTP 500.
            return plain_error(500, "Unexpected end of JSON input")
        try:
            batch = emulator.cancel_batch(batch_id)
        except KeyError:
            return plain_error(404, f"Batch {batch_id} not found")
        except ValueError as exc:
            return _bad_request(str(exc))
        return JSONResponse(emulator.batch_json(batch))

    @api.delete("/v1/batches/{batch_id}/delete")
    async def delete_batch(batch_id: str, request: Request) -> Response:
        delete_files = request.query_params.get("deleteFiles", "false").lower() in ("1", "true", "yes")
        if not emulator.delete_batch(batch_id, delete_files=delete_files):
            return plain_error(404, f"Batch {batch_id} not found")
        return JSONResponse({"success": True})


def _add_model_routes(api: FastAPI, emulator: KlusterEmulator) -> None:
    model_json = plain_model_json

    @api.get("/v1/models")
    async def list_models(request: Request) -> Response:
        extended = request.query_params.get("extended", "").lower() in ("1", "true", "yes")
        models = emulator.models
        if not extended:
            return JSONResponse({"object": "list", "data": [model_json(m) for m in models]})
        prices = emulator.config.prices
        data = [extended_model_json(m, prices=prices, default=i == 0) for i, m in enumerate(models)]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        if model_id not in emulator.models:
            return plain_error(404, f"Model {model_id} not found")
        return JSONResponse(model_json(model_id))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        problem = validate_chat_body(body)
        if problem is not None:
            return _bad_request(f"{problem[1]} ({problem[0]})")
        if body.get("stream"):
            return _bad_request("Streaming is not supported by the emulator.")
        if body["model"] not in emulator.models:
            return plain_error(404, "The model `{}` does not exist.".format(body["model"]))
        return JSONResponse(build_completion(body, created=int(time.time())))


def _add_admin_routes(api: FastAPI, emulator: KlusterEmulator) -> None:
    @api.get("/_emulator/faults")
    async def get_faults() -> Response:
        return JSONResponse(emulator.faults.to_dict())

    @api.put("/_emulator/faults")
    async def put_faults(request: Request) -> Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        try:
            if isinstance(body, list):
                for item in body:
                    emulator.faults.configure(item)
            elif isinstance(body, dict):
                emulator.faults.configure(
                    body, replace=request.query_params.get("replace", "true") != "false"
                )
            else:
                return _bad_request(
                    "Send a rule object, a list of rules or {rules, stuck, fail_share, cancel_delay}."
                )
        except (TypeError, ValueError) as exc:
            return _bad_request(str(exc))
        return JSONResponse(emulator.faults.to_dict())

    @api.delete("/_emulator/faults")
    async def delete_faults() -> Response:
        emulator.faults.clear()
        return JSONResponse(emulator.faults.to_dict())

    @api.get("/_emulator/counters")
    async def get_counters() -> Response:
        return JSONResponse(emulator.counters)

    @api.post("/_emulator/reset")
    async def reset() -> Response:
        emulator.reset()
        return JSONResponse({"reset": True})

    @api.get("/_emulator/batches/{batch_id}")
    async def raw_batch(batch_id: str) -> Response:
        try:
            return JSONResponse(emulator.get_batch_raw(batch_id))
        except KeyError:
            return plain_error(404, f"Batch {batch_id} not found")

    @api.post("/_emulator/batches/{batch_id}/status")
    async def force_status(batch_id: str, request: Request) -> Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            return _bad_request('Send {"status": "<status>"}.')
        try:
            return JSONResponse(emulator.set_batch_status(batch_id, body["status"]))
        except KeyError:
            return plain_error(404, f"Batch {batch_id} not found")
        except ValueError as exc:
            return _bad_request(str(exc))
