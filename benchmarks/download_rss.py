"""Peak memory of downloading (and uploading) large files through KlusterHook (figures printed, nothing asserted).

Makes a result file of ``--size-mb`` (default 1024) in kluster's output-line format, serves it from the emulator
on loopback, and downloads it with ``KlusterHook.download_file`` in a child process that reports its peak RSS
(``ru_maxrss``) before and after the download; then uploads a 95 MiB request file (under kluster's 100 MB limit)
the same way and reports the peak again.

    python benchmarks/download_rss.py --size-mb 1024
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

from airflow_provider_kluster.emulator import EmulatorServer

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from airflow_provider_kluster.hooks.kluster import KlusterHook

    hook = KlusterHook()
    hook.get_conn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    dest = hook.download_file(sys.argv[1], sys.argv[2])
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    hook.upload_file(sys.argv[3])
    upload_seconds = time.perf_counter() - start
    after_upload = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "peak_kb": after, "seconds": elapsed, "bytes": dest.stat().st_size,
                      "upload_seconds": upload_seconds, "peak_after_upload_kb": after_upload}))
    """
)


def make_result_file(path: Path, size: int) -> int:
    line = {
        "id": "batch-req-0",
        "custom_id": "request-0",
        "response": {
            "status_code": 200,
            "request_id": "req-0",
            "body": {
                "id": "chatcmpl-0",
                "object": "chat.completion",
                "model": "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "x" * 600},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 48, "completion_tokens": 150, "total_tokens": 198},
            },
        },
    }
    block = "".join(json.dumps({**line, "custom_id": f"request-{i}"}) + "\n" for i in range(1000)).encode()
    written = 0
    with path.open("wb") as out:
        while written < size:
            out.write(block)
            written += len(block)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kluster-bench-") as tmp:
        source = Path(tmp) / "output.jsonl"
        t0 = time.perf_counter()
        size = make_result_file(source, args.size_mb * 1024 * 1024)
        print(f"made a {size / 2**20:.0f} MiB result file in {time.perf_counter() - t0:.1f}s")
        upload = Path(tmp) / "requests.jsonl"
        with source.open("rb") as src, upload.open("wb") as dst:
            dst.write(src.read(95 * 2**20))
        with EmulatorServer() as server:
            file_id = server.emulator.add_file(source, purpose="batch-output", copy=False)
            env = dict(os.environ)
            env["AIRFLOW_CONN_KLUSTER_DEFAULT"] = json.dumps(
                {"conn_type": "kluster", "host": server.base_url, "password": server.api_key}
            )
            env.setdefault("AIRFLOW_HOME", tmp)
            result = subprocess.run(
                [sys.executable, "-c", CHILD, file_id, str(Path(tmp) / "downloaded.jsonl"), str(upload)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    mib = figures["bytes"] / 2**20
    print(f"downloaded {mib:.0f} MiB in {figures['seconds']:.1f}s ({mib / figures['seconds']:.0f} MiB/s)")
    print(
        f"peak RSS before the download (interpreter + Airflow + openai): {figures['before_kb'] / 1024:.1f} MiB"
    )
    print(
        f"peak RSS after the download:                                   {figures['peak_kb'] / 1024:.1f} MiB"
    )
    print(
        f"growth during the download:                                    {(figures['peak_kb'] - figures['before_kb']) / 1024:.1f} MiB"
    )
    print(
        f"uploaded 95 MiB in {figures['upload_seconds']:.1f}s; peak RSS after it: "
        f"{figures['peak_after_upload_kb'] / 1024:.1f} MiB"
    )


if __name__ == "__main__":
    main()
