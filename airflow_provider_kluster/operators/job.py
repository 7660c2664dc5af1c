"""KlusterBatchJobOperator: a whole batch-inference job — any size, failed requests retried, stalls caught, on budget."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_kluster.batches import BATCH_ENDPOINT, BatchStatus, KlusterBatch
from airflow_provider_kluster.cancelling import (
    DEFAULT_CANCEL_BUDGET,
    UNKNOWN_STATE,
    WORKER_CANCEL_BUDGET,
    judge_kill,
)
from airflow_provider_kluster.exceptions import (
    KlusterAPIError,
    KlusterBudgetError,
    KlusterConfigError,
    KlusterJobTimeoutError,
    KlusterTooManyFailuresError,
    KlusterWaitError,
)
from airflow_provider_kluster.hooks.kluster import KlusterHook
from airflow_provider_kluster.jobs import (
    JOB_PART_KEY,
    BatchFiles,
    JobWatch,
    Shard,
    Tally,
    check_watch_event,
    duplicate_ids,
    iter_lines,
    settle,
    write_shards,
)
from airflow_provider_kluster.lineage import KlusterLineageMixin, declare_results_asset
from airflow_provider_kluster.operators.kluster import (
    CONFIRMED,
    WORKER_STATE_TIMEOUT,
    _check_single_input,
    _default_deferrable,
    _seconds,
    cancel_until_confirmed,
    hand_over_cancel,
)
from airflow_provider_kluster.parameters import PROVIDER_METADATA_KEYS, build_metadata, check_arguments
from airflow_provider_kluster.paths import as_path, move_into_place, temp_sibling
from airflow_provider_kluster.pricing import (
    DEFAULT_COMPLETION_TOKENS,
    PRICE_UNIT,
    CostEstimator,
    Estimate,
    actual_cost,
    check_budget,
    merge_tables,
    price_table_from_user,
    prices_from_models,
)
from airflow_provider_kluster.reattach import (
    DEFAULT_SCAN_LIMIT,
    FINGERPRINT_KEY,
    IDENTITY_KEY,
    MAX_TRIES_KEY,
    UPLOAD_PREFIX,
    TaskState,
    _too_old,
    identity_from_context,
    input_fingerprint,
    run_start,
    upload_name,
)
from airflow_provider_kluster.request_files import (
    DEFAULT_MAX_REQUESTS,
    MAX_FILE_BYTES,
    _raise_problems,
    validate_request_file,
    write_request_file,
)
from airflow_provider_kluster.ti_state import TaskFacts, TaskInstanceRef, read_facts
from airflow_provider_kluster.triggers.job import KlusterJobTrigger
from airflow_provider_kluster.waiting import DEFAULT_MAX_CONSECUTIVE_ERRORS

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context

__all__ = ["KlusterBatchJobOperator"]
JOB_METADATA_KEYS = (*PROVIDER_METADATA_KEYS, JOB_PART_KEY)
RESULTS_NAME = "results.jsonl"
MANIFEST_NAME = "manifest.json"
#: Seconds between the job's progress lines when it waits on the worker.
_PROGRESS_EVERY = 60.0


class _Plan:
    """What one wake-up of the job computed from its input (local files, gone with the wake-up)."""

    def __init__(
        self, path: Any, requests: int, size: int, shards: list[Shard], estimate: Estimate | None
    ) -> None:
        self.path, self.requests, self.bytes, self.shards, self.estimate = (
            path,
            requests,
            size,
            shards,
            estimate,
        )


class KlusterBatchJobOperator(KlusterLineageMixin, BaseOperator):
    """Run a whole batch job: shard any input, wait for all shards, resubmit what failed, merge every answer.

    1. **Before anything is uploaded** the input (``input_file`` or ``requests``) is validated line by line,
       its cost estimated from kluster's prices (``GET /v1/models?extended=true``, USD per token; ``prices`` or
       the connection extra's ``prices`` override them), and ``max_cost`` checked.
    2. The input is streamed into shards of at most ``max_requests`` requests and ``max_file_bytes`` bytes;
       each is one batch, at most ``max_concurrent_batches`` running at a time.
    3. The batches are waited on together, in the triggerer (deferrable) or on the worker. A batch whose
       progress stops for ``stall_timeout`` seconds is cancelled; its unanswered requests are retried.
    4. Requests that failed with a retryable error (429, 5xx, timeout, expiry) or never came back are sent
       again in follow-up batches, up to ``max_attempts`` times each, within the same ``max_cost``; 400-class
       failures are final.
    5. ``destination`` gets ``results.jsonl`` — exactly one record per ``custom_id`` (its final outcome,
       ``attempts``, the ``batch_id`` that answered it) — and ``manifest.json`` (totals, usage, estimated and
       actual cost, attempts, every batch used); the manifest (without records) is returned.

    Nothing is kept between wake-ups but what kluster holds: every batch carries this task's identity (dag, task,
    run, map index), its part (``a<attempt>s<shard>``) and the fingerprint of its shard, so a retry after a crash
    at any point finds the uploads and batches it already made and ends with the same result. A cleared task
    starts the job anew (the cleared try's batches are cancelled if still running).

    :param destination: Directory (local path, ``ObjectStoragePath`` or URI) for the results, the manifest and
        the downloaded batch files (``batches/``; reused when present).
    :param input_file: A JSONL request file of any size: local path, ``ObjectStoragePath`` or URI.
    :param requests: A list of full batch lines, chat bodies or prompt strings.
    :param model: Model for requests that name none.
    :param max_completion_tokens: Default ``max_completion_tokens`` for ``requests`` items that set none (an
        ``input_file`` is sent as it is).
    :param body_defaults: Other default body parameters for ``requests`` items; never override an item's own.
    :param completion_window: ``24h``, ``48h``, ``72h`` or ``asap``; also selects the prices.
    :param metadata: Your metadata, kept on every batch (at most 12 keys: four are the provider's).
    :param kluster_options: ``greedy``, ``strict_completion_window``, ``remove_input_after_processing``.
    :param check_models: Check every model against ``list_models()`` before uploading.
    :param max_requests: Requests per batch (your plan's limit); ``None`` for one shard by size only.
    :param max_file_bytes: Bytes per uploaded shard (kluster's limit for one upload is 100 MB).
    :param multipart_threshold: Upload shards larger than this many bytes through kluster's uploads API (up to
        8 GB, in parts of up to 64 MB); ``None`` always uploads in one request. Only useful with a
        ``max_file_bytes`` above 100 MB.
    :param max_concurrent_batches: Most batches of the job running at once; ``None`` for all at once.
    :param max_attempts: Most times one request is sent (1 never resubmits).
    :param stall_timeout: Seconds without progress after which a running batch is cancelled and its
        unanswered requests resubmitted; ``None`` waits for kluster to end it.
    :param max_cost: Budget in USD for the job, resubmissions included: a job estimated over it uploads nothing,
        and resubmissions that would pass it are not sent.
    :param prices: A price table overriding kluster's: ``{model: {window: {"input": usd, "output": usd}}}`` or
        ``{model: {"input": usd, "output": usd}}`` (every window), in USD per token.
    :param default_completion_tokens: Completion tokens assumed for a request that sets no limit.
    :param max_failed_ratio: Fail the task when more than this share of requests finally failed or is missing
        (``None`` never fails on failures; the records tell which).
    :param deferrable: Wait in the triggerer, freeing the worker slot (default ``[operators]
        default_deferrable``).
    :param poll_interval: Seconds between polls of the running batches.
    :param timeout: Longest time (seconds or timedelta) for the whole job, counted from its first batch; running
        batches are cancelled when it passes.
    :param cancel_on_kill: Cancel the running batches when a person clears the task or marks it failed.
    :param cancel_on_mark_success: Also when it is marked success.
    :param max_consecutive_errors: Transient poll failures tolerated in a row per batch.
    :param reattach_scan_limit: How many of the newest batches and files to look through when the run's start
        is not known.
    :param kluster_conn_id: The kluster.ai connection.
    :param results_asset: An ``Asset`` (or its URI or name) added to the task's outlets: its event, like that of
        every Asset outlet, carries the batch ids, models, request counts, tokens, cost and paths in its extra.
    """

    template_fields: Sequence[str] = (
        "input_file",
        "requests",
        "model",
        "body_defaults",
        "completion_window",
        "metadata",
        "destination",
    )
    ui_color = "#f0e8ff"

    def __init__(
        self,
        *,
        destination: Any,
        input_file: Any = None,
        requests: list[Any] | None = None,
        model: str | None = None,
        max_completion_tokens: int | None = None,
        body_defaults: dict[str, Any] | None = None,
        completion_window: str = "24h",
        metadata: dict[str, Any] | None = None,
        kluster_options: dict[str, bool] | None = None,
        check_models: bool = True,
        max_requests: int | None = DEFAULT_MAX_REQUESTS,
        max_file_bytes: int | None = MAX_FILE_BYTES,
        multipart_threshold: int | None = None,
        max_concurrent_batches: int | None = None,
        max_attempts: int = 3,
        stall_timeout: timedelta | float | None = None,
        max_cost: float | None = None,
        prices: dict[str, Any] | None = None,
        default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS,
        max_failed_ratio: float | None = None,
        deferrable: bool = _default_deferrable(),
        poll_interval: float = 60.0,
        timeout: timedelta | float | None = None,
        cancel_on_kill: bool = True,
        cancel_on_mark_success: bool = False,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
        reattach_scan_limit: int = DEFAULT_SCAN_LIMIT,
        kluster_conn_id: str = KlusterHook.default_conn_name,
        results_asset: Asset | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.results_asset = declare_results_asset(self, results_asset)
        self.destination = destination
        self.input_file = input_file
        self.requests = requests
        self.model = model
        self.max_completion_tokens = max_completion_tokens
        self.body_defaults = body_defaults
        self.completion_window = completion_window
        self.metadata = metadata
        self.kluster_options = kluster_options
        self.check_models = check_models
        self.max_requests = max_requests
        self.max_file_bytes = max_file_bytes
        self.max_concurrent_batches = max_concurrent_batches
        self.multipart_threshold = multipart_threshold
        self.max_attempts = max_attempts
        self.stall_timeout = _seconds(stall_timeout)
        self.max_cost = max_cost
        self.prices = prices
        self.default_completion_tokens = default_completion_tokens
        self.max_failed_ratio = max_failed_ratio
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout_seconds = _seconds(timeout)
        self.cancel_on_kill = cancel_on_kill
        self.cancel_on_mark_success = cancel_on_mark_success
        self.max_consecutive_errors = max_consecutive_errors
        self.reattach_scan_limit = reattach_scan_limit
        self.kluster_conn_id = kluster_conn_id
        self._running: list[str] = []
        self._ti_ref: TaskInstanceRef | None = None

    @cached_property
    def hook(self) -> KlusterHook:
        """Return the hook of this task's connection."""
        return KlusterHook(self.kluster_conn_id)

    # -- entry points ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        self.check_parameters()
        return self._run(context, progress=None, first=True)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after a wait: cancel stalled batches (or all, past the deadline), then go on with the job."""
        self.check_parameters()
        progress = self._after_wait(event)
        return self._run(context, progress=progress, first=False)

    def check_parameters(self) -> dict[str, Any]:
        """Refuse bad parameters before any call, each in one sentence; return the batches' user metadata."""
        _check_single_input(input_file=self.input_file, requests=self.requests)
        check_arguments(
            input_file=self.input_file,
            requests=self.requests,
            model=self.model,
            max_completion_tokens=self.max_completion_tokens,
            body_defaults=self.body_defaults,
            completion_window=self.completion_window,
            check_models=self.check_models,
            max_requests=self.max_requests,
            max_file_bytes=self.max_file_bytes,
            max_concurrent_batches=self.max_concurrent_batches,
            multipart_threshold=self.multipart_threshold,
            max_attempts=self.max_attempts,
            stall_timeout=self.stall_timeout,
            max_cost=self.max_cost,
            default_completion_tokens=self.default_completion_tokens,
            destination=self.destination,
            max_failed_ratio=self.max_failed_ratio,
            deferrable=self.deferrable,
            poll_interval=self.poll_interval,
            timeout=self.timeout_seconds,
            cancel_on_kill=self.cancel_on_kill,
            cancel_on_mark_success=self.cancel_on_mark_success,
            max_consecutive_errors=self.max_consecutive_errors,
            reattach_scan_limit=self.reattach_scan_limit,
        )
        if self.prices is not None:
            price_table_from_user(self.prices, name="prices")
        return build_metadata(self.metadata, self.kluster_options, reserved_keys=JOB_METADATA_KEYS)

    def _run(self, context: Context, progress: dict[str, Any] | None, *, first: bool) -> dict[str, Any]:
        while True:
            manifest, watch = self._advance(context, progress, first=first)
            first = False
            if manifest is not None:
                self.publish_results(context, manifest)
                return manifest
            assert watch is not None
            event = self._wait_here(watch)
            progress = self._after_wait(event)

    # -- one step of the job ---------------------------------------------------------------------------

    def _advance(
        self, context: Context, progress: dict[str, Any] | None, *, first: bool = True
    ) -> tuple[dict[str, Any] | None, JobWatch | None]:
        """Recompute the job from its input and kluster; submit what may run; return the manifest or a wait.

        Deferrable, a wait defers (raises); on the worker it is returned for :meth:`_run` to drive.
        """
        identity = identity_from_context(context)
        state = TaskState.of(context)
        user_metadata = self.check_parameters()
        self._ti_ref = TaskInstanceRef.of(
            context["ti"], getattr(context.get("dag_run"), "logical_date", None)
        )
        with tempfile.TemporaryDirectory(prefix="kluster-job-") as workdir:
            plan = self._plan(workdir, validate=first)
            found = self._scan(identity, state.max_tries, run_start(context))
            if first and not found:
                self._check_budget(plan.estimate, spent=0.0, what="the job")
            started = min(
                (b.created_at.timestamp() for b in found.values() if b.created_at), default=time.time()
            )
            deadline = started + self.timeout_seconds if self.timeout_seconds else None
            expired = deadline is not None and time.time() >= deadline
            uploads = _Uploads(self, identity, run_start(context))
            ended: list[BatchFiles] = []
            batches_used: list[dict[str, Any]] = []
            shards, attempt, not_retried = plan.shards, 1, 0
            destination = as_path(self.destination)
            while True:
                parts = {shard.label: found.get(shard.label) for shard in shards}
                fingerprints = {shard.label: self._fingerprint(shard) for shard in shards}
                for shard in shards:
                    batch = parts[shard.label]
                    if batch is not None and batch.metadata.get(FINGERPRINT_KEY) != fingerprints[shard.label]:
                        raise KlusterConfigError(
                            f"Batch {batch.id} was made by an earlier try of this task for part {shard.label} of "
                            "the job, from different input or settings. The job's input must not change between "
                            "tries of one run: clear the task to start the job anew."
                        )
                running = [b for b in parts.values() if b is not None and b.is_running]
                waiting = [s for s in shards if parts[s.label] is None]
                slots = len(waiting)
                if self.max_concurrent_batches is not None:
                    slots = max(0, self.max_concurrent_batches - len(running))
                self._running = [b.id for b in running]
                for shard in waiting[:slots]:
                    if expired:
                        break
                    batch = self._submit(
                        shard, identity, fingerprints[shard.label], user_metadata, state, uploads
                    )
                    parts[shard.label] = batch
                    found[shard.label] = batch
                    running.append(batch)
                    self._running.append(batch.id)
                if expired and (running or waiting):
                    self._time_out(running, [s for s in waiting if parts[s.label] is None])
                if running:
                    self._running = [b.id for b in running]
                    total = sum(s.requests for s in shards)
                    done_before = sum(
                        b.request_counts.done for b in parts.values() if b is not None and not b.is_running
                    )
                    watch = self._watch(
                        [b.id for b in running],
                        deadline,
                        fire_on_first_end=len(waiting) > slots,
                        progress=progress,
                        total=total,
                        done_before=done_before,
                    )
                    if self.deferrable:
                        self._defer(watch)
                    return None, watch
                for shard in shards:
                    batch = parts[shard.label]
                    assert batch is not None
                    ended.append(self._download(batch, attempt, destination, workdir))
                    batches_used.append(
                        {
                            "id": batch.id,
                            "part": shard.label,
                            "status": batch.status_text,
                            "requests": shard.requests,
                            "request_counts": batch.request_counts.to_dict(),
                            "errors": list(batch.errors)[:5],
                        }
                    )
                records_tmp = as_path(f"{workdir}/records-{attempt}.jsonl")
                retry_path = as_path(f"{workdir}/retry-{attempt}.jsonl")
                with records_tmp.open("w", encoding="utf-8") as records, retry_path.open("wb") as retry:
                    tally = settle(
                        iter_lines(plan.path),
                        plan.bytes,
                        ended,
                        attempts_done=attempt,
                        max_attempts=self.max_attempts,
                        workdir=workdir,
                        records=records,
                        retry=retry,
                    )
                self.log.info(
                    "Attempt %d settled: %d succeeded, %d failed for good, %d to send again (of %d requests)",
                    attempt,
                    tally.succeeded,
                    tally.failed_permanent,
                    tally.to_retry,
                    tally.total,
                )
                if tally.to_retry == 0 or attempt >= self.max_attempts:
                    break
                retry_shards = write_shards(
                    iter_lines(retry_path),
                    workdir,
                    attempt=attempt + 1,
                    max_requests=self.max_requests,
                    max_bytes=self.max_file_bytes,
                )
                if not self._retry_within_budget(retry_path, tally, plan, retry_shards, found):
                    not_retried = tally.to_retry
                    break
                shards, attempt = retry_shards, attempt + 1
            return self._finish(context, plan, tally, attempt, batches_used, records_tmp, not_retried), None

    def _time_out(self, running: list[KlusterBatch], waiting: list[Shard]) -> None:
        """Past the job's deadline: submit nothing more, cancel what runs, fail without a retry."""
        for batch in running:
            cancel_until_confirmed(
                self.hook, batch.id, "the job passed its timeout", budget=DEFAULT_CANCEL_BUDGET, log=self.log
            )
        raise KlusterJobTimeoutError(
            f"The job passed its timeout of {self.timeout_seconds}s (counted from its first batch): "
            f"{len(running)} running batch(es) cancelled, {len(waiting)} shard(s) never submitted. Nothing more is "
            "submitted for this run; clear the task to start the job anew.",
            batch_id=",".join(b.id for b in running) or "job",
            status="timeout",
        )

    def _plan(self, workdir: str, *, validate: bool) -> _Plan:
        """Build (from ``requests``) or take the input, validate it, estimate its cost, and shard it.

        Validation (every line, duplicate ids, models) runs on a try's first wake-up, before anything is
        uploaded; later wake-ups of the same try only re-shard, and a changed input shows as a shard whose
        fingerprint no longer matches its batch.
        """
        if self.requests is not None:
            path = as_path(f"{workdir}/requests.jsonl")
            defaults = dict(self.body_defaults or {})
            if self.max_completion_tokens is not None:
                defaults.setdefault("max_completion_tokens", self.max_completion_tokens)
            write_request_file(self.requests, path, model=self.model, body_defaults=defaults)
        else:
            path = as_path(self.input_file)
        if validate:
            known = self.hook.list_models() if self.check_models else None
            summary = validate_request_file(
                path, max_requests=None, max_bytes=None, known_models=known, check_duplicates=False
            )
            duplicates = duplicate_ids(iter_lines(path), summary.bytes, workdir)
            if duplicates:
                _raise_problems(summary.path, duplicates, truncated=len(duplicates) >= 20)
        estimator = CostEstimator(default_completion_tokens=self.default_completion_tokens)

        def lines() -> Any:
            for raw in iter_lines(path):
                if raw.strip():
                    estimator.add(json.loads(raw).get("body") or {})
                yield raw

        shards = write_shards(
            lines(), workdir, attempt=1, max_requests=self.max_requests, max_bytes=self.max_file_bytes
        )
        estimate = self._estimate(estimator)
        requests, size = sum(s.requests for s in shards), sum(s.bytes for s in shards)
        self.log.info(
            "Job input %s: %d requests, %d bytes, in %d shard(s) of at most %s requests and %s bytes. %s",
            path,
            requests,
            size,
            len(shards),
            f"{self.max_requests:,}" if self.max_requests else "any number of",
            f"{self.max_file_bytes:,}" if self.max_file_bytes else "any number of",
            estimate.describe() if estimate is not None else "No cost estimate (no prices).",
        )
        return _Plan(path, requests, size, shards, estimate)

    # -- money -----------------------------------------------------------------------------------------

    @cached_property
    def price_table(self) -> dict[str, Any]:
        """kluster's prices, overridden by the connection extra's ``prices``, overridden by ``prices``."""
        table: dict[str, Any] = {}
        try:
            table = prices_from_models(self.hook.list_models_extended())
        except KlusterAPIError as exc:
            if self.max_cost is not None and self.prices is None:
                raise
            self.log.warning("Could not read kluster's prices (%s); the cost is not estimated", exc)
        extra = self.hook.get_connection(self.kluster_conn_id).extra_dejson.get("prices")
        if extra:
            table = merge_tables(table, price_table_from_user(extra, name="the connection extra's prices"))
        if self.prices:
            table = merge_tables(table, price_table_from_user(self.prices, name="prices"))
        return table

    def _estimate(self, estimator: CostEstimator) -> Estimate | None:
        table = self.price_table
        if not table and self.max_cost is None:
            return None
        source = "the given" if self.prices else "kluster's"
        return estimator.estimate(table, self.completion_window, source=source)

    def _check_budget(self, estimate: Estimate | None, *, spent: float, what: str) -> None:
        if self.max_cost is None:
            return
        assert estimate is not None
        check_budget(estimate, self.max_cost, spent=spent, what=what)

    def _retry_within_budget(
        self, retry_path: Any, tally: Tally, plan: _Plan, shards: list[Shard], found: dict[str, KlusterBatch]
    ) -> bool:
        """Whether the follow-up batches stay within ``max_cost``, counting what was spent so far."""
        if self.max_cost is None or any(s.label in found for s in shards):
            return True  # no budget, or already submitted by an earlier wake-up (which checked)
        estimator = CostEstimator(default_completion_tokens=self.default_completion_tokens)
        for raw in iter_lines(retry_path):
            if raw.strip():
                estimator.add(json.loads(raw).get("body") or {})
        estimate = estimator.estimate(self.price_table, self.completion_window)
        spent, _ = actual_cost(tally.usage_by_model, self.price_table, self.completion_window)
        try:
            check_budget(estimate, self.max_cost, spent=spent, what=f"resending {tally.to_retry:,} requests")
        except KlusterBudgetError as exc:
            self.log.warning("NOT resending %d requests: %s", tally.to_retry, exc)
            return False
        return True

    # -- kluster ---------------------------------------------------------------------------------------

    def _fingerprint(self, shard: Shard) -> str:
        return input_fingerprint(
            content_sha256=shard.sha256,
            completion_window=self.completion_window,
            endpoint=BATCH_ENDPOINT,
            kluster_options=self.kluster_options,
        )

    def _scan(self, identity: str, max_tries: int | None, since: Any) -> dict[str, KlusterBatch]:
        """Find this task's job batches on kluster (one listing), by part; cancel those of a cleared try."""
        found: dict[str, KlusterBatch] = {}
        rank: dict[BatchStatus | None, int] = {BatchStatus.COMPLETED: 0}
        for scanned, batch in enumerate(self.hook.iter_batches(), start=1):
            if _too_old(batch.created_at, since):
                break
            if since is None and scanned > self.reattach_scan_limit:
                break
            metadata = batch.metadata
            label = metadata.get(JOB_PART_KEY)
            if metadata.get(IDENTITY_KEY) != identity or not isinstance(label, str):
                continue
            submitted_under = metadata.get(MAX_TRIES_KEY)
            if max_tries is not None and submitted_under is not None and submitted_under != str(max_tries):
                # A clear asks for the job anew, whatever cancel_on_kill says of the old try's batches.
                if batch.is_running and self.cancel_on_kill:
                    cancel_until_confirmed(
                        self.hook,
                        batch.id,
                        "its task was cleared after it was submitted (a person asked for the job anew)",
                        budget=DEFAULT_CANCEL_BUDGET,
                        log=self.log,
                    )
                continue
            best = found.get(label)
            # Several batches for one part only after a lost create answer: a completed one wins, then a running one.
            if best is None or (rank.get(batch.status, 1 if batch.is_running else 2)) < (
                rank.get(best.status, 1 if best.is_running else 2)
            ):
                found[label] = batch
        if found:
            self.log.info("Found %d batch(es) of this job from earlier wake-ups or tries", len(found))
        return found

    def _submit(
        self,
        shard: Shard,
        identity: str,
        fingerprint: str,
        user_metadata: dict[str, Any],
        state: TaskState,
        uploads: _Uploads,
    ) -> KlusterBatch:
        """Upload a shard (once: an earlier try's file of the same name is reused) and create its batch."""
        file_id = uploads.get_or_upload(shard, fingerprint)
        metadata = {
            **user_metadata,
            IDENTITY_KEY: identity,
            FINGERPRINT_KEY: fingerprint,
            JOB_PART_KEY: shard.label,
            **({MAX_TRIES_KEY: str(state.max_tries)} if state.max_tries is not None else {}),
        }
        since = time.time() - 600

        def find_created() -> KlusterBatch | None:
            for batch in self.hook.iter_batches():
                if batch.created_at and batch.created_at.timestamp() < since:
                    return None
                md = batch.metadata
                if md.get(IDENTITY_KEY) == identity and md.get(JOB_PART_KEY) == shard.label:
                    if md.get(FINGERPRINT_KEY) == fingerprint and md.get(MAX_TRIES_KEY) == metadata.get(
                        MAX_TRIES_KEY
                    ):
                        return batch
            return None

        batch = self.hook.create_batch(
            file_id, completion_window=self.completion_window, metadata=metadata, find_created=find_created
        )
        self.log.info("Submitted part %s (%d requests) as batch %s", shard.label, shard.requests, batch.id)
        return batch

    def _download(self, batch: KlusterBatch, attempt: int, destination: Any, workdir: str) -> BatchFiles:
        """Download an ended batch's files into ``destination/batches`` (kept: a later wake-up reuses them)."""
        paths: dict[str, str | None] = {"output": None, "errors": None}
        for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
            if not file_id:
                continue
            target = destination / "batches" / f"{batch.id}.{kind}.jsonl"
            if not target.exists():
                self.hook.download_file(file_id, target)
            paths[kind] = _local(target, workdir)
        return BatchFiles(batch.id, attempt, paths["output"], paths["errors"])

    # -- waiting ---------------------------------------------------------------------------------------

    def _watch(
        self,
        batch_ids: list[str],
        deadline: float | None,
        *,
        fire_on_first_end: bool,
        progress: dict[str, Any] | None,
        total: int,
        done_before: int,
    ) -> JobWatch:
        return JobWatch(
            batch_ids,
            poll_interval=self.poll_interval,
            deadline=deadline,
            max_consecutive_errors=self.max_consecutive_errors,
            stall_timeout=self.stall_timeout,
            fire_on_first_end=fire_on_first_end,
            progress={k: v for k, v in (progress or {}).items() if k in batch_ids},
            job_total=total,
            job_done_before=done_before,
        )

    def _defer(self, watch: JobWatch) -> None:
        trigger = KlusterJobTrigger(
            batch_ids=watch.batch_ids,
            kluster_conn_id=self.kluster_conn_id,
            poll_interval=self.poll_interval,
            deadline=next(iter(watch.policies.values())).deadline,
            cancel_on_kill=self.cancel_on_kill,
            max_consecutive_errors=self.max_consecutive_errors,
            cancel_on_mark_success=self.cancel_on_mark_success,
            logical_date=None if self._ti_ref is None else self._ti_ref.logical_date,
            stall_timeout=self.stall_timeout,
            fire_on_first_end=watch.fire_on_first_end,
            progress={k: [v.done, v.since] for k, v in watch.seen.items()},
            job_total=watch.job_total,
            job_done_before=watch.job_done_before,
        )
        # timeout=None: the trigger's own deadline fires a "timeout" event that reaches execute_complete.
        self.defer(trigger=trigger, method_name="execute_complete", timeout=None)

    def _wait_here(self, watch: JobWatch) -> dict[str, Any]:
        """Drive the same watch with blocking polls on the worker."""
        last_line = 0.0
        while True:
            results: dict[str, KlusterBatch | KlusterAPIError] = {}
            for batch_id in watch.pending:
                try:
                    results[batch_id] = self.hook.get_batch(batch_id)
                except KlusterAPIError as exc:
                    self.log.warning("Polling batch %s failed: %s", batch_id, exc)
                    results[batch_id] = exc
            now = time.time()
            event, delay = watch.observe(results, now)
            if event is not None:
                self.log.info("%s. %s", event["message"], watch.describe(now))
                return event
            if now - last_line >= _PROGRESS_EVERY:
                self.log.info("%s", watch.describe(now))
                last_line = now
            time.sleep(delay)

    def _after_wait(self, event: Any) -> dict[str, Any]:
        """Act on a wait's event: cancel stalled batches, or every running one past the deadline; return progress."""
        try:
            checked = check_watch_event(event)
        except ValueError as exc:
            raise KlusterWaitError(f"The job's wait ended with {exc}", batch_id="job") from None
        status = checked["status"]
        if status == "timeout":
            for batch_id in checked.get("running") or []:
                cancel_until_confirmed(
                    self.hook,
                    batch_id,
                    "the job passed its timeout",
                    budget=DEFAULT_CANCEL_BUDGET,
                    log=self.log,
                )
            raise KlusterJobTimeoutError(
                f"The job passed its timeout of {self.timeout_seconds}s; its running batches were cancelled "
                f"({', '.join(checked.get('running') or []) or 'none'}). {checked.get('message', '')}",
                batch_id=",".join(checked.get("running") or []) or "job",
                status="timeout",
            )
        if status == "error":
            raise KlusterWaitError(
                f"The job's wait failed: {checked.get('message')}. Its batches keep running; a retry of this "
                "task reattaches to them.",
                batch_id=",".join(checked.get("running") or []) or "job",
            )
        for batch_id in checked.get("stalled") or []:
            self.log.warning(
                "Batch %s made no progress for %ss while running: cancelling it; its unanswered requests are "
                "sent again if attempts remain",
                batch_id,
                self.stall_timeout,
            )
            outcome = cancel_until_confirmed(
                self.hook,
                batch_id,
                f"it made no progress for {self.stall_timeout}s (stall_timeout)",
                budget=DEFAULT_CANCEL_BUDGET,
                log=self.log,
            )
            if outcome != CONFIRMED:
                raise KlusterWaitError(
                    f"Batch {batch_id} stalled and could not be cancelled; cancel it by hand, then clear this task.",
                    batch_id=batch_id,
                )
        return dict(checked.get("progress") or {})

    def on_kill(self) -> None:
        """Waiting on the worker, cancel the job's running batches when a person stopped the task; else leave them.

        The same rules as :meth:`~.kluster.KlusterSubmitBatchOperator.on_kill`: the task instance's state and try,
        read back from Airflow, tell a person's clear or mark failed (cancel) from a worker or scheduler stop (the
        next try reattaches); an ``execution_timeout`` cancels with the full retry budget. Airflow kills the
        process 5 s after SIGTERM, so each running batch's cancel is handed to a detached process at once.
        """
        running = list(self._running)
        if not running:
            return
        if not self.cancel_on_kill:
            self.log.info(
                "Task stopped; %d batch(es) of the job left running (cancel_on_kill=False)", len(running)
            )
            return
        deadline = time.monotonic() + WORKER_CANCEL_BUDGET
        timed_out = type(sys.exc_info()[1]).__name__ == "AirflowTaskTimeout"
        ref = self._ti_ref
        if timed_out or ref is None:
            facts = TaskFacts(UNKNOWN_STATE, None)
        else:
            facts = read_facts(ref, timeout=min(WORKER_STATE_TIMEOUT, deadline - time.monotonic()))
        if facts.note:
            self.log.warning("Reading the task instance back from Airflow: %s", facts.note)
        verdict = judge_kill(
            facts.state,
            where="worker",
            cancel_on_mark_success=self.cancel_on_mark_success,
            execution_timeout=timed_out,
            own_try=None if ref is None else ref.try_number,
            current_try=facts.current_try,
        )
        if not verdict.cancel:
            self.log.warning(
                "%d batch(es) of the job NOT cancelled (%s): %s. The next try reattaches to them.",
                len(running),
                ", ".join(running[:10]),
                verdict.reason,
            )
            return
        if timed_out:  # Airflow called on_kill itself: no SIGKILL follows
            for batch_id in running:
                cancel_until_confirmed(
                    self.hook, batch_id, verdict.reason, budget=DEFAULT_CANCEL_BUDGET, log=self.log
                )
            return
        settings = self.hook.settings
        for batch_id in running:
            hand_over_cancel(settings, batch_id, verdict.reason, log=self.log)

    # -- the end ---------------------------------------------------------------------------------------

    def _finish(
        self,
        context: Context,
        plan: _Plan,
        tally: Tally,
        attempts: int,
        batches: list[dict[str, Any]],
        records_tmp: Any,
        not_retried: int,
    ) -> dict[str, Any]:
        """Put the merged results and the manifest in place; fail on too many failures; return the manifest."""
        destination = as_path(self.destination)
        destination.mkdir(parents=True, exist_ok=True)
        records_path = destination / RESULTS_NAME
        _copy_into_place(records_tmp, records_path)
        spent: float | None = None
        unpriced: list[str] = []
        if self.price_table:
            spent, unpriced = actual_cost(tally.usage_by_model, self.price_table, self.completion_window)
        manifest: dict[str, Any] = {
            **tally.to_dict(),
            "attempts": attempts,
            "max_attempts": self.max_attempts,
            "not_retried_for_budget": not_retried,
            "batches": batches,
            "cost": {
                "unit": PRICE_UNIT,
                "currency": "USD",
                "estimate": plan.estimate.to_dict() if plan.estimate is not None else None,
                "actual_usd": spent,
                "unpriced_models": unpriced,
                "max_cost": self.max_cost,
            },
            "records_path": str(records_path),
            "manifest_path": str(destination / MANIFEST_NAME),
        }
        manifest_tmp = temp_sibling(destination / MANIFEST_NAME)
        with manifest_tmp.open("w", encoding="utf-8") as out:
            json.dump(manifest, out, indent=2, default=str)
        move_into_place(manifest_tmp, destination / MANIFEST_NAME)
        self._running = []
        self.log.info(
            "Job done: %d of %d requests succeeded, %d failed (%d for good), %d missing, in %d attempt(s) and %d "
            "batch(es); cost %s USD (estimated %s). Results in %s",
            tally.succeeded,
            tally.total,
            tally.failed,
            tally.failed_permanent,
            tally.missing,
            attempts,
            len(batches),
            "unknown" if spent is None else f"{spent:.4f}",
            "-" if plan.estimate is None else f"{plan.estimate.total_usd:.4f}",
            records_path,
        )
        bad = tally.failed + tally.missing
        if bad:
            self.log.warning(
                "%d request(s) did not succeed. First: %s; errors: %s",
                bad,
                ", ".join((tally.failed_ids + tally.missing_ids)[:5]),
                "; ".join(tally.first_errors[:3]) or "-",
            )
        if self.max_failed_ratio is not None and tally.total and bad / tally.total > self.max_failed_ratio:
            context["ti"].xcom_push(key="manifest", value=manifest)
            raise KlusterTooManyFailuresError(
                f"The job: {bad} of {tally.total} requests failed or are missing after {attempts} attempt(s) "
                f"({bad / tally.total:.1%} > max_failed_ratio {self.max_failed_ratio:.1%}). First: "
                f"{', '.join((tally.failed_ids + tally.missing_ids)[:5])}; errors: "
                f"{'; '.join(tally.first_errors[:3]) or '-'}. Results in {records_path}.",
                batch_id="job",
                status="completed",
                errors=tally.first_errors,
            )
        last = f"a{attempts}s"
        unfinished = [b for b in batches if b["part"].startswith(last) and b["status"] != "completed"]
        if tally.missing and unfinished and self.max_failed_ratio is None:
            # Not answers that failed but batches that did not finish (stalled and cancelled, expired, failed):
            # the job did not do its work, whatever max_failed_ratio=None lets pass.
            context["ti"].xcom_push(key="manifest", value=manifest)
            shown = ", ".join(f"{b['id']} (part {b['part']}, {b['status']})" for b in unfinished[:5])
            why = (
                f"resending them would pass max_cost={self.max_cost:g} USD"
                if not_retried
                else f"no attempts remain (max_attempts={self.max_attempts})"
            )
            stall = (
                f" A batch is cancelled when it makes no progress for stall_timeout ({self.stall_timeout:g}s)."
                if self.stall_timeout
                else ""
            )
            raise KlusterTooManyFailuresError(
                f"The job: {tally.missing} of {tally.total} requests have no answer because batch(es) {shown} did "
                f"not finish, and {why}.{stall} Raise max_attempts (or max_cost) to resend such requests, or set "
                f"max_failed_ratio to accept them. Results in {records_path}.",
                batch_id=unfinished[0]["id"],
                status=unfinished[0]["status"],
                errors=tally.first_errors,
            )
        return manifest


class _Uploads:
    """This task's uploads on kluster, by name, listed once per wake-up (when a shard needs one)."""

    def __init__(self, operator: KlusterBatchJobOperator, identity: str, since: Any) -> None:
        self.operator, self.identity, self.since = operator, identity, since
        self._by_name: dict[str, str] | None = None

    def _list(self) -> dict[str, str]:
        prefix = f"{UPLOAD_PREFIX}{self.identity[:16]}-"
        names: dict[str, str] = {}
        for scanned, item in enumerate(self.operator.hook.iter_files(), start=1):
            if _too_old(_created(item), self.since):
                break
            if self.since is None and scanned > self.operator.reattach_scan_limit:
                break
            base = str(item.get("filename") or "").rsplit("/", 1)[-1]
            if base.startswith(prefix) and item.get("id"):
                names.setdefault(base, str(item["id"]))
        return names

    def get_or_upload(self, shard: Shard, fingerprint: str) -> str:
        if self._by_name is None:
            self._by_name = self._list()
        name = upload_name(self.identity, fingerprint)
        existing = self._by_name.get(name)
        if existing:
            self.operator.log.info("Reusing file %s, uploaded earlier for part %s", existing, shard.label)
            return existing
        file_id = self.operator.hook.upload_file(
            shard.path,
            filename=name,
            find_created=lambda: self._list().get(name),
            multipart_threshold=self.operator.multipart_threshold,
        )
        self._by_name[name] = file_id
        return file_id


def _created(item: dict[str, Any]) -> Any:
    from airflow_provider_kluster.batches import parse_timestamp

    return parse_timestamp(item.get("created_at"))


def _local(path: Any, workdir: str) -> str:
    """Return a local path for a downloaded file (an object-storage file is copied into ``workdir`` first)."""
    if getattr(path, "protocol", "file") not in ("file", "local", ""):
        local = f"{workdir}/{path.name}"
        with path.open("rb") as src, open(local, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        return local
    return str(getattr(path, "path", path))  # an ObjectStoragePath's "file://…" string is no local path


def _copy_into_place(source: Any, dest: Any) -> None:
    tmp = temp_sibling(dest)
    with source.open("rb") as src, tmp.open("wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    move_into_place(tmp, dest)
