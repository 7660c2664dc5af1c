"""What a whole job costs the worker: peak memory of sharding and merging, and API calls of a 100-shard job.

Figures are printed, nothing is asserted.

``rss``: for each input size (default 10, 100 and 1024 MiB) a child process runs the job operator's local steps
on a generated request file — validate it, check its ids for duplicates (on disk), estimate its cost and stream it
into shards of at most 100,000 requests / 100 MB — then settles it against a result file of one line per request
(1 in 50 failed with a retryable 500), writing the merged records and the follow-up input. It reports its peak
RSS (``ru_maxrss``) after each step.

``calls``: runs ``KlusterBatchJobOperator`` against the emulator over loopback HTTP with ``--shards`` shards
(default 100, 20 requests each, 2 % transient failures, so one follow-up batch), each deferral's trigger run
inline as the triggerer would, and prints the emulator's count of calls per route.

    python benchmarks/job_scale.py rss --sizes 10 100 1024
    python benchmarks/job_scale.py calls --shards 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from airflow_provider_kluster import jobs
    from airflow_provider_kluster.pricing import CostEstimator, Price
    from airflow_provider_kluster.request_files import validate_request_file

    source, output, workdir = sys.argv[1:4]
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"start_mib": peak()}
    t0 = time.perf_counter()
    summary = validate_request_file(source, max_requests=None, max_bytes=None, check_duplicates=False)
    figures["validate_mib"], figures["validate_s"] = peak(), time.perf_counter() - t0
    t0 = time.perf_counter()
    assert jobs.duplicate_ids(jobs.iter_lines(source), summary.bytes, workdir) == []
    figures["duplicates_mib"], figures["duplicates_s"] = peak(), time.perf_counter() - t0
    t0 = time.perf_counter()
    estimator = CostEstimator()
    def lines():
        for raw in jobs.iter_lines(source):
            estimator.add(json.loads(raw)["body"])
            yield raw
    shards = jobs.write_shards(lines(), workdir, attempt=1, max_requests=100_000, max_bytes=100 * 2**20)
    estimate = estimator.estimate({summary.models[0]: {"*": Price(1e-7, 2e-7)}}, "24h")
    figures["shard_mib"], figures["shard_s"] = peak(), time.perf_counter() - t0
    t0 = time.perf_counter()
    ended = [jobs.BatchFiles("b1", 1, output, None)]
    with open(f"{workdir}/records.jsonl", "w") as records, open(f"{workdir}/retry.jsonl", "wb") as retry:
        tally = jobs.settle(jobs.iter_lines(source), summary.bytes, ended, attempts_done=1, max_attempts=3,
                            workdir=workdir, records=records, retry=retry)
    figures["settle_mib"], figures["settle_s"] = peak(), time.perf_counter() - t0
    figures.update(requests=summary.requests, bytes=summary.bytes, shards=len(shards),
                   to_retry=tally.to_retry, succeeded=tally.succeeded, estimate_usd=estimate.total_usd,
                   buckets=jobs.bucket_count(summary.bytes + summary.bytes))
    print(json.dumps(figures))
    """
)


