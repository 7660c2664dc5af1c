"""kluster.ai batch adapter for Airflow's common.ai provider (``LLMBatchOperator``, ``@task.llm_batch``).

Registered for the ``kluster`` model prefix through the ``airflow.providers.common.ai.batch_adapters`` entry
point, so ``model_id="kluster:klusterai/Meta-Llama-3.3-70B-Instruct-Turbo"`` routes a common.ai batch here. Every
call goes through :class:`~airflow_provider_kluster.hooks.kluster.KlusterHook`: its error mapping (provider
exceptions naming the call, 404s carrying ``status_code``), key redaction, lost-answer protection on upload and
create, and the ``{}`` cancel body.

**Which connection.** common.ai's ``llm_conn_id`` names an Airflow connection of type ``kluster`` (e.g.
``kluster_default``); common.ai checks the type against :attr:`KlusterBatchAdapter.conn_types`. common.ai builds
an adapter from that connection's password and host only (``adapter_cls(api_key=..., base_url=...)``); this
adapter recognises the connection common.ai's dispatch is building it from and hands its id to
``KlusterHook``, which reads the whole connection (host, port, path, extras ``timeout``, ``max_retries``,
``base_url``). Outside dispatch, pass ``kluster_conn_id`` (default ``kluster_default``) or ``hook``.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.ai.batch.base import (  # type: ignore[import-not-found,unused-ignore]
    BatchAdapter,
    BatchState,
    ExtractedOutput,
    RawResultItem,
    SubmitResult,
)
from airflow.providers.common.ai.exceptions import (  # type: ignore[import-not-found,unused-ignore]
    LLMBatchInputError,
    LLMBatchLimitExceededError,
    LLMBatchModelMismatchError,
)

from airflow_provider_kluster.batches import BATCH_ENDPOINT, COMPLETION_WINDOWS, BatchStatus, KlusterBatch
from airflow_provider_kluster.connection import CONN_TYPE, DEFAULT_CONN_ID
from airflow_provider_kluster.exceptions import KlusterRequestFileError
from airflow_provider_kluster.hooks.kluster import KlusterHook  # noqa: TID251 - the adapter wires the hook in
from airflow_provider_kluster.reattach import (
    DEFAULT_SCAN_LIMIT,
    IDENTITY_KEY,
    find_uploads,
    identity_from_context,
    upload_name,
)
from airflow_provider_kluster.request_files import DEFAULT_MAX_REQUESTS, MAX_FILE_BYTES, write_request_file
from airflow_provider_kluster.results import parse_result_line

if TYPE_CHECKING:
    from airflow.providers.common.ai.batch.base import (  # type: ignore[import-not-found,unused-ignore]
        BatchRequest,
    )
    from airflow.providers.common.ai.batch.base import (  # type: ignore[import-not-found,unused-ignore]
        BatchStatus as CommonStatus,
    )
    from airflow.providers.common.ai.batch.output_schema import (  # type: ignore[import-not-found,unused-ignore]
        OutputSpec,
    )

log = logging.getLogger(__name__)

__all__ = ["IDEMPOTENCY_KEY", "INPUT_FINGERPRINT_KEY", "KlusterBatchAdapter"]

#: Batch metadata keys recording common.ai's identity of the task instance and of its input (what
#: :meth:`KlusterBatchAdapter.find_orphaned_batch` reads back; the same keys common.ai's OpenAI adapter uses).
IDEMPOTENCY_KEY = "idempotency_key"
INPUT_FINGERPRINT_KEY = "input_fingerprint"
#: Marks batches submitted through common.ai (kluster's batch list tells them from the provider's own).
SUBMITTED_BY_KEY = "airflow_submitted_by"
SUBMITTED_BY = "common.ai"

#: kluster's batch ``created_at`` is whole seconds and its clock may differ from Airflow's.
_CLOCK_SKEW = dt.timedelta(minutes=5)
#: Newest batches looked at when the answer to a create was lost (the batch, if any, is seconds old).
_LOST_CREATE_SCAN = 100
_DISPATCH_MODULE = "airflow.providers.common.ai.batch.dispatch"
_DISPATCH_FUNCTION = "build_adapter_from_connection"
_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(?P<body>.*?)\n?\s*```\s*$", re.DOTALL)

#: kluster statuses collapsed to common.ai's five; an unknown status (``None``) counts as still running.
_STATUS_MAP: dict[BatchStatus | None, CommonStatus] = {
    BatchStatus.PRE_SCHEDULE: "in_progress",
    BatchStatus.VALIDATING: "in_progress",
    BatchStatus.IN_PROGRESS: "in_progress",
    BatchStatus.FINALIZING: "in_progress",
    BatchStatus.CANCELLING: "in_progress",
    BatchStatus.COMPLETED: "completed",
    BatchStatus.FAILED: "failed",
    BatchStatus.EXPIRED: "expired",
    BatchStatus.CANCELLED: "cancelled",
}
_ItemStatus = Literal["success", "errored", "expired", "cancelled"]
_NEVER_RAN_CODES: dict[str, _ItemStatus] = {"batch_expired": "expired", "batch_cancelled": "cancelled"}


class KlusterBatchAdapter(BatchAdapter):  # type: ignore[misc,unused-ignore]
    """common.ai's batch adapter for kluster.ai, built on :class:`KlusterHook`.

    :param api_key: What common.ai's dispatch passes (the connection's password); used only when the
        connection it came from cannot be recognised and no ``kluster_conn_id`` is given.
    :param base_url: What dispatch passes (the connection's host), used with ``api_key``.
    :param client: Unused (common.ai's signature); give ``hook`` instead.
    :param kluster_conn_id: The ``kluster`` connection to use outside dispatch (default ``kluster_default``).
    :param hook: A ready hook (tests, callers who already hold one).
    """

    name = "kluster"
    conn_types = frozenset({CONN_TYPE})
    #: The Core plan's per-batch limit; larger plans: split with ``.expand()`` anyway, or use the job operator.
    max_requests = DEFAULT_MAX_REQUESTS
    #: kluster's per-file upload limit for ``/files``.
    max_payload_bytes = MAX_FILE_BYTES
    allows_per_request_model = False

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        client: Any | None = None,
        kluster_conn_id: str | None = None,
        hook: KlusterHook | None = None,
    ) -> None:
        self._client = None
        if hook is None:
            conn_id = kluster_conn_id or _dispatched_conn_id(api_key)
            if conn_id is None and api_key:
                hook = _hook_from_credentials(api_key, base_url)
            else:
                hook = KlusterHook(conn_id or DEFAULT_CONN_ID)
        self.hook = hook

    # -- requests ----------------------------------------------------------------------------------------

    def build_output_directive(self, spec: OutputSpec) -> dict[str, Any]:
        """Return the structured-output instruction (kluster's batch API refuses ``response_format``).

        The schema goes into the system message of every request; an answer that does not match lands as an
        ``invalid_output`` row, exactly as a schema mismatch does on the other providers.
        """
        if not spec.is_structured:
            return {}
        schema = json.dumps(spec.json_schema, separators=(",", ":"), sort_keys=True)
        return {
            "system_instruction": (
                "Answer with a single JSON value and nothing else (no prose, no code fences). "
                f"It must validate against this JSON Schema: {schema}"
            )
        }

    def _lines(
        self,
        requests: list[BatchRequest],
        *,
        model: str,
        idempotency_key: str,
        directive: dict[str, Any],
        system_prompt: str,
        max_tokens: int,
        request_params: dict[str, Any] | None,
    ) -> Iterator[dict[str, Any]]:
        instruction = directive.get("system_instruction")
        for index, request in enumerate(requests):
            system = request.get("system_prompt") or system_prompt
            if instruction:
                system = f"{system}\n\n{instruction}" if system else instruction
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": request["prompt"]})
            bare = self.resolve_request_model(
                request.get("model"), default_bare_model=model, request_index=index
            )
            # The managed keys last, so request_params cannot replace the model, the prompt or the cap.
            body: dict[str, Any] = {
                **(request_params or {}),
                **(request.get("params") or {}),
                "model": bare,
                "messages": messages,
                "max_completion_tokens": request.get("max_tokens") or max_tokens,
            }
            body.pop("max_tokens", None)
            yield {
                "custom_id": f"{idempotency_key}-{index}",
                "method": "POST",
                "url": BATCH_ENDPOINT,
                "body": body,
            }

    def _write(self, lines: Iterator[dict[str, Any]], path: Path) -> int:
        """Write and check the request file with kluster's own rules; return its size in bytes."""
        try:
            summary = write_request_file(lines, path)
        except KlusterRequestFileError as exc:
            raise LLMBatchInputError(f"kluster.ai would refuse this batch: {exc}") from None
        return summary.bytes

    def validate_requests(
        self,
        requests: list[BatchRequest],
        *,
        model: str,
        output_spec: OutputSpec,
        idempotency_key: str,
        system_prompt: str = "",
        max_tokens: int = 1024,
        request_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Refuse, before any call, what kluster.ai would: too many requests, too large, bad lines, mixed models."""
        self.check_custom_id_length(idempotency_key, len(requests))
        if len(requests) > self.max_requests:
            raise LLMBatchLimitExceededError(
                f"kluster.ai batches hold at most {self.max_requests} requests on the Core plan; got "
                f"{len(requests)}. Split the input with .expand() so each task submits fewer."
            )
        models = {
            self.resolve_request_model(r.get("model"), default_bare_model=model, request_index=i)
            for i, r in enumerate(requests)
        }
        if len(models) > 1:
            raise LLMBatchModelMismatchError(
                f"The kluster adapter sends one model per batch; got {len(models)} ({sorted(models)!r})."
            )
        lines = self._lines(
            requests,
            model=model,
            idempotency_key=idempotency_key,
            directive=self.build_output_directive(output_spec),
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            request_params=request_params,
        )
        with tempfile.TemporaryDirectory(prefix="kluster-common-ai-") as tmp:
            size = self._write(lines, Path(tmp) / "requests.jsonl")
        if size > self.max_payload_bytes:
            raise LLMBatchLimitExceededError(
                f"kluster.ai accepts request files of at most {self.max_payload_bytes} bytes; this batch is "
                f"{size} bytes. Split the input with .expand()."
            )

    # -- the batch ---------------------------------------------------------------------------------------

    def submit(
        self,
        requests: list[BatchRequest],
        *,
        model: str,
        idempotency_key: str,
        input_fingerprint: str,
        output_spec: OutputSpec,
        system_prompt: str = "",
        max_tokens: int = 1024,
        request_params: dict[str, Any] | None = None,
        completion_window: str = "24h",
        **kwargs: Any,
    ) -> SubmitResult:
        """Upload the request file and create the batch, never twice when an answer is lost.

        The file is named after common.ai's key and fingerprint, and the batch carries both in its metadata
        (and this provider's task identity, when a task is running): a lost answer to the upload or the create
        is resolved by finding what kluster.ai made, and :meth:`find_orphaned_batch` finds the batch again.
        """
        if completion_window not in COMPLETION_WINDOWS:
            raise LLMBatchInputError(
                f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)} on kluster.ai; "
                f"got {completion_window!r}."
            )
        fingerprint16 = input_fingerprint[:16]
        metadata = {
            IDEMPOTENCY_KEY: idempotency_key,
            INPUT_FINGERPRINT_KEY: fingerprint16,
            SUBMITTED_BY_KEY: SUBMITTED_BY,
            **_task_identity(),
        }
        name = upload_name(idempotency_key, input_fingerprint)
        lines = self._lines(
            requests,
            model=model,
            idempotency_key=idempotency_key,
            directive=self.build_output_directive(output_spec),
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            request_params=request_params,
        )
        hook = self.hook
        with tempfile.TemporaryDirectory(prefix="kluster-common-ai-") as tmp:
            path = Path(tmp) / name
            self._write(lines, path)
            file_id = hook.upload_file(
                path,
                find_created=lambda: (
                    find_uploads(
                        hook, idempotency_key, input_fingerprint, scan_limit=DEFAULT_SCAN_LIMIT
                    ).match
                ),
            )

        def find_created() -> KlusterBatch | None:
            for scanned, batch in enumerate(hook.iter_batches(), start=1):
                if (
                    batch.input_file_id == file_id
                    and batch.metadata.get(IDEMPOTENCY_KEY) == idempotency_key
                    and batch.metadata.get(INPUT_FINGERPRINT_KEY) == fingerprint16
                ):
                    return batch
                if scanned >= _LOST_CREATE_SCAN:
                    break
            return None

        batch = hook.create_batch(
            file_id, completion_window=completion_window, metadata=metadata, find_created=find_created
        )
        return SubmitResult(batch_id=batch.id, provider_input_ref=file_id)

    def get_batch(self, batch_id: str) -> BatchState:
        """Return the batch's status in common.ai's terms (``cancelling`` and unknown statuses: still running)."""
        batch = self.hook.get_batch(batch_id)
        status: CommonStatus = _STATUS_MAP.get(batch.status, "in_progress")
        rc = batch.request_counts
        counts = None
        if rc.total or rc.done:
            # Progress counters, not a split: once expired or cancelled, what never ran takes that status.
            remainder = max(rc.total - rc.done, 0)
            counts = {
                "succeeded": rc.completed,
                "errored": rc.failed,
                "expired": remainder if status == "expired" else 0,
                "cancelled": remainder if status == "cancelled" else 0,
            }
        return BatchState(status=status, counts=counts, error_message="; ".join(batch.errors) or None)

    def cancel_batch(self, batch_id: str) -> None:
        """Ask kluster.ai to cancel the batch (the hook sends the ``{}`` body kluster needs)."""
        self.hook.cancel_batch(batch_id)

    def find_orphaned_batch(
        self, idempotency_key: str, input_fingerprint: str, not_before: str
    ) -> str | None:
        """Return the newest batch whose metadata holds this key and fingerprint, created since ``not_before``.

        kluster lists batches newest first; the scan stops at the first batch older than ``not_before`` (less
        five minutes of clock skew), or after :data:`~airflow_provider_kluster.reattach.DEFAULT_SCAN_LIMIT`.
        A failed listing raises (the hook's error), which common.ai reads as "unknown", never "absent".
        """
        since = dt.datetime.fromisoformat(not_before) if not_before else None
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=dt.timezone.utc)
        best: KlusterBatch | None = None
        for scanned, batch in enumerate(self.hook.iter_batches(), start=1):
            created = batch.created_at
            if since is not None and created is not None and created < since - _CLOCK_SKEW:
                break
            if (
                batch.metadata.get(IDEMPOTENCY_KEY) == idempotency_key
                and batch.metadata.get(INPUT_FINGERPRINT_KEY) == input_fingerprint[:16]
                and (best is None or _at(batch) > _at(best))
            ):
                best = batch
            if scanned >= DEFAULT_SCAN_LIMIT:
                break
        return best.id if best is not None else None

    # -- results -----------------------------------------------------------------------------------------

    def iter_results(self, batch_id: str) -> Iterator[RawResultItem]:
        """Look the batch up now (a bad id raises here), then stream its output file, then its error file."""
        batch = self.hook.get_batch(batch_id)
        return self._iter_files([f for f in (batch.output_file_id, batch.error_file_id) if f])

    def _iter_files(self, file_ids: list[str]) -> Iterator[RawResultItem]:
        for file_id in file_ids:
            for line in self.hook.iter_file_lines(file_id):
                if line.strip():
                    item = _raw_item(line)
                    if item is not None:
                        yield item

    def extract_output(self, raw: RawResultItem, spec: OutputSpec) -> ExtractedOutput:
        """Return the answer text; for a structured ``output_type``, the JSON text (code fences removed)."""
        if raw.raw is None:
            return ExtractedOutput(kind="absent")
        if not spec.is_structured:
            return ExtractedOutput(kind="text", text=raw.raw)
        fenced = _FENCE.match(raw.raw)
        return ExtractedOutput(kind="json_text", text=fenced.group("body") if fenced else raw.raw.strip())

    def close(self) -> None:
        """Close the hook's synchronous client, if one was built."""
        client = self.hook.__dict__.get("client")
        if client is not None:
            client.close()
            del self.hook.__dict__["client"]
            self.hook.__dict__.pop("client_without_retries", None)


def _at(batch: KlusterBatch) -> dt.datetime:
    return batch.created_at or dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _raw_item(line: bytes) -> RawResultItem | None:
    """Read one output- or error-file line; ``None`` for a line whose ``custom_id`` names no index.

    A skipped line's request is counted ``missing`` by common.ai, so one odd line never stops the stream.
    """
    record = parse_result_line(line)
    custom_id = record.custom_id or ""
    head, sep, tail = custom_id.rpartition("-")
    if not sep or not head or not tail.isdigit():
        return None
    index = int(tail)
    if record.succeeded:
        usage = record.usage
        return RawResultItem(
            custom_id=custom_id,
            index=index,
            provider_status="success",
            model=record.model,
            usage={
                "input_tokens": usage.get("prompt_tokens", 0),
                "output_tokens": usage.get("completion_tokens", 0),
            },
            finish_reason=record.finish_reason,
            error=None,
            raw=record.content,
        )
    code = _error_code(record.raw)
    provider_status: _ItemStatus = _NEVER_RAN_CODES.get(str(code), "errored")
    return RawResultItem(
        custom_id=custom_id,
        index=index,
        provider_status=provider_status,
        model=record.model,
        usage=None,
        finish_reason=None,
        error={
            "type": "provider_error" if provider_status == "errored" else provider_status,
            "message": record.error or "no error message",
            "provider_code": str(code) if code is not None else (str(record.status_code or "") or None),
            "stage": "provider",
        },
        raw=None,
    )


def _error_code(data: Any) -> Any:
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and error.get("code"):
        return error["code"]
    response = data.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    inner = body.get("error") if isinstance(body, dict) else None
    return inner.get("code") if isinstance(inner, dict) else None


def _task_identity() -> dict[str, str]:
    """Return this provider's identity of the running task instance (see :mod:`~airflow_provider_kluster.reattach`).

    Empty outside a running task. Lets kluster's batch list, and this provider's tools, tell which task made a
    batch; common.ai's own key and fingerprint stay what finds it again.
    """
    try:
        from airflow.sdk import get_current_context

        return {IDENTITY_KEY: identity_from_context(get_current_context())}
    except Exception as exc:  # outside a task (direct use, tests): no identity to record
        log.debug("No task identity for the batch metadata: %s", exc)
        return {}


def _dispatched_conn_id(api_key: str | None) -> str | None:
    """Return the id of the connection common.ai's dispatch is building this adapter from, if it is one.

    ``dispatch.build_adapter_from_connection(name, conn)`` passes only ``conn.password`` and ``conn.host``;
    the connection itself is that function's ``conn``. Only that frame, of that module, with a ``kluster``
    connection whose password is the key passed, is trusted.
    """
    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        for _ in range(3):
            if caller is None:
                return None
            if (
                caller.f_code.co_name == _DISPATCH_FUNCTION
                and caller.f_globals.get("__name__") == _DISPATCH_MODULE
            ):
                conn = caller.f_locals.get("conn")
                conn_id = getattr(conn, "conn_id", None)
                if (
                    conn_id
                    and getattr(conn, "conn_type", None) == CONN_TYPE
                    and (getattr(conn, "password", None) or None) == (api_key or None)
                ):
                    return str(conn_id)
                return None
            caller = caller.f_back
        return None
    finally:
        del frame


def _hook_from_credentials(api_key: str, base_url: str | None) -> KlusterHook:
    """Return a hook on just a key and a host (a full URL, or a host name), when no connection id is known."""
    from airflow.sdk import Connection

    from airflow_provider_kluster.hooks.kluster import settings_from_connection  # noqa: TID251

    conn = Connection(conn_id="kluster_common_ai", conn_type=CONN_TYPE, host=base_url, password=api_key)
    return KlusterHook.from_settings(settings_from_connection(conn))
