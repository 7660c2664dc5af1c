"""State store and batch lifecycle of the kluster.ai emulator.

Files live on disk under ``data_dir``; only their metadata is kept in memory. Batches advance in
background :mod:`asyncio` tasks running in the server's event loop
(``pre_schedule`` → ``validating`` → ``in_progress`` → ``finalizing`` → ``completed``), so request handling
is never blocked. The Python API (:meth:`KlusterEmulator.add_file`, :meth:`KlusterEmulator.set_batch_status`,
:meth:`KlusterEmulator.reset`, ...) is thread-safe and may be called from a test thread while the server
runs in another.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from airflow_provider_kluster.emulator.completions import (
    build_completion,
    default_model_ids,
    validate_input_file,
)
from airflow_provider_kluster.emulator.faults import LOST, RATE_LIMITED, FaultInjector

if TYPE_CHECKING:
    from starlette.types import ASGIApp

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
ACTIVE_STATUSES = frozenset({"pre_schedule", "validating", "in_progress", "finalizing", "cancelling"})
ALL_STATUSES = TERMINAL_STATUSES | ACTIVE_STATUSES
#: Statuses during which the completion window is enforced.
EXPIRABLE_STATUSES = frozenset({"pre_schedule", "validating", "in_progress"})

_WINDOW_RE = re.compile(r"^(\d+)h$")
#: Accepted completion windows: 24h/48h/72h today, 1h–12h earlier, ``asap`` in the spec (treated as 24h).
ALLOWED_WINDOWS = frozenset({"24h", "48h", "72h", "asap"} | {f"{h}h" for h in range(1, 13)})

_TIMESTAMP_FIELDS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_POLL = 0.02
_CHUNK_MAX = 256
_COPY_CHUNK = 1024 * 1024

#: Largest part ``POST /v1/uploads/{id}/parts`` accepts (64 MB), and largest upload (8 GB).
MAX_PART_BYTES = 64 * 1024 * 1024
MAX_UPLOAD_BYTES = 8 * 1024 * 1024 * 1024
#: Purposes an upload may declare.
UPLOAD_PURPOSES = frozenset({"batch", "fine-tune"})


def new_object_id() -> str:
    """A 24-hex ObjectId-like id, as kluster returns."""
    return secrets.token_hex(12)


def window_seconds(window: str) -> float:
    """Seconds in a completion window string (``"24h"``; ``"asap"`` counts as 24 hours)."""
    match = _WINDOW_RE.match(window)
    return int(match.group(1)) * 3600.0 if match else 24 * 3600.0


@dataclass
class EmulatorConfig:
    """Settings of a :class:`KlusterEmulator`.

    :param api_key: the only accepted bearer token.
    :param data_dir: where files are stored (default: a fresh temporary directory, removed on close).
    :param requests_per_second: rate at which requests inside batches are processed.
    :param speedup: factor dividing completion windows (``speedup=86400`` makes 24h last one second).
    :param cancel_delay: seconds a batch stays ``cancelling`` before ``cancelled``.
    :param pre_schedule_delay: seconds in ``pre_schedule`` (and, briefly, ``validating``).
    :param finalize_delay: seconds in ``finalizing``.
    :param timestamps: ``"kluster"`` (numeric strings, unset keys omitted) or ``"int"`` (OpenAI style).
    :param upstream_url: if set, forward each batch request to ``<upstream_url>/chat/completions``.
    :param upstream_api_key: bearer key for the upstream.
    :param seed: seed for fault injection and output shuffling.
    :param models: model ids served by ``/v1/models`` and accepted in requests.
    :param max_file_bytes: largest accepted upload.
    :param empty_json_body_500: reproduce the cancel quirk (JSON content type + empty body → HTTP 500).
    :param prices: per-model overrides of the ``pricing`` served by ``GET /v1/models?extended=true``, in the
        API's shape and unit (USD per token), merged over the defaults of
        :mod:`airflow_provider_kluster.emulator.models` key by key.
    :param max_part_bytes: largest part of a multipart upload (``/v1/uploads``; 64 MB).
    :param max_upload_bytes: largest multipart upload (8 GB; ``max_file_bytes`` does not apply to uploads).
    :param upload_ttl: seconds until an upload expires (1 hour), divided by ``speedup``.
    """

    api_key: str = "test-key"
    data_dir: str | os.PathLike[str] | None = None
    requests_per_second: float = 50.0
    speedup: float = 1.0
    cancel_delay: float = 2.0
    pre_schedule_delay: float = 0.5
    finalize_delay: float = 0.2
    timestamps: str = "kluster"
    upstream_url: str | None = None
    upstream_api_key: str | None = None
    seed: int = 0
    models: list[str] = field(default_factory=default_model_ids)
    max_file_bytes: int = 100 * 1024 * 1024
    empty_json_body_500: bool = True
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_part_bytes: int = MAX_PART_BYTES
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    upload_ttl: float = 3600.0

    def __post_init__(self) -> None:
        if self.timestamps not in ("kluster", "int"):
            raise ValueError("timestamps must be 'kluster' or 'int'")
        if self.requests_per_second <= 0:
            raise ValueError("requests_per_second must be positive")
        if self.speedup <= 0:
            raise ValueError("speedup must be positive")
        if self.max_part_bytes <= 0 or self.max_upload_bytes <= 0:
            raise ValueError("max_part_bytes and max_upload_bytes must be positive")
        if self.upload_ttl <= 0:
            raise ValueError("upload_ttl must be positive")


@dataclass
class FileRecord:
    """Metadata of a stored file (content lives at :attr:`path`)."""

    id: str
    bytes: int
    created_at: float
    filename: str
    purpose: str
    path: Path
    owned: bool = True


@dataclass
class BatchRecord:
    """Mutable state of a batch."""

    id: str
    seq: int
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: float
    expires_at: float
    status: str = "pre_schedule"
    errors: Any = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    timestamps: dict[str, float] = field(default_factory=dict)
    out_path: Path | None = None
    err_path: Path | None = None
    out_fh: IO[bytes] | None = None
    err_fh: IO[bytes] | None = None
    #: Requests executed but lost (in neither file), see :attr:`FaultInjector.lost_share`.
    lost: int = 0


class UploadError(ValueError):
    """A refused uploads call (HTTP 400); :attr:`code` says why (``expired``, ``bytes_mismatch``, ...)."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class UploadPart:
    """One stored part of a multipart upload."""

    id: str
    upload_id: str
    bytes: int
    created_at: float
    path: Path


