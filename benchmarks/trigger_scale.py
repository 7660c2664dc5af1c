"""Triggerer at scale: N waiting batches in one event loop, our trigger against its peers (figures only).

The server is the emulator in a separate process, answering every poll (``GET /v1/batches/{id}``) after 100 ms
(``--latency``); its batches stay ``in_progress``. Each contender runs ``--n`` waits in one event loop, as a
triggerer does, polling every ``--poll-interval`` seconds, each in a fresh subprocess per round (clean CPU and
memory accounting), the contenders' order rotated from round to round:

* ``kluster`` — :class:`~airflow_provider_kluster.triggers.kluster.KlusterBatchTrigger` (this provider);
* ``kluster-baseline`` — the same from another source tree (``--baseline DIR``, e.g. a ``git archive`` of the
  last release), to show before/after in the same run;
* ``openai`` — ``OpenAIBatchTrigger`` of apache-airflow-providers-openai;
* ``common-ai`` — ``LLMBatchTrigger`` of apache-airflow-providers-common-ai with its ``openai`` adapter;
* ``bare-default``, ``bare-sdk``, ``bare-pooled`` — the floor: a bare loop of ``GET`` + ``json()`` + sleep per
  wait on one shared ``httpx2.AsyncClient`` with httpx2's default pool (100 connections, 20 kept alive), the
  openai SDK's (1000, 100 kept alive), or pooled like this provider's shared client (``--pool``, all kept alive).
  The floor logs nothing; the triggers log as Airflow configures a triggerer (root at INFO, ``httpx`` at WARNING),
  to ``/dev/null``.

After a warm-up (the first polls are spread over the poll interval) each child measures over ``--window``
seconds: the process's CPU time (every thread) per poll the server answered (the emulator's own counter), the
share of the scheduled polls (``n * window / poll_interval``) served, the lag of a 10 ms watchdog sleep (p50,
p99), and the RSS growth per waiting batch since before the waits started. Ratios are of CPU per poll against
``bare-pooled`` in the same round (never across rounds: the machine is shared). Nothing is asserted.

    python benchmarks/trigger_scale.py --quick
    python benchmarks/trigger_scale.py --n 1000,3000 --rounds 3 --markdown trigger_scale.md
    python benchmarks/trigger_scale.py --n 1000 --baseline /tmp/kluster-before   # before/after, same run

The peers come from the ``bench`` extra; install it in a venv of its own (``.venv-bench``), not the test venv.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

API_KEY = "bench-key-0123456789"
MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
POLL_ROUTE = "GET /v1/batches/{id}"
CONTENDERS = {
    "kluster": "KlusterBatchTrigger (this provider)",
    "kluster-baseline": "KlusterBatchTrigger from --baseline",
    "openai": "OpenAIBatchTrigger (providers-openai 2.2.0)",
    "common-ai": "LLMBatchTrigger, openai adapter (providers-common-ai 1.0.0)",
    "bare-default": "bare httpx2 loop, httpx2 default pool (100, 20 kept alive)",
    "bare-sdk": "bare httpx2 loop, openai SDK pool (1000, 100 kept alive)",
    "bare-pooled": "bare httpx2 loop, pooled like ours",
}
FLOOR = "bare-pooled"
PROFILER = cProfile.Profile()
TRIGGERS = ("kluster", "kluster-baseline", "openai", "common-ai")


# -- the child: one contender, one round -----------------------------------------------------------------


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def polls_served(base: str) -> int:
    """Return the emulator's count of polls so far (a blocking call: run it in a thread)."""
    with urllib.request.urlopen(f"{base}/_emulator/counters", timeout=30) as answer:
        return int(json.load(answer).get(POLL_ROUTE, 0))


