"""Operators for the kluster.ai batch workflow: upload, submit (and wait), fetch results, cancel."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.configuration import conf
from airflow.sdk import BaseOperator

from airflow_provider_kluster.batches import (
    BATCH_ENDPOINT,
    BatchStatus,
    KlusterBatch,
)
from airflow_provider_kluster.cancelling import (
    DEFAULT_CANCEL_BUDGET,
    UNKNOWN_STATE,
    WORKER_CANCEL_BUDGET,
    CancelAttempts,
    cancel_done,
    judge_kill,
    not_cancelled_message,
)
from airflow_provider_kluster.exceptions import (
    KlusterAPIError,
    KlusterBatchCancelledError,
    KlusterBatchError,
    KlusterBatchExpiredError,
    KlusterBatchFailedError,
    KlusterBatchNotFinishedError,
    KlusterConfigError,
    KlusterInputChangedError,
    KlusterNotFoundError,
    KlusterTooManyFailuresError,
)
from airflow_provider_kluster.hooks.kluster import ClientSettings, KlusterHook
from airflow_provider_kluster.lineage import KlusterLineageMixin, declare_results_asset
from airflow_provider_kluster.links import KlusterBatchLink, batch_url
from airflow_provider_kluster.parameters import (
    PROVIDER_METADATA_KEYS,
    build_metadata,
    check_arguments,
    check_positive_number,
)
from airflow_provider_kluster.paths import as_path
from airflow_provider_kluster.reattach import (
    DEFAULT_SCAN_LIMIT,
    FINGERPRINT_KEY,
    IDENTITY_KEY,
    MAX_TRIES_KEY,
    STATE_BATCH_KEY,
    STATE_UPLOAD_KEY,
    Previous,
    TaskState,
    classify,
    find_previous,
    find_uploads,
    identity_from_context,
    input_fingerprint,
    run_start,
    upload_name,
)
from airflow_provider_kluster.request_files import (
    DEFAULT_MAX_REQUESTS,
    RequestFileSummary,
    custom_ids_of_lines,
    validate_request_file,
    write_request_file,
)
from airflow_provider_kluster.results import join_results
from airflow_provider_kluster.ti_state import TaskFacts, TaskInstanceRef, read_facts
from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger
from airflow_provider_kluster.waiting import (
    DEFAULT_MAX_CONSECUTIVE_ERRORS,
    WaitOutcome,
    WaitPolicy,
    raise_for_event,
    run_sync_wait,
    validate_event,
)

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context

_T = TypeVar("_T")
BATCH_ID_KEY = "batch_id"
BATCH_URL_KEY = "batch_url"
MANIFEST_KEY = "manifest"


def _default_deferrable() -> bool:
    return conf.getboolean("operators", "default_deferrable", fallback=False)


def _seconds(value: Any) -> Any:
    """Return a timedelta as seconds; anything else as given, for ``execute`` to check (never fail at parse)."""
    return value.total_seconds() if isinstance(value, timedelta) else value


class _RequestInputMixin:
    """Turn exactly one of ``input_file`` / ``requests`` into a validated, uploaded file id."""

    kluster_conn_id: str
    input_file: Any
    requests: Any
    model: str | None
    max_completion_tokens: int | None
    body_defaults: dict[str, Any] | None
    check_models: bool
    max_requests: int | None
    reattach: bool
    reattach_scan_limit: int
    log: Any

    @cached_property
    def hook(self) -> KlusterHook:
        """Return the hook of this task's connection."""
        return KlusterHook(self.kluster_conn_id)

    def _body_defaults(self) -> dict[str, Any]:
        defaults = dict(self.body_defaults or {})
        if self.max_completion_tokens is not None:
            defaults.setdefault("max_completion_tokens", self.max_completion_tokens)
        return defaults

    def prepare_input(self, workdir: str) -> tuple[Any, RequestFileSummary]:
        """Build (from ``requests``) or take the request file and validate it; nothing is uploaded if invalid."""
        if self.requests is not None:
            path = as_path(f"{workdir}/requests.jsonl")
            write_request_file(self.requests, path, model=self.model, body_defaults=self._body_defaults())
        else:
            path = as_path(self.input_file)
        known = self.hook.list_models() if self.check_models else None
        summary = validate_request_file(path, max_requests=self.max_requests, known_models=known)
        self.log.info(
            "Request file %s is valid: %d requests, %d bytes, models %s",
            summary.path,
            summary.requests,
            summary.bytes,
            ", ".join(summary.models),
        )
        return path, summary

    def upload_once(
        self,
        context: Context,
        path: Any,
        identity: str,
        fingerprint: str,
        *,
        delete_stale: bool,
        keep: frozenset[str] = frozenset(),
    ) -> str:
        """Upload the file under a name derived from task and input, unless an earlier try already did.

        Where an earlier try recorded its upload in the task state store (Airflow 3.3+), that one call decides;
        otherwise (older Airflow, or a crash before the record) the newest files are scanned by name, back to
        the DAG run's start. With ``delete_stale``, uploads an earlier try left for another input of this task,
        and that no batch in ``keep`` uses, are deleted (the submit operator's own: nothing else refers to them).
        An upload whose answer is lost is looked for by its name before it is sent again.
        """
        state = TaskState.of(context)
        since = run_start(context)
        recorded = self._recorded_upload(state, fingerprint)
        if recorded is not None:
            return recorded
        if state.needs_scan:
            uploads = find_uploads(
                self.hook, identity, fingerprint, scan_limit=self.reattach_scan_limit, since=since
            )
            for orphan in uploads.others if delete_stale else ():
                if orphan not in keep:
                    self.log.info(
                        "Deleting file %s, left by an earlier try of this task for another input", orphan
                    )
                    self.hook.delete_file(orphan)
            if uploads.match:
                self.log.warning(
                    "Reusing file %s, uploaded by an earlier try of this task with the same input",
                    uploads.match,
                )
                state.record(STATE_UPLOAD_KEY, {"file_id": uploads.match, "fingerprint": fingerprint})
                return uploads.match

        def find_created() -> str | None:
            return find_uploads(
                self.hook, identity, fingerprint, scan_limit=self.reattach_scan_limit, since=since
            ).match

        file_id = self.hook.upload_file(
            path, filename=upload_name(identity, fingerprint), find_created=find_created
        )
        state.record(STATE_UPLOAD_KEY, {"file_id": file_id, "fingerprint": fingerprint})
        return file_id

    def _recorded_upload(self, state: TaskState, fingerprint: str) -> str | None:
        """Return the upload an earlier try recorded for this input, if kluster still has it."""
        recorded = state.get(STATE_UPLOAD_KEY)
        if not recorded or recorded.get("fingerprint") != fingerprint or not recorded.get("file_id"):
            return None
        file_id = str(recorded["file_id"])
        try:
            self.hook.get_file(file_id)
        except KlusterNotFoundError:
            self.log.info("File %s, recorded by an earlier try, is gone; uploading again", file_id)
            return None
        self.log.warning(
            "Reusing file %s, recorded by an earlier try of this task for the same input", file_id
        )
        return file_id