def make_files(directory: Path, size: int) -> tuple[Path, Path]:
    """Write a request file of about ``size`` bytes and a result file answering each of its requests."""
    source, output = directory / "requests.jsonl", directory / "output.jsonl"
    filler = "Summarise this paragraph in one sentence. " * 8
    n = 0
    with source.open("w") as src, output.open("w") as out:
        written = 0
        while written < size:
            line = json.dumps(
                {
                    "custom_id": f"request-{n}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{n}: {filler}"}]},
                }
            )
            src.write(line + "\n")
            written += len(line) + 1
            if n % 50 == 7:
                answer = {
                    "custom_id": f"request-{n}",
                    "response": {
                        "status_code": 500,
                        "body": {"error": {"message": "boom", "code": "server_error"}},
                    },
                }
            else:
                answer = {
                    "custom_id": f"request-{n}",
                    "response": {
                        "status_code": 200,
                        "body": {
                            "model": MODEL,
                            "choices": [
                                {
                                    "message": {"role": "assistant", "content": "x" * 200},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {"prompt_tokens": 90, "completion_tokens": 50, "total_tokens": 140},
                        },
                    },
                }
            out.write(json.dumps(answer) + "\n")
            n += 1
    return source, output


def rss(sizes: list[int]) -> None:
    print(
        f"{'input':>8} {'requests':>10} {'shards':>6} | peak RSS MiB after: start validate duplicates shard settle | seconds"
    )
    for size_mib in sizes:
        with tempfile.TemporaryDirectory(prefix="kluster-job-bench-") as tmp:
            source, output = make_files(Path(tmp), size_mib * 2**20)
            work = Path(tmp) / "work"
            work.mkdir()
            result = subprocess.run(
                [sys.executable, "-c", CHILD, str(source), str(output), str(work)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "AIRFLOW_HOME": tmp},
            )
            f = json.loads(result.stdout.strip().splitlines()[-1])
            seconds = f["validate_s"] + f["duplicates_s"] + f["shard_s"] + f["settle_s"]
            print(
                f"{size_mib:>6}Mi {f['requests']:>10,} {f['shards']:>6} | {f['start_mib']:>6.0f} {f['validate_mib']:>8.0f} "
                f"{f['duplicates_mib']:>10.0f} {f['shard_mib']:>5.0f} {f['settle_mib']:>6.0f} | {seconds:>6.0f}"
                f"  (to retry: {f['to_retry']:,})",
                flush=True,
            )


def calls(shards: int, per_shard: int) -> None:
    import asyncio

    from airflow_provider_kluster.emulator import EmulatorServer

    with (
        tempfile.TemporaryDirectory(prefix="kluster-job-calls-") as tmp,
        EmulatorServer(requests_per_second=100_000, pre_schedule_delay=0.05, finalize_delay=0.05) as server,
    ):
        os.environ["AIRFLOW_CONN_KLUSTER_DEFAULT"] = json.dumps(
            {"conn_type": "kluster", "host": server.base_url, "password": server.api_key}
        )
        server.emulator.faults.transient_share = 0.02
        source = Path(tmp) / "in.jsonl"
        with source.open("w") as out:
            for i in range(shards * per_shard):
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]}
                out.write(
                    json.dumps(
                        {"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                    )
                    + "\n"
                )
        from airflow.sdk.exceptions import TaskDeferred

        from airflow_provider_kluster.operators.job import KlusterBatchJobOperator

        class TI:
            dag_id, task_id, run_id, map_index = "bench", "job", "manual__bench", -1

            def xcom_push(self, key, value):
                pass

        op = KlusterBatchJobOperator(
            task_id="job",
            input_file=str(source),
            destination=f"{tmp}/out",
            max_requests=per_shard,
            poll_interval=2.0,
            deferrable=True,
            max_cost=100.0,
        )
        context = {"ti": TI()}
        call = lambda: op.execute(context)  # noqa: E731
        waits = 0
        t0 = time.perf_counter()
        while True:
            try:
                manifest = call()
                break
            except TaskDeferred as deferred:
                waits += 1
                _, kwargs = deferred.trigger.serialize()
                trigger = type(deferred.trigger)(**kwargs)

                async def first(trigger=trigger):
                    async for event in trigger.run():
                        return event.payload

                event = asyncio.run(first())
                call = lambda event=event: op.execute_complete(context, event=event)  # noqa: E731
        elapsed = time.perf_counter() - t0
        counts = {k: v for k, v in server.emulator.counters.items() if " /v1/" in k}
    print(
        f"{shards} shards x {per_shard} requests: {manifest['succeeded']:,} of {manifest['total']:,} succeeded in "
        f"{manifest['attempts']} attempts, {len(manifest['batches'])} batches, {waits} deferrals, {elapsed:.0f}s"
    )
    print(f"API calls: {sum(counts.values())} in all")
    for route, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>6}  {route}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1024], help="input sizes in MiB")
    c = sub.add_parser("calls")
    c.add_argument("--shards", type=int, default=100)
    c.add_argument("--per-shard", type=int, default=20)
    args = parser.parse_args()
    if args.what == "rss":
        rss(args.sizes)
    else:
        calls(args.shards, args.per_shard)


if __name__ == "__main__":
    main()