@dataclass
class UploadRecord:
    """State of a multipart upload (``/v1/uploads``); parts live on disk under ``data_dir/uploads/<id>``."""

    id: str
    bytes: int
    filename: str
    purpose: str
    mime_type: str
    created_at: float
    expires_at: float
    status: str = "pending"
    parts: dict[str, UploadPart] = field(default_factory=dict)
    file_id: str | None = None
    part_ids: list[str] | None = None
    complete_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class KlusterEmulator:
    """In-memory/on-disk state of an emulated kluster.ai account, plus its ASGI app (:attr:`app`).

    :param config: settings; keyword ``overrides`` replace individual fields.
    """

    def __init__(self, config: EmulatorConfig | None = None, **overrides: Any) -> None:
        config = config or EmulatorConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self._initial_config = copy.deepcopy(config)
        if config.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="kluster-emulator-"))
            self._owns_data_dir = True
        else:
            self.data_dir = Path(config.data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._owns_data_dir = False
        self.faults = FaultInjector(seed=config.seed)
        self._lock = threading.RLock()
        self._files: dict[str, FileRecord] = {}
        self._batches: dict[str, BatchRecord] = {}
        self._uploads: dict[str, UploadRecord] = {}
        #: Executions of each custom_id, over every batch (per-request faults depend on it).
        self._executions: Counter[str] = Counter()
        self._counters: Counter[str] = Counter()
        self._polls: Counter[str] = Counter()  # GET /v1/batches/{id} per batch id
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app: ASGIApp | None = None

    # ------------------------------------------------------------------ app / housekeeping
    @property
    def app(self) -> ASGIApp:
        """The ASGI application serving this emulator (built on first access)."""
        if self._app is None:
            from airflow_provider_kluster.emulator.app import create_app

            self._app = create_app(self)
        return self._app

    @property
    def models(self) -> list[str]:
        """Known model ids."""
        return list(self.config.models)

    @property
    def counters(self) -> dict[str, int]:
        """Request counts per route (``"GET /v1/batches/{id}"``) plus ``batches_created``,
        ``files_uploaded`` and ``cancels``."""
        with self._lock:
            return dict(self._counters)

    def count(self, key: str, n: int = 1) -> None:
        """Increment a counter."""
        with self._lock:
            self._counters[key] += n

    def note_poll(self, batch_id: str) -> None:
        """Count one ``GET /v1/batches/{batch_id}`` (the route's counter counts every batch's together)."""
        with self._lock:
            self._polls[batch_id] += 1

    def polls_of(self, batch_id: str) -> int:
        """How often ``batch_id`` was fetched with ``GET /v1/batches/{batch_id}``: is *its* waiter polling?"""
        with self._lock:
            return self._polls[batch_id]

    def reset(self) -> None:
        """Forget every file, batch, upload, fault, counter and execution count (batch tasks are cancelled).

        Configuration fields changed since construction (``emulator.config.speedup = ...``, also in place:
        ``emulator.config.prices[...] = ...``) are restored.
        """
        with self._lock:
            self.config = copy.deepcopy(self._initial_config)
            tasks = list(self._tasks)
            self._tasks.clear()
            for batch in self._batches.values():
                self._close_handles(batch)
            files = list(self._files.values())
            self._files.clear()
            self._batches.clear()
            self._uploads.clear()
            self._executions.clear()
            self._counters.clear()
            self._polls.clear()
            self.faults.clear()
        self._cancel_tasks(tasks)
        for rec in files:
            if not rec.owned:
                continue
            try:
                rec.path.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - best effort
                log.debug("could not remove %s", rec.path)
        for sub in ("files", "batches", "uploads"):
            shutil.rmtree(self.data_dir / sub, ignore_errors=True)

    def close(self) -> None:
        """Reset and, if the data directory was created by the emulator, remove it."""
        self.reset()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _cancel_tasks(self, tasks: list[asyncio.Task[Any]]) -> None:
        loop = self._loop
        if not tasks or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for task in tasks:
            if running is loop:
                task.cancel()
            else:
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:  # loop closed meanwhile
                    pass

    def _spawn(self, coro: Any) -> None:
        """Start a background task in the running loop and keep a reference to it."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        task = loop.create_task(coro)
        with self._lock:
            self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        with self._lock:
            self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("emulator background task failed: %r", task.exception())

    # ------------------------------------------------------------------ serialisation
    def _ts(self, value: float | None) -> str | int | None:
        if value is None:
            return None
        return str(int(value)) if self.config.timestamps == "kluster" else int(value)

    def file_json(self, rec: FileRecord) -> dict[str, Any]:
        """The file object as served by the API."""
        return {
            "id": rec.id,
            "object": "file",
            "bytes": rec.bytes,
            "created_at": self._ts(rec.created_at),
            "filename": rec.filename,
            "purpose": rec.purpose,
        }

    def batch_json(self, batch: BatchRecord) -> dict[str, Any]:
        """The batch object as served by the API.

        In ``kluster`` timestamp mode, unset timestamps and file ids are omitted (as in real responses);
        in ``int`` mode every key is present, ``null`` when unset.
        """
        kluster = self.config.timestamps == "kluster"
        with self._lock:
            data: dict[str, Any] = {
                "id": batch.id,
                "object": "batch",
                "endpoint": batch.endpoint,
                "errors": batch.errors,
                "input_file_id": batch.input_file_id,
                "completion_window": batch.completion_window,
                "status": batch.status,
            }
            for key in ("output_file_id", "error_file_id"):
                value = getattr(batch, key)
                if value is not None or not kluster:
                    data[key] = value
            stamps = dict(batch.timestamps, created_at=batch.created_at, expires_at=batch.expires_at)
            for key in _TIMESTAMP_FIELDS:
                value = stamps.get(key)
                if value is not None or not kluster:
                    data[key] = self._ts(value)
            data["request_counts"] = {
                "total": batch.total,
                "completed": batch.completed,
                "failed": batch.failed,
            }
            data["metadata"] = batch.metadata
            return data

    # ------------------------------------------------------------------ files
    def _file_dir(self, file_id: str) -> Path:
        path = self.data_dir / "files" / file_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _safe_name(filename: str | None) -> str:
        name = os.path.basename((filename or "").replace("\\", "/")) or "upload.jsonl"
        return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200]

    def new_upload_target(self, filename: str | None) -> tuple[str, Path, str]:
        """Allocate an id and a disk path for a new upload.

        :return: ``(file_id, disk path, server-side filename)``.
        """
        file_id = new_object_id()
        name = self._safe_name(filename)
        return file_id, self._file_dir(file_id) / name, f"/data/uploads/{file_id}/{name}"

    def register_file(
        self,
        file_id: str,
        path: Path,
        *,
        filename: str,
        purpose: str,
        owned: bool = True,
    ) -> FileRecord:
        """Record a file already written to ``path``."""
        rec = FileRecord(
            id=file_id,
            bytes=path.stat().st_size,
            created_at=time.time(),
            filename=filename,
            purpose=purpose,
            path=path,
            owned=owned,
        )
        with self._lock:
            self._files[file_id] = rec
        return rec

    def discard_upload(self, path: Path) -> None:
        """Remove a partially written upload."""
        shutil.rmtree(path.parent, ignore_errors=True)

    def add_file(
        self,
        source: str | os.PathLike[str] | bytes | Iterable[bytes],
        *,
        purpose: str = "batch",
        filename: str | None = None,
        copy: bool = True,
    ) -> str:
        """Register a file without HTTP (e.g. a large file made by a benchmark).

        :param source: a path, ``bytes``, or an iterable of ``bytes`` chunks.
        :param purpose: file purpose (``batch``, ``batch_output``, ...).
        :param filename: the name to report (defaults to the source's base name).
        :param copy: for a path source, ``False`` serves the file in place instead of copying it
            (it is then never deleted by the emulator).
        :return: the new file id.
        """
        if isinstance(source, (str, os.PathLike)):
            src = Path(source)
            file_id, dest, server_name = self.new_upload_target(filename or src.name)
            if copy:
                shutil.copyfile(src, dest)
            else:
                shutil.rmtree(dest.parent, ignore_errors=True)
                dest = src.resolve()
            self.register_file(file_id, dest, filename=server_name, purpose=purpose, owned=copy)
            return file_id
        file_id, dest, server_name = self.new_upload_target(filename or "upload.jsonl")
        chunks: Iterable[bytes | bytearray | memoryview] = (
            [source] if isinstance(source, (bytes, bytearray, memoryview)) else source
        )
        with open(dest, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        self.register_file(file_id, dest, filename=server_name, purpose=purpose)
        return file_id

    def get_file(self, file_id: str) -> FileRecord | None:
        """File metadata, or ``None``."""
        with self._lock:
            return self._files.get(file_id)

    def list_files(self) -> list[FileRecord]:
        """Every file, oldest first."""
        with self._lock:
            return list(self._files.values())

    def delete_file(self, file_id: str) -> bool:
        """Delete a file (and its content if owned); return whether it existed."""
        with self._lock:
            rec = self._files.pop(file_id, None)
        if rec is None:
            return False
        if rec.owned:
            try:
                rec.path.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - best effort
                log.debug("could not remove %s", rec.path)
        return True

    # ------------------------------------------------------------------ multipart uploads
    def upload_json(self, rec: UploadRecord) -> dict[str, Any]:
        """The upload object as served by ``/v1/uploads`` (integer timestamps, as kluster's examples show).

        ``file`` (the new file object) is present once the upload is completed.
        """
        with self._lock:
            data: dict[str, Any] = {
                "id": rec.id,
                "object": "upload",
                "bytes": rec.bytes,
                "created_at": int(rec.created_at),
                "filename": rec.filename,
                "purpose": rec.purpose,
                "status": rec.status,
                "expires_at": int(rec.expires_at),
            }
            file = self._files.get(rec.file_id) if rec.file_id else None
        if file is not None:
            data["file"] = dict(self.file_json(file), created_at=int(file.created_at))
        return data

    @staticmethod
    def part_json(part: UploadPart) -> dict[str, Any]:
        """The upload part object (``{id, object: "upload.part", created_at, upload_id}``)."""
        return {
            "id": part.id,
            "object": "upload.part",
            "created_at": int(part.created_at),
            "upload_id": part.upload_id,
        }

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        """Upload record, or ``None``."""
        with self._lock:
            return self._uploads.get(upload_id)

    def create_upload(self, *, bytes: Any, filename: Any, mime_type: Any, purpose: Any) -> UploadRecord:
        """Start a multipart upload of ``bytes`` bytes (``POST /v1/uploads``); it expires after ``upload_ttl``.

        :raises UploadError: a missing or invalid field, or more than ``max_upload_bytes``.
        """
        if isinstance(bytes, bool) or not isinstance(bytes, (int, float)) or int(bytes) != bytes or bytes < 0:
            raise UploadError("'bytes' must be a non-negative integer.")
        if not isinstance(filename, str) or not filename:
            raise UploadError("'filename' is required.")
        if not isinstance(mime_type, str) or not mime_type:
            raise UploadError("'mime_type' is required.")
        if purpose not in UPLOAD_PURPOSES:
            raise UploadError(
                f"Invalid purpose {purpose!r}: use one of {', '.join(sorted(UPLOAD_PURPOSES))}."
            )
        limit = self.config.max_upload_bytes
        if bytes > limit:
            raise UploadError(f"Upload too large: the limit is {limit} bytes.", "too_large")
        now = time.time()
        rec = UploadRecord(
            id=f"upload_{secrets.token_hex(12)}",
            bytes=int(bytes),
            filename=filename,
            purpose=purpose,
            mime_type=mime_type,
            created_at=now,
            expires_at=now + self.config.upload_ttl / self.config.speedup,
        )
        with self._lock:
            self._uploads[rec.id] = rec
            self._counters["uploads_created"] += 1
        return rec

    def _upload_dir(self, upload_id: str) -> Path:
        return self.data_dir / "uploads" / upload_id

    def _pending_upload_locked(self, upload_id: str, action: str) -> UploadRecord:
        """The upload, if it still takes parts (lock held); expire it when its time is up."""
        rec = self._uploads.get(upload_id)
        if rec is None:
            raise KeyError(upload_id)
        if rec.status == "pending" and time.time() >= rec.expires_at:
            rec.status = "expired"
            rec.parts.clear()
            shutil.rmtree(self._upload_dir(rec.id), ignore_errors=True)
            log.info("upload %s expired", rec.id)
        if rec.status == "expired":
            raise UploadError(f"Upload {upload_id} has expired: cannot {action}.", "expired")
        if rec.status != "pending":
            raise UploadError(f"Upload {upload_id} is {rec.status}: cannot {action}.", rec.status)
        return rec

    def new_part_target(self, upload_id: str) -> tuple[str, Path]:
        """Allocate an id and a disk path for a new part of a pending upload.

        :raises KeyError: unknown upload.
        :raises UploadError: the upload is expired, cancelled or completed.
        """
        with self._lock:
            self._pending_upload_locked(upload_id, "add a part")
        part_id = f"part_{secrets.token_hex(12)}"
        folder = self._upload_dir(upload_id)
        folder.mkdir(parents=True, exist_ok=True)
        return part_id, folder / part_id

    def register_part(self, upload_id: str, part_id: str, path: Path) -> UploadPart:
        """Record a part already written to ``path`` (removed if the upload stopped taking parts meanwhile).

        :raises KeyError: unknown upload.
        :raises UploadError: the upload is no longer pending, or its parts would pass ``max_upload_bytes``.
        """
        size = path.stat().st_size
        try:
            with self._lock:
                rec = self._pending_upload_locked(upload_id, "add a part")
                stored = sum(p.bytes for p in rec.parts.values())
                if stored + size > self.config.max_upload_bytes:
                    raise UploadError(
                        f"Upload {upload_id} would pass {self.config.max_upload_bytes} bytes.", "too_large"
                    )
                part = UploadPart(
                    id=part_id, upload_id=upload_id, bytes=size, created_at=time.time(), path=path
                )
                rec.parts[part_id] = part
                self._counters["upload_parts"] += 1
                return part
        except (KeyError, UploadError):
            path.unlink(missing_ok=True)
            raise

    def add_upload_part(self, upload_id: str, data: bytes) -> UploadPart:
        """Add a part without HTTP (Python API; the route streams to disk instead).

        :raises UploadError: more than ``max_part_bytes``, or the upload no longer takes parts.
        """
        if len(data) > self.config.max_part_bytes:
            raise UploadError(
                f"Part too large: the limit is {self.config.max_part_bytes} bytes.", "too_large"
            )
        part_id, path = self.new_part_target(upload_id)
        path.write_bytes(data)
        return self.register_part(upload_id, part_id, path)

    def complete_upload(self, upload_id: str, part_ids: Any, md5: Any = None) -> UploadRecord:
        """Concatenate the parts in the order of ``part_ids`` into a new file (blocking: run it in a thread).

        Completing an upload that is already completed with the same ``part_ids`` returns it unchanged, with
        the same file: a client whose answer was lost may ask again without getting a second file. Two
        concurrent completes of one upload run one after the other.

        :raises KeyError: unknown upload.
        :raises UploadError: expired, cancelled, completed with other parts, an unknown or repeated part id,
            a byte total other than the declared ``bytes``, or an ``md5`` that does not match.
        """
        if not isinstance(part_ids, list) or not all(isinstance(p, str) for p in part_ids):
            raise UploadError("'part_ids' must be a list of part ids.")
        if md5 is not None and not isinstance(md5, str):
            raise UploadError("'md5' must be a string.")
        with self._lock:
            rec = self._uploads.get(upload_id)
            if rec is None:
                raise KeyError(upload_id)
        with rec.complete_lock:
            with self._lock:
                if rec.status == "completed":
                    if rec.part_ids == part_ids:
                        return rec
                    raise UploadError(
                        f"Upload {upload_id} is already completed with other parts.", "completed"
                    )
                self._pending_upload_locked(upload_id, "complete it")
                if len(set(part_ids)) != len(part_ids):
                    raise UploadError("'part_ids' lists a part twice.")
                unknown = [p for p in part_ids if p not in rec.parts]
                if unknown:
                    raise UploadError(f"Unknown part ids for upload {upload_id}: {', '.join(unknown[:5])}.")
                parts = [rec.parts[p] for p in part_ids]
                total = sum(p.bytes for p in parts)
                if total != rec.bytes:
                    raise UploadError(
                        f"The parts hold {total} bytes, but upload {upload_id} was created for {rec.bytes} bytes.",
                        "bytes_mismatch",
                    )
            file_id, dest, server_name = self.new_upload_target(rec.filename)
            digest = hashlib.md5(usedforsecurity=False)
            try:
                with open(dest, "wb") as out:
                    for part in parts:
                        with open(part.path, "rb") as src:
                            while chunk := src.read(_COPY_CHUNK):
                                digest.update(chunk)
                                out.write(chunk)
            except OSError:
                self.discard_upload(dest)
                raise
            if md5 is not None and md5.lower() != digest.hexdigest():
                self.discard_upload(dest)
                raise UploadError(
                    f"md5 mismatch for upload {upload_id}: the parts hash to {digest.hexdigest()}.",
                    "md5_mismatch",
                )
            with self._lock:
                if rec.status != "pending":  # cancelled (or expired) while the parts were being joined
                    self.discard_upload(dest)
                    raise UploadError(f"Upload {upload_id} is {rec.status}: cannot complete it.", rec.status)
                file = self.register_file(file_id, dest, filename=server_name, purpose=rec.purpose)
                rec.status = "completed"
                rec.file_id = file.id
                rec.part_ids = list(part_ids)
                rec.parts.clear()
                self._counters["uploads_completed"] += 1
            shutil.rmtree(self._upload_dir(rec.id), ignore_errors=True)
            log.info("upload %s completed as file %s (%d bytes)", rec.id, file.id, file.bytes)
            return rec

    def cancel_upload(self, upload_id: str) -> UploadRecord:
        """Cancel a pending upload and drop its parts (cancelling a cancelled upload returns it).

        :raises KeyError: unknown upload.
        :raises UploadError: the upload is completed or expired.
        """
        with self._lock:
            rec = self._uploads.get(upload_id)
            if rec is None:
                raise KeyError(upload_id)
            if rec.status == "cancelled":
                return rec
            self._pending_upload_locked(upload_id, "cancel it")
            rec.status = "cancelled"
            rec.parts.clear()
        shutil.rmtree(self._upload_dir(upload_id), ignore_errors=True)
        return rec

    # ------------------------------------------------------------------ batches
    def get_batch(self, batch_id: str) -> BatchRecord | None:
        """Batch record, or ``None``."""
        with self._lock:
            return self._batches.get(batch_id)

    def get_batch_raw(self, batch_id: str) -> dict[str, Any]:
        """The batch object as the API would serve it.

        :raises KeyError: unknown batch.
        """
        batch = self.get_batch(batch_id)
        if batch is None:
            raise KeyError(batch_id)
        return self.batch_json(batch)

    def list_batch_ids(self) -> list[str]:
        """Ids of every batch, newest first."""
        return [b.id for b in self.list_batches()]

    def list_batches(self) -> list[BatchRecord]:
        """Every batch, newest first."""
        with self._lock:
            return sorted(self._batches.values(), key=lambda b: b.seq, reverse=True)

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, Any] | None,
    ) -> BatchRecord:
        """Create a batch (arguments already validated) and start its lifecycle task.

        Must be called from inside the running event loop.
        """
        now = time.time()
        batch = BatchRecord(
            id=new_object_id(),
            seq=next(self._seq),
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            created_at=now,
            expires_at=now + window_seconds(completion_window) / self.config.speedup,
        )
        with self._lock:
            self._batches[batch.id] = batch
            self._counters["batches_created"] += 1
        self.faults.claim_next_stall(batch.id)
        self._spawn(self._run_batch(batch))
        return batch

    def seed_batches(
        self,
        count: int,
        *,
        age: float = 86_400.0,
        status: str = "completed",
        metadata: dict[str, Any] | None = None,
    ) -> list[str]:
        """Add ``count`` finished batches created ``age`` seconds ago, as an account in use has (no lifecycle).

        For tests and benchmarks of listing and scanning; the batches have no files.
        """
        created = time.time() - age
        ids = []
        with self._lock:
            for i in range(count):
                batch = BatchRecord(
                    id=new_object_id(),
                    seq=next(self._seq),
                    input_file_id=new_object_id(),
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                    metadata=dict(metadata or {}),
                    created_at=created + i * 0.001,
                    expires_at=created + 86_400.0,
                    status=status,
                    timestamps={status + "_at": created + 1.0},
                )
                self._batches[batch.id] = batch
                ids.append(batch.id)
        return ids

    def seed_files(
        self, count: int, *, age: float = 86_400.0, purpose: str = "batch", filename: str = "old.jsonl"
    ) -> list[str]:
        """Add ``count`` empty files uploaded ``age`` seconds ago, as an account in use has.

        For tests and benchmarks of listing and scanning. Files list in the order they were added, so seed
        before the files the test makes.
        """
        created = time.time() - age
        ids = []
        with self._lock:
            for i in range(count):
                file_id, path, server_name = self.new_upload_target(filename)
                path.touch()
                self._files[file_id] = FileRecord(
                    id=file_id,
                    bytes=0,
                    created_at=created + i * 0.001,
                    filename=server_name,
                    purpose=purpose,
                    path=path,
                )
                ids.append(file_id)
        return ids

    def delete_batch(self, batch_id: str, *, delete_files: bool = False) -> bool:
        """Forget a batch (optionally with its input/output/error files)."""
        with self._lock:
            batch = self._batches.pop(batch_id, None)
            if batch is None:
                return False
            self._close_handles(batch)
        if delete_files:
            for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
                if file_id:
                    self.delete_file(file_id)
        return True

    def cancel_batch(self, batch_id: str) -> BatchRecord:
        """Start cancelling a batch (from inside the running loop).

        :raises KeyError: unknown batch.
        :raises ValueError: the batch is already in a terminal status.
        """
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                raise KeyError(batch_id)
            if batch.status in TERMINAL_STATUSES:
                raise ValueError(f"Cannot cancel a batch with status '{batch.status}'.")
            self._counters["cancels"] += 1
            if batch.status == "cancelling":
                return batch
            batch.status = "cancelling"
            batch.timestamps["cancelling_at"] = time.time()
        self._spawn(self._finish_cancel(batch))
        return batch

    def set_batch_status(self, batch_id: str, status: str) -> dict[str, Any]:
        """Force a batch into ``status`` (terminal statuses finalise output files and stop processing).

        :raises KeyError: unknown batch.
        :raises ValueError: unknown status.
        :return: the batch object.
        """
        status = status.lower()
        if status not in ALL_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                raise KeyError(batch_id)
            if status in TERMINAL_STATUSES:
                errors = None
                if status == "failed" and not batch.errors:
                    errors = _error_list(
                        [
                            {
                                "code": "forced",
                                "message": "Status forced by the emulator.",
                                "param": None,
                                "line": None,
                            }
                        ],
                    )
                self._finish_locked(batch, status, errors=errors)
            else:
                batch.status = status
                if status != "pre_schedule" and status != "validating":
                    batch.timestamps.setdefault(f"{status}_at", time.time())
            return self.batch_json(batch)

    # ------------------------------------------------------------------ lifecycle
    def _alive(self, batch: BatchRecord) -> bool:
        with self._lock:
            return self._batches.get(batch.id) is batch

    def _expire_if_due(self, batch: BatchRecord) -> bool:
        """Expire the batch if its window passed; return whether it did."""
        with self._lock:
            if batch.status in EXPIRABLE_STATUSES and time.time() >= batch.expires_at:
                log.info("batch %s expired in status %s", batch.id, batch.status)
                self._finish_locked(batch, "expired")
                return True
        return False

    async def _stay(self, batch: BatchRecord, status: str, seconds: float) -> bool:
        """Remain in ``status`` for ``seconds`` (longer while stuck).

        :return: ``False`` if the batch left ``status`` meanwhile (cancelled, forced, expired, reset).
        """
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            if not self._alive(batch) or batch.status != status:
                return False
            if status != "cancelling" and self._expire_if_due(batch):
                return False
            now = time.monotonic()
            if now >= deadline and not self.faults.is_stuck(batch.id, status):
                return True
            await asyncio.sleep(min(_POLL, max(deadline - now, 0.001)) if now < deadline else _POLL)

    def _advance(self, batch: BatchRecord, expected: str, new: str) -> bool:
        with self._lock:
            if self._batches.get(batch.id) is not batch or batch.status != expected:
                return False
            batch.status = new
            if new in ("in_progress", "finalizing"):
                batch.timestamps[f"{new}_at"] = time.time()
            return True

    async def _run_batch(self, batch: BatchRecord) -> None:
        try:
            cfg = self.config
            if not await self._stay(batch, "pre_schedule", cfg.pre_schedule_delay):
                return
            if not self._advance(batch, "pre_schedule", "validating"):
                return
            if not await self._stay(batch, "validating", min(cfg.pre_schedule_delay, 0.1)):
                return
            rec = self.get_file(batch.input_file_id)
            if rec is None:
                total, errors = (
                    0,
                    [
                        {
                            "code": "file_not_found",
                            "message": f"Input file {batch.input_file_id} no longer exists.",
                            "param": "input_file_id",
                            "line": None,
                        },
                    ],
                )
            else:
                total, errors = await asyncio.to_thread(validate_input_file, str(rec.path))
            with self._lock:
                if not self._alive(batch) or batch.status != "validating":
                    return
                if errors:
                    self._finish_locked(batch, "failed", errors=_error_list(errors))
                    return
                batch.total = total
                batch_dir = self.data_dir / "batches" / batch.id
                batch_dir.mkdir(parents=True, exist_ok=True)
                batch.out_path = batch_dir / "output.jsonl"
                batch.err_path = batch_dir / "errors.jsonl"
                batch.out_fh = open(batch.out_path, "wb")
                batch.err_fh = open(batch.err_path, "wb")
            if not self._advance(batch, "validating", "in_progress"):
                return
            assert rec is not None
            if not await self._process(batch, rec.path):
                return
            if not self._advance(batch, "in_progress", "finalizing"):
                return
            if not await self._stay(batch, "finalizing", cfg.finalize_delay):
                return
            with self._lock:
                if self._alive(batch) and batch.status == "finalizing":
                    self._finish_locked(batch, "completed")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch %s crashed in the emulator", batch.id)
            with self._lock:
                if self._alive(batch) and batch.status not in TERMINAL_STATUSES:
                    self._finish_locked(
                        batch,
                        "failed",
                        errors=_error_list(
                            [{"code": "internal_error", "message": str(exc), "param": None, "line": None}],
                        ),
                    )

    async def _process(self, batch: BatchRecord, input_path: Path) -> bool:
        """Run every request of the input file at the configured rate.

        :return: ``True`` when all requests ran and the batch is still ``in_progress``.
        """
        rps = self.config.requests_per_second
        rng = random.Random(f"{self.config.seed}-{batch.seq}")
        upstream = None
        if self.config.upstream_url:
            import httpx

            headers = {}
            if self.config.upstream_api_key:
                headers["Authorization"] = f"Bearer {self.config.upstream_api_key}"
            upstream = httpx.AsyncClient(
                base_url=self.config.upstream_url.rstrip("/"), headers=headers, timeout=600
            )
        try:
            start = time.monotonic()
            done = 0
            with open(input_path, "rb") as fh:
                lines = (line for line in fh if line.strip())
                while True:
                    if not self._alive(batch) or batch.status != "in_progress":
                        return False
                    if self._expire_if_due(batch):
                        return False
                    limit = self.faults.stall_limit(batch.id)
                    if self.faults.is_stuck(batch.id, "in_progress") or (limit is not None and done >= limit):
                        # stuck or stalled: stay in_progress, process nothing, keep the counts frozen
                        await asyncio.sleep(_POLL)
                        start = time.monotonic() - done / rps
                        continue
                    allowed = int((time.monotonic() - start) * rps) + 1 - done
                    if allowed <= 0:
                        await asyncio.sleep(min(_POLL, (done + 1) / rps - (time.monotonic() - start)))
                        continue
                    take = min(allowed, _CHUNK_MAX)
                    if limit is not None:
                        take = min(take, limit - done)
                    chunk = list(itertools.islice(lines, take))
                    if not chunk:
                        return True
                    answered = await self._execute(chunk, upstream)
                    results = [r for r in answered if r is not None]
                    rng.shuffle(results)
                    with self._lock:
                        if not self._alive(batch) or batch.status != "in_progress" or batch.out_fh is None:
                            return False
                        batch.lost += len(answered) - len(results)
                        for ok, line in results:
                            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
                            if ok:
                                batch.out_fh.write(data)
                                batch.completed += 1
                            else:
                                assert batch.err_fh is not None
                                batch.err_fh.write(data)
                                batch.failed += 1
                        batch.out_fh.flush()
                        assert batch.err_fh is not None
                        batch.err_fh.flush()
                    done += len(chunk)
                    await asyncio.sleep(0)
        finally:
            if upstream is not None:
                await upstream.aclose()

    def executions(self, custom_id: str | None = None) -> Any:
        """How many times the emulator has executed a request, by ``custom_id``, over every batch.

        :param custom_id: one request's id; ``None`` returns a ``{custom_id: count}`` copy of all of them.
        """
        with self._lock:
            if custom_id is None:
                return dict(self._executions)
            return self._executions.get(custom_id, 0)

    async def _execute(self, chunk: list[bytes], upstream: Any) -> list[tuple[bool, dict[str, Any]] | None]:
        """Run one chunk of request lines; return ``(succeeded, output line)`` pairs (``None``: lost)."""
        models = set(self.config.models)

        async def one(raw: bytes) -> tuple[bool, dict[str, Any]] | None:
            req = json.loads(raw)
            custom_id = str(req["custom_id"])
            with self._lock:
                self._executions[custom_id] += 1
                execution = self._executions[custom_id]
            body = req["body"]
            line_id = f"batch_req_{secrets.token_hex(12)}"
            request_id = f"req_{secrets.token_hex(12)}"

            def error(status: int, message: str, etype: str, code: str) -> tuple[bool, dict[str, Any]]:
                return False, {
                    "id": line_id,
                    "custom_id": req["custom_id"],
                    "response": {
                        "status_code": status,
                        "request_id": request_id,
                        "body": {"error": {"message": message, "type": etype, "code": code}},
                    },
                }

            if body["model"] not in models:
                return error(
                    400,
                    "The model `{}` does not exist.".format(body["model"]),
                    "invalid_request_error",
                    "model_not_found",
                )
            fate = self.faults.request_fate(custom_id, execution)
            if fate == LOST:
                return None
            if fate == RATE_LIMITED:
                return error(
                    429,
                    "Rate limit exceeded: too many requests (injected by the emulator, transient_share).",
                    "rate_limit_exceeded",
                    "rate_limit_exceeded",
                )
            if fate is not None:
                return error(
                    500,
                    "The server had an error processing the request (injected by the emulator, "
                    "transient_share).",
                    "server_error",
                    "server_error",
                )
            if self.faults.should_fail_request():
                return error(500, "Injected failure (emulator fail_share).", "server_error", "internal_error")
            if upstream is not None:
                try:
                    resp = await upstream.post("/chat/completions", json=body)
                    try:
                        resp_body: Any = resp.json()
                    except ValueError:
                        resp_body = {"error": {"message": resp.text, "type": "upstream_error", "code": None}}
                except Exception as exc:  # network errors become request failures
                    return error(502, f"Upstream request failed: {exc}", "server_error", "upstream_error")
                line = {
                    "id": line_id,
                    "custom_id": req["custom_id"],
                    "response": {
                        "status_code": resp.status_code,
                        "request_id": request_id,
                        "body": resp_body,
                    },
                }
                return resp.status_code < 400, line
            return True, {
                "id": line_id,
                "custom_id": req["custom_id"],
                "response": {"status_code": 200, "request_id": request_id, "body": build_completion(body)},
            }

        if upstream is None:
            return [await one(raw) for raw in chunk]
        return list(await asyncio.gather(*(one(raw) for raw in chunk)))

    async def _finish_cancel(self, batch: BatchRecord) -> None:
        delay = self.faults.cancel_delay
        if delay is None:
            delay = self.config.cancel_delay
        if not await self._stay(batch, "cancelling", delay):
            return
        with self._lock:
            if self._alive(batch) and batch.status == "cancelling":
                self._finish_locked(batch, "cancelled")

    # ------------------------------------------------------------------ terminal transitions
    @staticmethod
    def _close_handles(batch: BatchRecord) -> None:
        for attr in ("out_fh", "err_fh"):
            fh = getattr(batch, attr)
            if fh is not None:
                try:
                    fh.close()
                except OSError:  # pragma: no cover
                    pass
                setattr(batch, attr, None)

    def _finish_locked(self, batch: BatchRecord, status: str, *, errors: Any = None) -> None:
        """Move a batch to a terminal status and publish its output/error files (lock held)."""
        self._close_handles(batch)
        batch.status = status
        batch.timestamps[f"{status}_at"] = time.time()
        if errors is not None:
            batch.errors = errors
        if status == "failed":
            return
        for path, attr, name in (
            (batch.out_path, "output_file_id", "output"),
            (batch.err_path, "error_file_id", "errors"),
        ):
            if path is None or not path.exists() or getattr(batch, attr):
                continue
            if path.stat().st_size == 0 and not (status == "completed" and attr == "output_file_id"):
                continue
            file_id = new_object_id()
            self.register_file(
                file_id,
                path,
                filename=f"/data/batches/{batch.id}/{name}_{file_id}.jsonl",
                purpose="batch_output",
            )
            setattr(batch, attr, file_id)
        log.info("batch %s is %s", batch.id, status)


def _error_list(errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": errors}
