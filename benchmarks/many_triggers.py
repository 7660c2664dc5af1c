"""Cost of many waiting batches in one triggerer: memory per trigger and event-loop stalls (figures only).

Starts the emulator in a separate process (so its memory does not count), creates ``--batches`` batches that stay
``in_progress``, then runs one :class:`KlusterBatchTrigger` per batch in a single event loop, as a triggerer
does, for ``--seconds``. A watchdog coroutine measures how late a 10 ms sleep wakes up (loop stall).
For comparison it also times building one ``AsyncOpenAI`` client, the cost that sharing avoids.

    python benchmarks/many_triggers.py --batches 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trigger_scale import API_KEY, free_port, start_emulator


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def watchdog(stop: asyncio.Event, lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - start - 0.01)


async def run_triggers(batch_ids: list[str], seconds: float, poll: float, trace: bool) -> dict:
    from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger

    # Warm up: one trigger builds the shared client and looks the connection up.
    warm = KlusterBatchTrigger(batch_ids[0], poll_interval=poll)
    await (await warm._hook().get_async_conn()).models.list()
    if trace:
        tracemalloc.start()
    base_traced = tracemalloc.get_traced_memory()[0]
    base_rss = rss_kb()
    stop = asyncio.Event()
    lags: list[float] = []
    dog = asyncio.create_task(watchdog(stop, lags))
    triggers = [KlusterBatchTrigger(b, poll_interval=poll) for b in batch_ids]

    async def drive(trigger):
        async for _ in trigger.run():
            return

    tasks = [asyncio.create_task(drive(t)) for t in triggers]
    await asyncio.sleep(seconds)
    traced = tracemalloc.get_traced_memory()[0] - base_traced
    rss = rss_kb() - base_rss
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, dog, return_exceptions=True)
    from airflow_provider_kluster.hooks import kluster as hook_module

    for _, client in hook_module._ASYNC_CLIENTS.values():
        await client.close()
    hook_module._ASYNC_CLIENTS.clear()
    if trace:
        tracemalloc.stop()
    lags_ms = sorted(lag * 1000 for lag in lags)
    return {
        "traced_kb_per_trigger": traced / 1024 / len(batch_ids),
        "rss_kb_per_trigger": rss / len(batch_ids),
        "lag_p50_ms": statistics.median(lags_ms),
        "lag_p99_ms": lags_ms[int(len(lags_ms) * 0.99)],
        "lag_max_ms": lags_ms[-1],
        "ended_early": sum(t.done() and not t.cancelled() for t in tasks),
    }


async def client_cost() -> tuple[float, float]:
    import openai

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x")
    elapsed = time.perf_counter() - start
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    await client.close()
    return elapsed * 1000, size / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--poll-interval", type=float, default=60.0)
    args = parser.parse_args()
    port = free_port()
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp())
    os.environ["AIRFLOW_CONN_KLUSTER_DEFAULT"] = json.dumps(
        {"conn_type": "kluster", "host": f"http://127.0.0.1:{port}/v1", "password": API_KEY}
    )
    proc = start_emulator(port)
    try:
        httpx.put(
            f"http://127.0.0.1:{port}/_emulator/faults", json={"stuck": {"*": "in_progress"}}
        ).raise_for_status()
        from airflow_provider_kluster.hooks.kluster import KlusterHook

        hook = KlusterHook()
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
            for i in range(10):
                line = {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                }
                handle.write(json.dumps(line) + "\n")
        file_id = hook.upload_file(handle.name)
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            batch_ids = list(pool.map(lambda _: hook.create_batch(file_id).id, range(args.batches)))
        print(f"created {len(batch_ids)} batches in {time.perf_counter() - start:.1f}s")
        ms, kb = asyncio.run(client_cost())
        print(
            f"one AsyncOpenAI client: {ms:.1f} ms to build, {kb:.0f} KiB traced (what sharing saves per trigger)"
        )
        # Loop lag without tracemalloc (it slows Python down); memory in a second run with it.
        figures = asyncio.run(run_triggers(batch_ids, args.seconds, args.poll_interval, trace=False))
        memory = asyncio.run(run_triggers(batch_ids, args.seconds, args.poll_interval, trace=True))
        figures["traced_kb_per_trigger"] = memory["traced_kb_per_trigger"]
    finally:
        proc.terminate()
        proc.wait(10)
    print(
        f"{args.batches} triggers polling every {args.poll_interval:.0f}s for {args.seconds:.0f}s in one loop:\n"
        f"  memory per waiting batch: {figures['traced_kb_per_trigger']:.1f} KiB traced by Python, "
        f"{figures['rss_kb_per_trigger']:.1f} KiB of RSS\n"
        f"  loop lag of a 10 ms sleep: p50 {figures['lag_p50_ms']:.2f} ms, p99 {figures['lag_p99_ms']:.2f} ms, "
        f"max {figures['lag_max_ms']:.2f} ms\n"
        f"  triggers that ended early (should be 0): {figures['ended_early']}"
    )


if __name__ == "__main__":
    main()