def _check_single_input(**sources: Any) -> None:
    given = [name for name, value in sources.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(sources)
        raise KlusterConfigError(f"Give exactly one of {names}; got {', '.join(given) or 'none'}.")


class KlusterUploadFileOperator(_RequestInputMixin, BaseOperator):
    """Validate and upload a batch request file, or build one from a list of requests; return the file id.

    :param input_file: A JSONL request file: local path, ``ObjectStoragePath`` or URI (``s3://…``).
    :param requests: Instead of a file, a list of full batch lines, chat bodies (with ``messages``), or plain
        prompt strings; written as JSONL, streamed, with stable ``custom_id``s where missing.
    :param model: Model for requests that name none.
    :param max_completion_tokens: Default ``max_completion_tokens`` for requests that set none.
    :param body_defaults: Other default body parameters (``temperature``, …); never override a request's own.
    :param check_models: Check every model against ``list_models()`` before uploading.
    :param max_requests: Refuse files with more requests (your plan's per-batch limit); ``None`` for no limit.
    :param reattach: Reuse the file an earlier try of this task uploaded from the same content.
    :param reattach_scan_limit: How many of the newest files to look through for it.
    :param kluster_conn_id: The kluster.ai connection.
    :return: The uploaded file id.
    """

    template_fields: Sequence[str] = ("input_file", "requests", "model", "body_defaults")
    ui_color = "#e8f0ff"

    def __init__(
        self,
        *,
        input_file: Any = None,
        requests: list[Any] | None = None,
        model: str | None = None,
        max_completion_tokens: int | None = None,
        body_defaults: dict[str, Any] | None = None,
        check_models: bool = True,
        max_requests: int | None = DEFAULT_MAX_REQUESTS,
        reattach: bool = True,
        reattach_scan_limit: int = DEFAULT_SCAN_LIMIT,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.input_file = input_file
        self.requests = requests
        self.model = model
        self.max_completion_tokens = max_completion_tokens
        self.body_defaults = body_defaults
        self.check_models = check_models
        self.max_requests = max_requests
        self.reattach = reattach
        self.reattach_scan_limit = reattach_scan_limit
        self.kluster_conn_id = kluster_conn_id

    def execute(self, context: Context) -> str:
        _check_single_input(input_file=self.input_file, requests=self.requests)
        check_arguments(
            input_file=self.input_file,
            requests=self.requests,
            model=self.model,
            max_completion_tokens=self.max_completion_tokens,
            body_defaults=self.body_defaults,
            check_models=self.check_models,
            max_requests=self.max_requests,
            reattach=self.reattach,
            reattach_scan_limit=self.reattach_scan_limit,
        )
        with tempfile.TemporaryDirectory(prefix="kluster-") as workdir:
            path, summary = self.prepare_input(workdir)
            if not self.reattach:
                return self.hook.upload_file(path)
            fingerprint = input_fingerprint(
                content_sha256=summary.sha256,
                completion_window="",
                endpoint=BATCH_ENDPOINT,
                kluster_options=None,
            )
            # Its file may feed batches of other tasks: stale uploads are left alone.
            return self.upload_once(
                context, path, identity_from_context(context), fingerprint, delete_stale=False
            )


CONFIRMED = "confirmed"
RETRYING = "retrying"
FAILED = "failed"


def cancel_until_confirmed(
    hook: KlusterHook,
    batch_id: str,
    reason: str,
    *,
    budget: float,
    log: Any,
    final: bool = True,
    where: str = "worker",
    first_delay: float = 1.0,
) -> str:
    """Send a batch's cancel until kluster confirms it, retrying transient failures for up to ``budget`` seconds.

    :param final: Whether this is the last try: then a cancel that could not be sent is an ERROR naming the
        batch; otherwise the budget spent on transient failures answers ``RETRYING`` for someone else to go on.
    :param first_delay: Seconds before the first retry (doubling after each failure).
    :return: ``CONFIRMED`` (cancelling/cancelled, or the batch already ended or is gone), ``RETRYING`` or
        ``FAILED``.
    """
    attempts = CancelAttempts(started=time.monotonic(), budget=budget, first_delay=first_delay)
    log.warning("Cancelling batch %s because %s", batch_id, reason)
    while True:
        try:
            batch = hook.cancel_batch(batch_id)
        except KlusterNotFoundError:
            log.warning("Batch %s no longer exists; nothing to cancel", batch_id)
            return CONFIRMED
        except KlusterAPIError as exc:
            delay = attempts.after_failure(exc, time.monotonic())
            if delay is not None:
                log.warning("Cancel of batch %s failed (%s); trying again in %.1fs", batch_id, exc, delay)
                time.sleep(delay)
                continue
            try:
                current = hook.get_batch(batch_id)
            except KlusterAPIError:
                current = None
            if current is not None and cancel_done(current):
                log.info("Batch %s already ended %s; nothing to cancel", batch_id, current.status_text)
                return CONFIRMED
            if not final and exc.is_transient:
                return RETRYING
            log.error("%s", not_cancelled_message(batch_id, reason, attempts, where))
            return FAILED
        log.warning("Batch %s is %s: kluster confirmed the cancel (%s)", batch_id, batch.status_text, reason)
        return CONFIRMED


#: Of the worker's cancel budget, the longest wait for Airflow to say the stopped task's state and try.
WORKER_STATE_TIMEOUT = 1.5
#: Where detached cancels write their outcome, under the logs folder (``[logging] base_log_folder``).
CANCEL_LOG_FOLDER = "kluster-cancels"


def cancel_log_path(batch_id: str) -> str:
    """Return the file a detached cancel of ``batch_id`` appends its outcome to (its folder created).

    ``<base_log_folder>/kluster-cancels/<batch>.log`` — the temporary directory's ``kluster-cancels`` if the logs
    folder cannot be written.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", batch_id) + ".log"
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    folders = [
        os.path.join(
            conf.get("logging", "base_log_folder", fallback=os.path.join(home, "logs")), CANCEL_LOG_FOLDER
        ),
        os.path.join(tempfile.gettempdir(), CANCEL_LOG_FOLDER),
    ]
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return os.path.join(folder, name)
    return os.path.join(tempfile.gettempdir(), name)


@dataclasses.dataclass
class HandOver:
    """A detached cancel: its process and the file it writes its outcome to."""

    process: subprocess.Popen[bytes]
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid


def hand_over_cancel(
    settings: ClientSettings,
    batch_id: str,
    reason: str,
    *,
    log: Any,
    not_before: float | None = None,
    budget: float | None = None,
) -> HandOver | None:
    """Start a detached process that makes sure a batch's cancel lands, outliving this task.

    Airflow kills a stopped task 5 s after SIGTERM; the process, in its own session, is not killed with it. It gets
    the client settings, the key among them, on its standard input — never in its arguments or environment (the
    connection and variable variables are left out of its environment) — and writes its outcome to its own log
    file (:func:`cancel_log_path`, named in this task's log), not to the task's output, which Airflow stops
    reading when the task ends. Its other inherited file descriptors are closed.

    :param not_before: Epoch seconds before which it does nothing (the task's own cancel may land until then);
        then it reads the batch, and sends the cancel only if the batch is not cancelling or ended yet.
    :param budget: Seconds its cancel retries transient failures (default ``DEFAULT_CANCEL_BUDGET``).
    :return: The process and its log file, or ``None`` (an ERROR logged) when it could not be started.
    """
    budget = DEFAULT_CANCEL_BUDGET if budget is None else budget
    job = {
        "settings": dataclasses.asdict(settings),
        "batch_id": batch_id,
        "reason": reason,
        "budget": budget,
        "not_before": not_before,
    }
    log_path = ""
    try:
        log_path = cancel_log_path(batch_id)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "airflow_provider_kluster.operators.finish_cancel"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the task's process group, so not killed with it
                close_fds=True,
                # It needs no connection or variable of the environment: the settings come on stdin.
                env={
                    k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))
                },
            )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
    except Exception as exc:
        log.error(
            "%s",
            f"Could NOT hand the cancel of batch {batch_id} ({reason}) to a detached process: {exc}. The batch may "
            "still be running and billing: cancel it by hand (KlusterCancelBatchOperator, or the kluster.ai "
            "console).",
        )
        return None
    log.warning(
        "Detached process %d makes sure the cancel of batch %s lands (retrying for up to %.0fs after this task "
        "is killed); its outcome goes to %s",
        proc.pid,
        batch_id,
        budget,
        log_path,
    )
    return HandOver(proc, log_path)


def _within(seconds: float, call: Callable[[], _T]) -> tuple[bool, _T | None]:
    """Run ``call`` in a daemon thread, waiting at most ``seconds``: ``(True, result)`` or ``(False, None)``.

    A call still running when the time is up is left behind (a daemon thread: it cannot keep the process
    alive). Exceptions propagate.
    """
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, call()))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    worker = threading.Thread(target=run, name="kluster-on-kill", daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    if not box:
        return False, None
    ok, value = box[0]
    if not ok:
        raise value
    return True, value


class _BatchWaitMixin:
    """Wait for a batch: deferred to the triggerer, or polling on the worker; cancel it when killed."""

    kluster_conn_id: str
    poll_interval: float
    timeout_seconds: float | None
    cancel_on_kill: bool
    cancel_on_mark_success: bool
    max_consecutive_errors: int
    deferrable: bool
    log: Any
    hook: KlusterHook
    _batch_id: str | None
    _ti_ref: TaskInstanceRef | None = None

    def make_trigger(self, batch_id: str, deadline: float | None) -> KlusterBatchTrigger:
        return KlusterBatchTrigger(
            batch_id=batch_id,
            kluster_conn_id=self.kluster_conn_id,
            poll_interval=self.poll_interval,
            deadline=deadline,
            cancel_on_kill=self.cancel_on_kill,
            max_consecutive_errors=self.max_consecutive_errors,
            cancel_on_mark_success=self.cancel_on_mark_success,
            logical_date=None if self._ti_ref is None else self._ti_ref.logical_date,
        )

    def wait_for_batch(self, context: Context, batch_id: str, deadline: float | None) -> str:
        """Wait until the batch is terminal; raise unless it completed; return the batch id.

        Deferred: the trigger waits in the triggerer. Otherwise the same policy is driven here with plain
        blocking polls (no event loop, no random first-poll delay).
        """
        if self.deferrable:
            # timeout=None: the trigger's own deadline fires a "timeout" event that reaches execute_complete,
            # which cancels the batch; a framework timeout would skip both (apache/airflow#67360).
            self.defer(  # type: ignore[attr-defined]
                trigger=self.make_trigger(batch_id, deadline),
                method_name="execute_complete",
                kwargs={"batch_id": batch_id},
                timeout=None,
            )
        policy = WaitPolicy(
            batch_id=batch_id,
            poll_interval=self.poll_interval,
            deadline=deadline,
            max_consecutive_errors=self.max_consecutive_errors,
        )
        event = run_sync_wait(policy, lambda: self.hook.get_batch(batch_id), log=self.log)
        return self.execute_complete(context, event, batch_id=batch_id)

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, batch_id: str | None = None
    ) -> str:
        """Resume after the wait: validate the event, cancel on timeout, raise unless the batch completed."""
        checked = validate_event(event, batch_id)
        self._batch_id = checked["batch_id"]
        self.log.info("%s", checked["message"])
        if checked["status"] == WaitOutcome.TIMEOUT:
            self._cancel(checked["batch_id"], "the wait passed its deadline")
        raise_for_event(checked)
        return checked["batch_id"]

    def _cancel(self, batch_id: str, reason: str, *, budget: float = DEFAULT_CANCEL_BUDGET) -> bool:
        """Cancel the batch, retrying transient failures for up to ``budget`` seconds; log the outcome.

        :return: whether kluster confirmed it (``cancelling``/``cancelled``) or the batch had already ended.
        """
        return cancel_until_confirmed(self.hook, batch_id, reason, budget=budget, log=self.log) == CONFIRMED

    def on_kill(self) -> None:
        """Cancel the batch when the task was stopped by a person's action (or its run ended); otherwise leave it.

        Airflow sends SIGTERM for a person's action (clear, mark failed) but also when it stops the worker or the
        scheduler, or loses the task's heartbeats: the task instance's state and try, read back from Airflow,
        tell which (:func:`~airflow_provider_kluster.cancelling.judge_kill`). A batch left running is reattached
        to by the next try. An ``execution_timeout`` (Airflow calls this itself; no SIGKILL follows) cancels
        with the full retry budget.

        Otherwise this runs in Airflow's SIGTERM handler, and Airflow SIGKILLs the process 5 s later, so nothing
        here may outlast :data:`~airflow_provider_kluster.cancelling.WORKER_CANCEL_BUDGET` (3.5 s) counted from
        the start: Airflow's answer is awaited in a thread for at most ``WORKER_STATE_TIMEOUT`` (no answer: not
        cancelled); a decided cancel is first handed to a detached process (:func:`hand_over_cancel`), which
        waits out the budget and then cancels unless the batch already is cancelling; then one inline attempt
        without the client's retries, bounded by what is left of the budget, may confirm it in the task's log.
        """
        started = time.monotonic()
        deadline = started + WORKER_CANCEL_BUDGET
        batch_id = getattr(self, "_batch_id", None)
        if not batch_id:
            return
        if not self.cancel_on_kill:
            self.log.info("Task stopped; batch %s left running (cancel_on_kill=False)", batch_id)
            return
        timed_out = type(sys.exc_info()[1]).__name__ == "AirflowTaskTimeout"
        ref = getattr(self, "_ti_ref", None)
        if timed_out:
            facts = TaskFacts(UNKNOWN_STATE, None)
        elif ref is None:
            facts = TaskFacts(UNKNOWN_STATE, None, "this task did not record which task instance it is")
        else:
            facts = read_facts(ref, timeout=min(WORKER_STATE_TIMEOUT, deadline - time.monotonic()))
        if facts.note:
            self.log.warning("Reading the task instance back from Airflow: %s", facts.note)
        verdict = judge_kill(
            facts.state,
            where="worker",
            cancel_on_mark_success=getattr(self, "cancel_on_mark_success", False),
            execution_timeout=timed_out,
            own_try=None if ref is None else ref.try_number,
            current_try=facts.current_try,
        )
        if not verdict.cancel:
            self.log.warning(
                "Batch %s NOT cancelled: %s. The next try reattaches to it.", batch_id, verdict.reason
            )
            return
        if timed_out:  # Airflow called on_kill itself: no SIGKILL follows
            self._cancel(batch_id, verdict.reason)
            return
        ready, settings = _within(deadline - time.monotonic(), lambda: self.hook.settings)
        if not ready or settings is None:
            self.log.error(
                "%s",
                f"Could NOT cancel batch {batch_id} ({verdict.reason}): the connection could not be read before "
                "Airflow kills this task. The batch may still be running and billing: cancel it by hand "
                "(KlusterCancelBatchOperator, or the kluster.ai console).",
            )
            return
        hand_over = hand_over_cancel(
            settings,
            batch_id,
            verdict.reason,
            log=self.log,
            not_before=time.time() + deadline - time.monotonic(),
        )
        remaining = deadline - time.monotonic()
        inline = KlusterHook.from_settings(
            dataclasses.replace(settings, timeout=max(0.1, remaining), max_retries=0)
        )
        done, outcome = _within(
            remaining,
            lambda: cancel_until_confirmed(
                inline,
                batch_id,
                verdict.reason,
                budget=remaining,
                log=self.log,
                final=hand_over is None,
                first_delay=0.25,  # seconds are few: retry sooner than a full-budget cancel
            ),
        )
        if done and outcome == CONFIRMED:
            if hand_over is not None:
                hand_over.process.terminate()  # still waiting out the budget: it has nothing left to do
            return
        if hand_over is not None:
            self.log.warning(
                "The cancel of batch %s is not confirmed %.1fs after this task was stopped; detached process %d "
                "goes on and writes its outcome to %s",
                batch_id,
                time.monotonic() - started,
                hand_over.pid,
                hand_over.log_path,
            )

    def remember_task(self, context: Context) -> None:
        """Keep who this task instance is (and its try), for :meth:`on_kill` to read its state back."""
        dag_run = context.get("dag_run")
        self._ti_ref = TaskInstanceRef.of(context["ti"], getattr(dag_run, "logical_date", None))


class KlusterSubmitBatchOperator(_BatchWaitMixin, _RequestInputMixin, BaseOperator):
    """Validate, upload and submit a batch; optionally wait for it to finish.

    Input is exactly one of ``input_file``, ``input_file_id`` or ``requests``. The batch id and its platform URL go
    to XCom (keys ``batch_id`` and ``batch_url``) *before* any wait, so the UI link works even if the wait fails.

    :param input_file: A JSONL request file: local path, ``ObjectStoragePath`` or URI.
    :param input_file_id: An already uploaded file (not validated again).
    :param requests: A list of full batch lines, chat bodies or prompt strings (see the upload operator).
    :param model: Model for requests that name none.
    :param max_completion_tokens: Default ``max_completion_tokens`` for requests that set none.
    :param body_defaults: Other default body parameters; never override a request's own.
    :param completion_window: ``24h``, ``48h``, ``72h`` or ``asap`` (as soon as possible).
    :param metadata: Your metadata, kept on the batch.
    :param kluster_options: ``greedy``, ``strict_completion_window``, ``remove_input_after_processing``.
    :param check_models: Check every model against ``list_models()`` before uploading.
    :param max_requests: Refuse files with more requests (your plan's per-batch limit); ``None`` for no limit.
    :param wait_for_completion: Wait until the batch finishes; fail unless it completed.
    :param deferrable: Wait in the triggerer, freeing the worker slot (default ``[operators] default_deferrable``).
    :param poll_interval: Seconds between polls while waiting.
    :param timeout: Longest wait (seconds or timedelta) counted from submission; the batch is cancelled when it
        passes. ``None`` waits for kluster to end the batch (its completion window bounds it).
    :param cancel_on_kill: Cancel the batch when a person clears the waiting task or marks it failed (also when
        its ``execution_timeout`` passes); never when Airflow itself stops it (a worker or scheduler restart, lost
        heartbeats, a triggerer hand-over) — the next try reattaches instead. A try after a clear never reattaches
        to the cleared try's batch: it cancels it and submits a new one.
    :param cancel_on_mark_success: Also cancel the batch when the waiting task is marked success. Off by
        default: the batch's work is kept, and its results can still be fetched.
    :param max_consecutive_errors: Transient poll failures tolerated in a row.
    :param reattach: Before creating, look for the batch an earlier try of this task (same dag, task, run and map
        index) created: a running or completed one from the same input is reattached instead of paying twice;
        a failed, expired or cancelled one is replaced.
    :param on_changed_input: When an earlier try's batch was made from other input: ``"resubmit"`` (cancel it if
        still running, submit the new input) or ``"fail"``.
    :param reattach_scan_limit: How many of the newest batches and files to look through.
    :param kluster_conn_id: The kluster.ai connection.
    :return: The batch id.
    """

    template_fields: Sequence[str] = (
        "input_file",
        "input_file_id",
        "requests",
        "model",
        "body_defaults",
        "completion_window",
        "metadata",
    )
    operator_extra_links = (KlusterBatchLink(),)
    ui_color = "#e8f0ff"

    def __init__(
        self,
        *,
        input_file: Any = None,
        input_file_id: str | None = None,
        requests: list[Any] | None = None,
        model: str | None = None,
        max_completion_tokens: int | None = None,
        body_defaults: dict[str, Any] | None = None,
        completion_window: str = "24h",
        metadata: dict[str, Any] | None = None,
        kluster_options: dict[str, bool] | None = None,
        check_models: bool = True,
        max_requests: int | None = DEFAULT_MAX_REQUESTS,
        wait_for_completion: bool = False,
        deferrable: bool = _default_deferrable(),
        poll_interval: float = 60.0,
        timeout: timedelta | float | None = None,
        cancel_on_kill: bool = True,
        cancel_on_mark_success: bool = False,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
        reattach: bool = True,
        on_changed_input: str = "resubmit",
        reattach_scan_limit: int = DEFAULT_SCAN_LIMIT,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reattach = reattach
        self.on_changed_input = on_changed_input
        self.reattach_scan_limit = reattach_scan_limit
        self.input_file = input_file
        self.input_file_id = input_file_id
        self.requests = requests
        self.model = model
        self.max_completion_tokens = max_completion_tokens
        self.body_defaults = body_defaults
        self.completion_window = completion_window
        self.metadata = metadata
        self.kluster_options = kluster_options
        self.check_models = check_models
        self.max_requests = max_requests
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout_seconds = _seconds(timeout)
        self.cancel_on_kill = cancel_on_kill
        self.cancel_on_mark_success = cancel_on_mark_success
        self.max_consecutive_errors = max_consecutive_errors
        self.kluster_conn_id = kluster_conn_id
        self._batch_id: str | None = None

    def execute(self, context: Context) -> str:
        metadata = self.check_parameters()
        self.remember_task(context)
        identity = identity_from_context(context)
        with tempfile.TemporaryDirectory(prefix="kluster-") as workdir:
            path, fingerprint = self.prepare_submission(workdir)
            batch = self.find_or_create_batch(context, path, identity, fingerprint, metadata)
        self.publish(context, batch)
        if not self.wait_for_completion:
            return batch.id
        return self.wait_for_batch(context, batch.id, self.deadline_of(batch))

    def check_parameters(self) -> dict[str, Any]:
        """Refuse bad parameters before any call, each in one sentence; return the batch metadata.

        Runs in ``execute``, after templates are rendered. The metadata is checked with the provider's own keys
        (task identity, input fingerprint) and ``@kluster.ai`` counted against kluster's limits.
        """
        _check_single_input(
            input_file=self.input_file, input_file_id=self.input_file_id, requests=self.requests
        )
        check_arguments(
            input_file=self.input_file,
            input_file_id=self.input_file_id,
            requests=self.requests,
            model=self.model,
            max_completion_tokens=self.max_completion_tokens,
            body_defaults=self.body_defaults,
            completion_window=self.completion_window,
            check_models=self.check_models,
            max_requests=self.max_requests,
            wait_for_completion=self.wait_for_completion,
            deferrable=self.deferrable,
            poll_interval=self.poll_interval,
            timeout=self.timeout_seconds,
            cancel_on_kill=self.cancel_on_kill,
            cancel_on_mark_success=self.cancel_on_mark_success,
            max_consecutive_errors=self.max_consecutive_errors,
            reattach=self.reattach,
            on_changed_input=self.on_changed_input,
            reattach_scan_limit=self.reattach_scan_limit,
        )
        return build_metadata(self.metadata, self.kluster_options, reserved_keys=PROVIDER_METADATA_KEYS)

    def prepare_submission(self, workdir: str) -> tuple[Any, str]:
        """Build or take the request file and validate it (unless given a file id); return it and its fingerprint."""
        path, summary = (None, None) if self.input_file_id else self.prepare_input(workdir)
        fingerprint = input_fingerprint(
            content_sha256=summary.sha256 if summary else None,
            input_file_id=self.input_file_id,
            completion_window=self.completion_window,
            endpoint=BATCH_ENDPOINT,
            kluster_options=self.kluster_options,
        )
        return path, fingerprint

    def find_or_create_batch(
        self, context: Context, path: Any, identity: str, fingerprint: str, metadata: dict[str, Any]
    ) -> KlusterBatch:
        """Reattach to the batch an earlier try made from the same input, or upload (once) and create one.

        A create whose answer is lost is looked for (this try's identity and fingerprint) before it is sent
        again; the new batch is recorded in the task state store (Airflow 3.3+) the moment it exists.
        """
        state = TaskState.of(context)
        since = run_start(context)
        previous = self._earlier_tries(state, identity, fingerprint, since) if self.reattach else Previous()
        if previous.reusable is not None:
            self._batch_id = previous.reusable.id  # known to on_kill from here on, before it is published
            state.record(
                STATE_BATCH_KEY,
                {"batch_id": previous.reusable.id, "fingerprint": fingerprint, **state.tries()},
            )
            return previous.reusable
        if self.input_file_id:
            file_id = self.input_file_id
        elif self.reattach:
            file_id = self.upload_once(
                context,
                path,
                identity,
                fingerprint,
                delete_stale=True,
                keep=frozenset(previous.input_file_ids),
            )
        else:
            file_id = self.hook.upload_file(path)
        known = {b.id for b in (*previous.changed, *previous.replaced)}

        def find_created() -> KlusterBatch | None:
            found = find_previous(
                self.hook, identity, fingerprint, scan_limit=self.reattach_scan_limit, since=since
            ).reusable
            return found if found is not None and found.id not in known else None

        batch = self.hook.create_batch(
            file_id,
            completion_window=self.completion_window,
            metadata={
                **metadata,
                IDENTITY_KEY: identity,
                FINGERPRINT_KEY: fingerprint,
                **({MAX_TRIES_KEY: str(state.max_tries)} if state.max_tries is not None else {}),
            },
            find_created=find_created if self.reattach else None,
        )
        self._batch_id = batch.id  # a kill between here and publish still cancels it
        state.record(STATE_BATCH_KEY, {"batch_id": batch.id, "fingerprint": fingerprint, **state.tries()})
        return batch

    def publish(self, context: Context, batch: KlusterBatch) -> None:
        """Push the batch id and its page to XCom and the extra link, before any wait, so the UI shows it."""
        self._batch_id = batch.id
        url = batch_url(self.hook.settings.platform_url, batch.id)
        context["ti"].xcom_push(key=BATCH_ID_KEY, value=batch.id)
        context["ti"].xcom_push(key=BATCH_URL_KEY, value=url)
        KlusterBatchLink.persist(context, url)
        self.log.info("Batch %s (%s): %s", batch.id, batch.status_text, url)

    def deadline_of(self, batch: KlusterBatch) -> float | None:
        """Return the wait's deadline (epoch seconds) counted from the batch's creation, or ``None``.

        A retry that reattaches to the batch therefore does not extend it.
        """
        if not self.timeout_seconds:
            return None
        created = batch.created_at.timestamp() if batch.created_at else time.time()
        return created + self.timeout_seconds

    def _earlier_tries(
        self, state: TaskState, identity: str, fingerprint: str, since: dt.datetime | None
    ) -> Previous:
        """Find what earlier tries created: the recorded batch first (one call), else a scan back to ``since``."""
        previous = Previous(max_tries=state.max_tries if self.cancel_on_kill else None)
        recorded = state.get(STATE_BATCH_KEY)
        if recorded and recorded.get("batch_id"):
            recorded_id = str(recorded["batch_id"])
            try:
                batch = self.hook.get_batch(recorded_id)
            except KlusterNotFoundError:
                self.log.info("Batch %s, recorded by an earlier try, is gone", recorded_id)
            else:
                if self.cancel_on_kill and state.cleared_since(recorded):
                    previous.given_up.add(batch.id)
                classify(previous, batch, identity, fingerprint)
        if previous.reusable is None and state.needs_scan:
            previous = find_previous(
                self.hook,
                identity,
                fingerprint,
                scan_limit=self.reattach_scan_limit,
                since=since,
                found=previous,
            )
        for old in previous.replaced:
            if old.id in previous.given_up:
                self._give_up(old)
                continue
            self.log.info("An earlier try's batch %s ended %s; submitting a new one", old.id, old.status_text)
        for old in previous.changed:
            if self.on_changed_input == "fail":
                raise KlusterInputChangedError(
                    f"An earlier try of this task created batch {old.id} ({old.status_text}) from different input "
                    "or settings, and on_changed_input='fail'. Cancel or accept that batch, or set "
                    "on_changed_input='resubmit' to submit the new input."
                )
            if old.is_running:
                self._cancel(old.id, "an earlier try made it from input that has since changed")
        if previous.reusable is not None:
            self.log.warning(
                "REATTACHING to batch %s (%s), created by an earlier try of this task from the same input: "
                "no new batch is submitted.",
                previous.reusable.id,
                previous.reusable.status_text,
            )
        return previous

    def _give_up(self, batch: KlusterBatch) -> None:
        """Never reattach to a batch submitted before the task was last cleared; cancel it if it still runs.

        A clear asks for a new batch. The cleared try's own cancel may land late (a triggerer slow to act on the
        clear) or never (Airflow below 3.3 tells no trigger), so this try cancels it rather than wait on it.
        """
        self.log.warning(
            "Batch %s (%s) was submitted before this task was last cleared: a clear asks for a new batch, so it "
            "is not reattached to (cleared since).",
            batch.id,
            batch.status_text,
        )
        if batch.is_running:
            self._cancel(
                batch.id, "its task was cleared after it was submitted (a person asked for a new batch)"
            )


class KlusterGetBatchResultsOperator(KlusterLineageMixin, BaseOperator):
    """Download a finished batch's output and error files, join them to every request, return a manifest.

    Files written under ``destination`` (a local directory, ``ObjectStoragePath`` or URI): ``<batch>.output.jsonl``,
    ``<batch>.errors.jsonl`` (when kluster wrote one) and ``<batch>.results.jsonl`` — one record per request
    ``{custom_id, status: succeeded|failed|missing, content, finish_reason, usage, error, …}``. Each file is streamed
    and written through a temporary name, so re-running the task is safe.

    :param batch_id: The batch (templated; e.g. ``{{ ti.xcom_pull(task_ids='submit') }}``).
    :param destination: Where the files go.
    :param max_failed_ratio: Fail the task when more than this share of requests failed or are missing
        (``0.0`` fails on any failure; ``None`` never fails on failures).
    :param return_records: Put up to this many parsed records in the manifest (for small batches).
    :param allow_unfinished: Also fetch results of an expired or cancelled batch (partial output) instead of failing.
    :param kluster_conn_id: The kluster.ai connection.
    :param results_asset: An ``Asset`` (or its URI or name) added to the task's outlets: its event, like that of
        every Asset outlet, carries the batch id, models, request counts, tokens and records path in its extra.
    :return: The manifest: ``batch_id, status, output_path, error_path, records_path, succeeded, failed, missing,
        total, usage{prompt_tokens, completion_tokens, total_tokens}, failed_ids, missing_ids, first_errors``
        (and ``records`` when asked).
    """

    template_fields: Sequence[str] = ("batch_id", "destination")
    operator_extra_links = (KlusterBatchLink(),)
    ui_color = "#e8fff0"

    def __init__(
        self,
        *,
        batch_id: str,
        destination: Any,
        max_failed_ratio: float | None = None,
        return_records: int = 0,
        allow_unfinished: bool = False,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        results_asset: Asset | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.results_asset = declare_results_asset(self, results_asset)
        self.batch_id = batch_id
        self.destination = destination
        self.max_failed_ratio = max_failed_ratio
        self.return_records = return_records
        self.allow_unfinished = allow_unfinished
        self.kluster_conn_id = kluster_conn_id

    @cached_property
    def hook(self) -> KlusterHook:
        """Return the hook of this task's connection."""
        return KlusterHook(self.kluster_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        check_arguments(
            batch_id=self.batch_id,
            destination=self.destination,
            max_failed_ratio=self.max_failed_ratio,
            return_records=self.return_records,
            allow_unfinished=self.allow_unfinished,
        )
        batch = self.hook.get_batch(self.batch_id)
        url = batch_url(self.hook.settings.platform_url, batch.id)
        KlusterBatchLink.persist(context, url)
        self._check_finished(batch)
        dest = as_path(self.destination)
        output_path = error_path = None
        if batch.output_file_id:
            output_path = self.hook.download_file(batch.output_file_id, dest / f"{batch.id}.output.jsonl")
        if batch.error_file_id:
            error_path = self.hook.download_file(batch.error_file_id, dest / f"{batch.id}.errors.jsonl")
        records_path = dest / f"{batch.id}.results.jsonl"
        manifest = join_results(
            output_path=output_path,
            error_path=error_path,
            expected_ids=self._input_ids(batch.input_file_id),
            expected_total=batch.request_counts.total or None,
            records_path=records_path,
            return_records=self.return_records,
        )
        manifest = {
            "batch_id": batch.id,
            "status": batch.status_text,
            "output_path": str(output_path) if output_path else None,
            "error_path": str(error_path) if error_path else None,
            **manifest,
        }
        self.log.info(
            "Batch %s: %d succeeded, %d failed, %d missing of %d; %d tokens; records in %s",
            batch.id,
            manifest["succeeded"],
            manifest["failed"],
            manifest["missing"],
            manifest["total"],
            manifest["usage"]["total_tokens"],
            manifest["records_path"],
        )
        self._check_failures(context, manifest)
        self.publish_results(context, manifest, batch)
        return manifest

    def _check_finished(self, batch: KlusterBatch) -> None:
        """Raise unless the batch has results to fetch: completed, or ended partly with ``allow_unfinished``."""
        if batch.status is BatchStatus.COMPLETED:
            return
        partial = batch.status in (BatchStatus.EXPIRED, BatchStatus.CANCELLED)
        if partial and self.allow_unfinished:
            return
        prefix = f"Batch {batch.id} is {batch.status_text}, not completed: "
        if batch.is_running:
            raise KlusterBatchNotFinishedError(
                prefix + "wait for it first (KlusterBatchSensor or wait_for_completion=True).",
                batch_id=batch.id,
                status=batch.status_text,
            )
        ended: type[KlusterBatchError] = KlusterBatchFailedError
        if batch.status is BatchStatus.EXPIRED:
            ended = KlusterBatchExpiredError
        elif batch.status is BatchStatus.CANCELLED:
            ended = KlusterBatchCancelledError
        advice = (
            "set allow_unfinished=True to fetch the requests that did finish."
            if partial
            else "it has no results to fetch."
        )
        raise ended(prefix + advice, batch_id=batch.id, status=batch.status_text, errors=batch.errors)

    def _input_ids(self, input_file_id: str | None) -> Any:
        """Stream the custom_ids of the batch's input file from kluster; ``None`` if it is gone."""
        if not input_file_id:
            return None
        try:
            self.hook.get_file(input_file_id)
        except KlusterNotFoundError:
            self.log.info(
                "Input file %s is gone (removed after processing?); counting missing by totals", input_file_id
            )
            return None
        return custom_ids_of_lines(self.hook.iter_file_lines(input_file_id))

    def _check_failures(self, context: Context, manifest: dict[str, Any]) -> None:
        if self.max_failed_ratio is None or not manifest["total"]:
            return
        bad = manifest["failed"] + manifest["missing"]
        ratio = bad / manifest["total"]
        if ratio > self.max_failed_ratio:
            context["ti"].xcom_push(key=MANIFEST_KEY, value=manifest)
            raise KlusterTooManyFailuresError(
                f"Batch {manifest['batch_id']}: {bad} of {manifest['total']} requests failed or are missing "
                f"({ratio:.1%} > max_failed_ratio {self.max_failed_ratio:.1%}). First failed: "
                f"{', '.join(manifest['failed_ids'][:5]) or '-'}; errors: {'; '.join(manifest['first_errors'][:3]) or '-'}. "
                f"The results are in {manifest['records_path']} (manifest in XCom key '{MANIFEST_KEY}').",
                batch_id=manifest["batch_id"],
                status=manifest["status"],
                errors=manifest["first_errors"],
            )


class KlusterCancelBatchOperator(BaseOperator):
    """Cancel a batch; optionally wait until kluster reports it ``cancelled`` (it can take ten minutes).

    A batch that already ended is left as it is.

    :param batch_id: The batch to cancel (templated).
    :param wait_for_cancellation: Poll until the batch is terminal.
    :param poll_interval: Seconds between polls.
    :param timeout: Longest wait in seconds.
    :param kluster_conn_id: The kluster.ai connection.
    :return: The batch's final (or current) status.
    """

    template_fields: Sequence[str] = ("batch_id",)

    def __init__(
        self,
        *,
        batch_id: str,
        wait_for_cancellation: bool = False,
        poll_interval: float = 10.0,
        timeout: float = 900.0,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.wait_for_cancellation = wait_for_cancellation
        self.poll_interval = poll_interval
        self.timeout_seconds = timeout
        self.kluster_conn_id = kluster_conn_id

    def execute(self, context: Context) -> str:
        check_arguments(
            batch_id=self.batch_id,
            wait_for_cancellation=self.wait_for_cancellation,
            poll_interval=self.poll_interval,
        )
        check_positive_number("timeout", self.timeout_seconds, unit="seconds")
        hook = KlusterHook(self.kluster_conn_id)
        batch = hook.get_batch(self.batch_id)
        if batch.is_terminal:
            self.log.info("Batch %s already ended %s; nothing to cancel", batch.id, batch.status_text)
            return batch.status_text
        batch = hook.cancel_batch(self.batch_id)
        if self.wait_for_cancellation and not batch.is_terminal:
            batch_status = self._wait_until_ended(hook)
        else:
            batch_status = batch.status_text
        self.log.info("Batch %s is %s", self.batch_id, batch_status)
        return batch_status

    def _wait_until_ended(self, hook: KlusterHook) -> str:
        """Poll (with the same waiting policy as every other wait) until the batch ends; return its status."""
        policy = WaitPolicy(
            batch_id=self.batch_id,
            poll_interval=self.poll_interval,
            deadline=time.time() + self.timeout_seconds,
        )
        event = run_sync_wait(policy, lambda: hook.get_batch(self.batch_id), log=self.log)
        if event["status"] == WaitOutcome.TIMEOUT:
            raise KlusterBatchNotFinishedError(
                f"Batch {self.batch_id} is still {event['batch_status']} {self.timeout_seconds:.0f}s after "
                "cancelling; kluster can take up to 10 minutes. Check it later or raise timeout.",
                batch_id=self.batch_id,
                status=event["batch_status"] or "unknown",
            )
        if event["status"] == WaitOutcome.ERROR:
            raise_for_event(event)
        return str(event["batch_status"])