class Watchdog:
    """How late a 10 ms sleep on the event loop wakes up (the loop's lag), read from any thread."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.since = time.monotonic()
        self.measuring = False

    async def run(self) -> None:
        while True:
            self.since = time.monotonic()
            await asyncio.sleep(0.01)
            if self.measuring:
                self.lags.append(time.monotonic() - self.since - 0.01)

    def lags_ms(self) -> list[float]:
        """Return the lags seen so far, with the sleep still overdue (a loop blocked right now) as the last."""
        lags = list(self.lags)
        overdue = time.monotonic() - self.since - 0.01
        if overdue > 0.01:
            lags.append(overdue)
        return sorted(lag * 1000 for lag in lags) or [float("nan")]


def bare_waits(ids: list[str], base_url: str, poll: float, limits: Any) -> list[Any]:
    import httpx2

    client = httpx2.AsyncClient(limits=limits, timeout=60.0)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def wait(batch_id: str) -> None:
        url = f"{base_url}/batches/{batch_id}"
        await asyncio.sleep(random.uniform(0, poll))
        while True:
            answer = await client.get(url, headers=headers)
            if answer.json()["status"] not in ("validating", "in_progress", "finalizing"):
                return
            await asyncio.sleep(poll)

    return [wait(b) for b in ids]


def trigger_waits(name: str, ids: list[str], poll: float) -> list[Any]:
    if name in ("kluster", "kluster-baseline"):
        from airflow_provider_kluster.triggers.kluster import KlusterBatchTrigger

        triggers: list[Any] = [KlusterBatchTrigger(b, poll_interval=poll) for b in ids]
    elif name == "openai":
        from airflow.providers.openai.triggers.openai import OpenAIBatchTrigger

        triggers = [
            OpenAIBatchTrigger(conn_id="openai_default", batch_id=b, poll_interval=poll, timeout=3600)
            for b in ids
        ]
    else:
        from airflow.providers.common.ai.triggers.llm_batch import LLMBatchTrigger

        end = time.time() + 3600
        triggers = [
            LLMBatchTrigger(
                llm_conn_id="llm_default",
                adapter="openai",
                batch_id=b,
                poll_interval=int(poll),
                end_time=end,
                cancel_on_kill=False,
                cancel_on_timeout=False,
            )
            for b in ids
        ]

    async def drive(trigger: Any) -> Any:
        async for event in trigger.run():
            return event.payload
        return None

    return [drive(t) for t in triggers]


async def start_waits(args: argparse.Namespace, dog: Watchdog) -> list[asyncio.Future[Any]]:
    ids = json.loads(Path(args.ids).read_text())[: args.n]
    base_url = f"http://127.0.0.1:{args.port}/v1"
    if args.child.startswith("bare"):
        import logging

        import httpx2

        logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # the floor logs nothing
        limits = {
            "bare-default": httpx2.Limits(max_connections=100, max_keepalive_connections=20),
            "bare-sdk": httpx2.Limits(max_connections=1000, max_keepalive_connections=100),
            "bare-pooled": httpx2.Limits(max_connections=args.pool, max_keepalive_connections=args.pool),
        }[args.child]
        coroutines = bare_waits(ids, base_url, args.poll_interval, limits)
    else:
        coroutines = trigger_waits(args.child, ids, args.poll_interval)
    asyncio.ensure_future(dog.run())
    return [asyncio.ensure_future(c) for c in coroutines]


def measure(args: argparse.Namespace, dog: Watchdog, tasks: list[asyncio.Future[Any]], rss0: int) -> None:
    """Take the figures from a thread of its own (a blocked loop cannot stretch the window), then exit."""
    base = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    before, first_poll_s = polls_served(base), None
    while time.monotonic() - started < args.warm:
        time.sleep(0.25)
        if first_poll_s is None and polls_served(base) > before:
            first_poll_s = time.monotonic() - started
    dog.measuring = True
    count0 = polls_served(base)
    cpu0, wall0 = time.process_time(), time.monotonic()
    while time.monotonic() - wall0 < args.window:
        time.sleep(0.25 if first_poll_s is None else args.window)
        if first_poll_s is None and polls_served(base) > before:
            first_poll_s = time.monotonic() - started
    time.sleep(max(0.0, args.window - (time.monotonic() - wall0)))
    cpu1, wall1 = time.process_time(), time.monotonic()
    count1 = polls_served(base)
    rss1 = rss_kb()
    lags_ms = dog.lags_ms()
    outcomes: dict[str, int] = {}
    ended = [t for t in list(tasks) if t.done()]
    for task in ended:
        exc = None if task.cancelled() else task.exception()
        what = f"raised {type(exc).__name__}: {exc}" if exc else f"event {task.result()}"
        outcomes[what[:300]] = outcomes.get(what[:300], 0) + 1
    polls = count1 - count0
    result = {
        "contender": args.child,
        "n": args.n,
        "polls": polls,
        "cpu_s": cpu1 - cpu0,
        "cpu_ms_per_poll": (cpu1 - cpu0) * 1000 / polls if polls else None,
        "served_pct": 100.0 * polls / (args.n * (wall1 - wall0) / args.poll_interval),
        "lag_p50_ms": lags_ms[len(lags_ms) // 2],
        "lag_p99_ms": lags_ms[min(len(lags_ms) - 1, int(len(lags_ms) * 0.99))],
        "kb_per_wait": (rss1 - rss0) / args.n,
        "first_poll_s": first_poll_s,
        "ended": len(ended),
        "outcomes": outcomes,
    }
    Path(args.result).write_text(json.dumps(result))
    if not args.profile:
        os._exit(0)  # skip unwinding thousands of waits (and blocking peers' threads)


def preload(name: str) -> None:
    """Import what the contender needs before the memory baseline (imports are not per-wait memory)."""
    import httpx2  # noqa: F401

    if os.environ.get("BENCH_BARE_AIRFLOW"):
        import airflow.triggers.base
    if name in ("kluster", "kluster-baseline"):
        import airflow_provider_kluster.triggers.kluster  # noqa: F401
    elif name == "openai":
        import airflow.providers.openai.triggers.openai
        import openai
    elif name == "common-ai":
        import airflow.providers.common.ai.batch.openai
        import airflow.providers.common.ai.triggers.llm_batch  # noqa: F401
        import openai  # noqa: F401


def child(args: argparse.Namespace) -> None:
    import threading

    preload(args.child)

    async def main() -> None:
        dog = Watchdog()
        rss0 = rss_kb()
        tasks = await start_waits(args, dog)
        monitor = threading.Thread(target=measure, args=(args, dog, tasks, rss0), daemon=True)
        monitor.start()
        while monitor.is_alive():  # only with --profile: the monitor exits the process otherwise
            await asyncio.sleep(0.5)
        PROFILER.disable()
        PROFILER.dump_stats(args.profile)
        os._exit(0)

    if args.profile:
        PROFILER.enable()
    asyncio.run(main())


# -- the parent: emulator, batches, rounds, report -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_emulator(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_kluster.emulator",
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--pre-schedule-delay",
            "0",
            "--timeout-keep-alive",
            "60",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            polls_served(f"http://127.0.0.1:{port}")
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the emulator did not start")


def create_batches(port: int, count: int, latency: float) -> list[str]:
    """Create ``count`` batches that stay ``in_progress``, every poll of them answered after ``latency``."""
    import httpx2

    base = f"http://127.0.0.1:{port}"
    faults = {"stuck": {"*": "in_progress"}, "rules": [{"route": POLL_ROUTE, "latency": latency}]}
    httpx2.put(f"{base}/_emulator/faults", json=faults).raise_for_status()
    lines = []
    for i in range(5):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}]}
        lines.append(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    with httpx2.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        upload = client.post(
            "/files", data={"purpose": "batch"}, files={"file": ("r.jsonl", "\n".join(lines).encode())}
        )
        file_id = upload.raise_for_status().json()["id"]
        request = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}

        def create(_: int) -> str:
            return client.post("/batches", json=request).raise_for_status().json()["id"]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(create, range(count)))


def child_env(port: int, home: str, pool: int, pythonpath: str | None) -> dict[str, str]:
    base_url = f"http://127.0.0.1:{port}/v1"
    env = dict(os.environ, AIRFLOW_HOME=home, AIRFLOW__CORE__LOAD_EXAMPLES="False")
    # --pool sizes our shared client too (an older tree, e.g. --baseline, ignores the extra).
    env["AIRFLOW_CONN_KLUSTER_DEFAULT"] = json.dumps(
        {"conn_type": "kluster", "host": base_url, "password": API_KEY, "extra": {"max_connections": pool}}
    )
    env["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
        {"conn_type": "openai", "host": base_url, "password": API_KEY}
    )
    env["AIRFLOW_CONN_LLM_DEFAULT"] = json.dumps(
        {"conn_type": "pydanticai", "host": base_url, "password": API_KEY}
    )
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return env


def run_child(name: str, n: int, args: argparse.Namespace, port: int, ids: str, home: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = handle.name
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--n",
        str(n),
        "--port",
        str(port),
        "--ids",
        ids,
        "--result",
        result,
        "--pool",
        str(args.pool),
        "--poll-interval",
        str(args.poll_interval),
        "--warm",
        str(args.warm),
        "--window",
        str(args.window),
    ]
    pythonpath = args.baseline if name == "kluster-baseline" else None
    timeout = args.warm + args.window + 300
    started = time.monotonic()
    proc = subprocess.run(
        command,
        env=child_env(port, home, args.pool, pythonpath),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    text = Path(result).read_text() if os.path.getsize(result) else ""
    os.unlink(result)
    if proc.returncode or not text:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"contender {name} (n={n}) failed with exit code {proc.returncode}:\n{tail}")
    figures = json.loads(text)
    figures["child_s"] = time.monotonic() - started
    return figures


def spread(values: list[float | None], fmt: str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    return "/".join(fmt.format(v) for v in (min(known), statistics.median(known), max(known)))


def report(
    results: dict[int, dict[str, list[dict[str, Any]]]], args: argparse.Namespace, contenders: list[str]
) -> str:
    lines = [
        "## Triggerer at scale",
        "",
        f"`python benchmarks/trigger_scale.py --n {','.join(map(str, results))} --rounds {args.rounds}"
        f"{' --quick' if args.quick else ''}`: each wait polled every {args.poll_interval:g} s, the emulator "
        f"answering each poll after {args.latency * 1000:.0f} ms, batches staying `in_progress`; "
        f"{args.window:g} s measured after {args.warm:g} s of warm-up, {args.rounds} round(s), contenders in "
        f"rotating order, each in its own process. Figures are min/median/max over the rounds; the ratio is CPU "
        f"per poll against `{FLOOR}` (pool {args.pool}, all kept alive) in the same round. Machine: "
        f"{os.cpu_count()} cores, shared.",
        "",
    ]
    for n, by_name in results.items():
        lines += [
            f"### {n} waiting batches",
            "",
            "| contender | CPU ms/poll | × floor (same round) | polls served % | loop lag p50 ms | "
            "loop lag p99 ms | RSS KB/wait |",
            "|---|---|---|---|---|---|---|",
        ]
        floor = by_name.get(FLOOR, [])
        for name in contenders:
            runs = by_name.get(name, [])
            ratios: list[float | None] = []
            for i, run in enumerate(runs):
                base = floor[i]["cpu_ms_per_poll"] if i < len(floor) else None
                mine = run["cpu_ms_per_poll"]
                ratios.append(mine / base if mine is not None and base else None)
            lines.append(
                f"| {name}: {CONTENDERS[name]} "
                f"| {spread([r['cpu_ms_per_poll'] for r in runs], '{:.2f}')} "
                f"| {spread(ratios, '{:.2f}') if name != FLOOR else '1'} "
                f"| {spread([r['served_pct'] for r in runs], '{:.0f}')} "
                f"| {spread([r['lag_p50_ms'] for r in runs], '{:.1f}')} "
                f"| {spread([r['lag_p99_ms'] for r in runs], '{:.0f}')} "
                f"| {spread([r['kb_per_wait'] for r in runs], '{:.1f}')} |"
            )
        lines.append("")
        for name in contenders:
            for run in by_name.get(name, []):
                for what, count in run["outcomes"].items():
                    lines.append(f"- {name}: {count} of {n} waits ended in the window: {what}")
                if run["polls"] == 0:
                    lines.append(
                        f"- {name}: served 0 polls in {args.window:g} s using {run['cpu_s']:.1f} CPU seconds"
                    )
        lines.append("")
    lines += NOTES
    return "\n".join(lines) + "\n"


NOTES = [
    "Notes:",
    "",
    "- `openai` calls its synchronous hook inside `async def run`: each poll blocks the event loop for a whole "
    "round trip, so one poll at a time is served for every trigger of the triggerer, and the loop lag is the "
    "latency itself.",
    "- `common-ai` runs every call in `asyncio.to_thread`, i.e. in the event loop's default executor: "
    "`min(32, cpus + 4)` threads (6 here) for every trigger of the process. Each trigger first builds its "
    "adapter there (a connection lookup and a new synchronous `openai.OpenAI` client, one connection pool per "
    "trigger), then each poll holds a thread for a whole round trip. The threads, not the triggers, bound the "
    "polls served: at most threads / latency polls a second whatever N is.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000", help="comma-separated numbers of waiting batches")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 waits, short rounds (under 90 s)")
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the emulator takes per poll")
    parser.add_argument("--warm", type=float, default=None, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument(
        "--pool", type=int, default=None, help="max_connections of ours and of bare-pooled (default: ours)"
    )
    parser.add_argument("--contenders", default=None, help="comma-separated (default: all installed)")
    parser.add_argument("--baseline", default=None, help="source tree of kluster-baseline")
    parser.add_argument("--markdown", default=None, help="also write the report to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.n = int(args.n)
        child(args)
        return
    if args.quick:
        args.n, args.rounds, args.poll_interval, args.window = "200", min(args.rounds, 2), 1.0, 2.0
    if args.warm is None:
        args.warm = args.poll_interval * 1.5
    if args.pool is None:
        try:
            from airflow_provider_kluster.connection import DEFAULT_MAX_CONNECTIONS

            args.pool = DEFAULT_MAX_CONNECTIONS
        except ImportError:
            args.pool = 50
    contenders = [c for c in CONTENDERS if c != "kluster-baseline" or args.baseline]
    if args.contenders:
        contenders = [c for c in args.contenders.split(",") if c in CONTENDERS]
    missing = [c for c in ("openai", "common-ai") if c in contenders and not peer_installed(c)]
    for name in missing:
        print(f"skipping {name}: not installed here (install the bench extra)", file=sys.stderr)
        contenders.remove(name)
    if FLOOR not in contenders:
        contenders.append(FLOOR)
    ns = [int(n) for n in str(args.n).split(",")]
    port = free_port()
    home = tempfile.mkdtemp(prefix="trigger-scale-")
    os.environ.update(child_env(port, home, args.pool, None))
    started = time.monotonic()
    emulator = start_emulator(port)
    try:
        ids = create_batches(port, max(ns), args.latency)
        ids_file = os.path.join(home, "ids.json")
        Path(ids_file).write_text(json.dumps(ids))
        print(f"{len(ids)} batches in_progress, in {time.monotonic() - started:.0f}s", file=sys.stderr)
        results: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for n in ns:
            results[n] = {name: [] for name in contenders}
            for round_no in range(args.rounds):
                shift = round_no % len(contenders)
                order = contenders[shift:] + contenders[:shift]
                for name in order:
                    figures = run_child(name, n, args, port, ids_file, home)
                    results[n][name].append(figures)
                    print(
                        f"n={n} round {round_no + 1} {name}: {figures['cpu_ms_per_poll'] or 0:.2f} ms/poll, "
                        f"{figures['served_pct']:.0f}% served, p99 lag {figures['lag_p99_ms']:.0f} ms, "
                        f"{figures['kb_per_wait']:.1f} KB/wait ({figures['child_s']:.0f}s)",
                        file=sys.stderr,
                    )
    finally:
        emulator.terminate()
        emulator.wait(10)
    text = report(results, args, contenders)
    print(text)
    print(f"(whole run {time.monotonic() - started:.0f}s)", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(text)
    raw = os.path.join(home, "results.json")
    Path(raw).write_text(json.dumps(results, indent=1))
    print(f"raw figures: {raw}", file=sys.stderr)


def peer_installed(name: str) -> bool:
    import importlib.util

    module = "airflow.providers.openai" if name == "openai" else "airflow.providers.common.ai"
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    main()
