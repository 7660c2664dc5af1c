"""One submit's API calls before it creates its batch, with 2,000 batches and 2,000 files in the account.

``KlusterSubmitBatchOperator`` runs against the emulator over loopback HTTP; the emulator counts every request
per route, and the count is read the moment the operator asks for its batch to be created. The account holds
``--batches`` finished batches and ``--files`` files, all created a day before the DAG run started (as an
account in use has). Scenarios, each on Airflow 3.3+ (the task state store, faked in memory as the tests do)
and below 3.3 (no store):

* first try;
* retry after a crash between upload and create (the first try died as it was about to create);
* retry after a crash right after create (the batch exists, the first try recorded nothing after it);
* retry after create (the first try created and recorded its batch, then failed later);
* busy account: retry after a crash right after create, with 600 batches of other tasks created since
  (after the run started) — the earlier try's batch must still be found;
* run start unknown (a context without ``dag_run``): a retry after a crash right after create.

Every scenario's contenders are interleaved over ``--rounds`` rounds (each round runs every contender once, in a
rotated order); API calls are the same each round (they are counted, not timed), the submit's wall time is
printed as min/median/max, with the same-round ratio to the 3.3 first try.

When ``apache-airflow-providers-openai`` is installed (the ``bench`` extra), its ``OpenAITriggerBatchOperator``
is a contender for the first try and the retry: it scans nothing (the caller uploads the file first, one call),
so it creates at once — and a retry creates (and pays for) a second batch.

    python benchmarks/submit_calls.py [--quick] [--rounds 3] [--markdown section.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if "AIRFLOW_HOME" not in os.environ:  # never touch ~/airflow
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="kluster-bench-home-")

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
PROMPTS = ["What is 1+1?", "Name a colour.", "Say hi."]
CREATE = "POST /v1/batches"
#: How long before the run started the account's old batches and files were made.
OLD = 86_400.0
#: Batches of other tasks created after the run started, in the busy-account scenario (more than five pages).
BUSY = 600


class SimulatedCrash(BaseException):
    """The worker process dying: nothing in the operator may catch it."""


class Store(dict):  # type: ignore[type-arg]
    """A task state store (Airflow 3.3's ``task_state_store``) kept in memory across tries."""

    def set(self, key: str, value: Any, **_: Any) -> None:
        self[key] = value


class TI:
    """The slice of a task instance the operator uses."""

    def __init__(self, run_id: str, try_number: int, map_index: int = -1) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = "bench", "submit", run_id, map_index
        self.try_number, self.max_tries = try_number, 3
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value") -> Any:
        return self.xcom.get(key)


@dataclass
class DagRun:
    start_date: dt.datetime | None
    queued_at: dt.datetime | None = None
    logical_date: dt.datetime | None = None


@dataclass
class Run:
    """One DAG run of the benchmark's task: every try shares the run id, the start and (3.3+) the store."""

    store: Store | None
    start: dt.datetime | None
    run_id: str = field(default_factory=lambda: f"manual__{uuid.uuid4().hex}")

    def context(self, try_number: int) -> dict[str, Any]:
        context: dict[str, Any] = {"ti": TI(self.run_id, try_number)}
        if self.start is not None:
            context["dag_run"] = DagRun(start_date=self.start, queued_at=self.start)
        if self.store is not None:
            context["task_state_store"] = self.store
        return context


@dataclass
class Outcome:
    """What the measured try did."""

    before_create: dict[str, int]  # API calls per route before the create (all of them if it created nothing)
    created: int  # batches the whole run created
    reattached: bool  # the measured try returned an earlier try's batch
    seconds: float  # the measured try's wall time

    @property
    def calls(self) -> int:
        return sum(self.before_create.values())


def api_calls(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if " /v1/" in k}


@contextlib.contextmanager
def create_hook(seen: list[dict[str, int]], emulator: Any, crash: str | None = None) -> Iterator[None]:
    """Note the emulator's counters as the create is asked for; ``crash`` "before" or "after" it (once)."""
    from airflow_provider_kluster.hooks.kluster import KlusterHook

    original = KlusterHook.create_batch

    def create_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(api_calls(emulator.counters))
        if crash == "before":
            raise SimulatedCrash("worker killed before create")
        batch = original(self, *args, **kwargs)
        if crash == "after":
            raise SimulatedCrash("worker killed after create")
        return batch

    KlusterHook.create_batch = create_batch  # type: ignore[method-assign]
    try:
        yield
    finally:
        KlusterHook.create_batch = original  # type: ignore[method-assign]


def submit(context: dict[str, Any], emulator: Any, crash: str | None = None) -> tuple[str | None, list[dict]]:
    from airflow_provider_kluster.operators.kluster import KlusterSubmitBatchOperator

    op = KlusterSubmitBatchOperator(task_id="submit", requests=PROMPTS, model=MODEL, deferrable=False)
    seen: list[dict[str, int]] = []
    with create_hook(seen, emulator, crash):
        try:
            return op.execute(context), seen
        except SimulatedCrash:
            return None, seen


def fresh_account(server: Any, batches: int, files: int) -> None:
    emulator = server.emulator
    emulator.reset()
    emulator.faults.stick_batch(
        "*", "in_progress"
    )  # batches stay running: a retry reattaches, never re-creates
    emulator.seed_batches(batches, age=OLD + 60)
    emulator.seed_files(files, age=OLD + 60)


def measure(server: Any, scenario: str, store: bool, batches: int, files: int) -> Outcome:
    """Run ``scenario`` on a fresh account; return what its measured (last) try did."""
    emulator = server.emulator
    fresh_account(server, batches, files)
    start = (
        None if scenario == "start unknown" else dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    )
    run = Run(store=Store() if store else None, start=start)
    first = None
    if scenario != "first try":
        crash = {"after upload": "before", "after create": None}.get(scenario, "after")
        submit(run.context(1), emulator, crash)
        first = (emulator.list_batch_ids() or [None])[0]
        if scenario == "busy account":
            emulator.seed_batches(
                BUSY, age=1.0, status="in_progress", metadata={"airflow_task_identity": "other"}
            )
    before = api_calls(emulator.counters)
    started = time.perf_counter()
    batch_id, seen = submit(run.context(1 if scenario == "first try" else 2), emulator)
    seconds = time.perf_counter() - started
    at_create = seen[0] if seen else api_calls(emulator.counters)
    delta = {k: at_create.get(k, 0) - before.get(k, 0) for k in at_create}
    return Outcome(
        before_create={k: v for k, v in delta.items() if v and k != CREATE},
        created=emulator.counters.get("batches_created", 0),
        reattached=batch_id is not None and batch_id == first,
        seconds=seconds,
    )


# -- the OpenAI provider's operator (optional contender) -----------------------------------------------
def openai_available() -> bool:
    try:
        import airflow.providers.openai.operators.openai  # noqa: F401
    except ImportError:
        return False
    return True


def openai_submit(server: Any, tries: int) -> Outcome:
    """The OpenAI provider's way: upload the file (one call), then ``OpenAITriggerBatchOperator`` creates."""
    from airflow.providers.openai.hooks.openai import OpenAIHook
    from airflow.providers.openai.operators.openai import OpenAITriggerBatchOperator

    emulator = server.emulator
    before = api_calls(emulator.counters)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": p}]},
        }
        for i, p in enumerate(PROMPTS)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        seen: list[dict[str, int]] = []
        started = time.perf_counter()
        for _ in range(tries):  # each try: its upload task and its batch task run again
            file_id = OpenAIHook(conn_id="openai_bench").upload_file(str(path), purpose="batch").id
            op = OpenAITriggerBatchOperator(
                task_id="batch",
                file_id=file_id,
                endpoint="/v1/chat/completions",
                conn_id="openai_bench",
                wait_for_completion=False,
                deferrable=False,
            )
            seen.append(api_calls(emulator.counters))
            op.execute({})
        seconds = time.perf_counter() - started
    at_create = seen[-1]
    delta = {k: at_create.get(k, 0) - before.get(k, 0) for k in at_create}
    # The last try's calls before its create: its upload (the earlier try's calls are not counted).
    if tries > 1:
        earlier = seen[-2]
        delta = {k: at_create.get(k, 0) - earlier.get(k, 0) - (1 if k == CREATE else 0) for k in at_create}
    return Outcome(
        before_create={k: v for k, v in delta.items() if v > 0 and k != CREATE},
        created=emulator.counters.get("batches_created", 0),
        reattached=False,
        seconds=seconds / tries,
    )


def measure_openai(server: Any, scenario: str, batches: int, files: int) -> Outcome:
    fresh_account(server, batches, files)
    return openai_submit(server, tries=1 if scenario == "first try" else 2)


# -- rounds and report ---------------------------------------------------------------------------------
SCENARIOS = [
    "first try",
    "after upload",
    "after crash on create",
    "after create",
    "busy account",
    "start unknown",
]
TITLES = {
    "first try": "first try",
    "after upload": "retry after a crash between upload and create",
    "after crash on create": "retry after a crash right after create",
    "after create": "retry after create (recorded)",
    "busy account": f"busy account: retry after a crash right after create, {BUSY} newer batches",
    "start unknown": "run start unknown: retry after a crash right after create",
}


def contenders(openai: bool) -> list[tuple[str, str, Callable[[Any, int, int], Outcome]]]:
    found = []
    for scenario in SCENARIOS:
        for label, store in (("kluster, Airflow 3.3 (store)", True), ("kluster, Airflow < 3.3", False)):
            found.append((scenario, label, lambda s, b, f, sc=scenario, st=store: measure(s, sc, st, b, f)))
        if openai and scenario in ("first try", "after create"):
            found.append(
                (scenario, "OpenAI provider 2.2", lambda s, b, f, sc=scenario: measure_openai(s, sc, b, f))
            )
    return found


def describe(routes: dict[str, int]) -> str:
    if not routes:
        return "—"
    short = {
        "GET /v1/models": "models",
        "GET /v1/batches": "list batches",
        "GET /v1/files": "list files",
        "POST /v1/files": "upload",
        "GET /v1/batches/{id}": "get batch",
        "GET /v1/files/{id}": "get file",
        "POST /v1/batches/{id}/cancel": "cancel",
        "DELETE /v1/files/{id}": "delete file",
    }
    return ", ".join(f"{short.get(k, k)}{f' ×{v}' if v > 1 else ''}" for k, v in sorted(routes.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (the default is 5)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--markdown", type=Path, help="also write the section as markdown to this file")
    args = parser.parse_args(argv)
    rounds = max(3, args.rounds or (3 if args.quick else 5))

    from airflow_provider_kluster.emulator import EmulatorServer

    openai = openai_available()
    results: dict[tuple[str, str], list[Outcome]] = {}
    with EmulatorServer(requests_per_second=100_000, pre_schedule_delay=0.05, finalize_delay=0.05) as server:
        os.environ["AIRFLOW_CONN_KLUSTER_DEFAULT"] = json.dumps(
            {
                "conn_type": "kluster",
                "host": server.base_url,
                "password": server.api_key,
                "extra": {"max_retries": 2, "timeout": 30},
            }
        )
        os.environ["AIRFLOW_CONN_OPENAI_BENCH"] = json.dumps(
            {
                "conn_type": "openai",
                "password": server.api_key,
                "extra": {"openai_client_kwargs": {"base_url": server.base_url}},
            }
        )
        runs = contenders(openai)
        for r in range(rounds):
            shift = r % len(runs)
            for scenario, label, run in runs[shift:] + runs[:shift]:  # rotate who goes first each round
                results.setdefault((scenario, label), []).append(run(server, args.batches, args.files))
        server.emulator.reset()

    lines = [
        f"## Submit: API calls before create ({args.batches:,} batches and {args.files:,} files in the account)",
        "",
        f"`benchmarks/submit_calls.py`: `KlusterSubmitBatchOperator` against the emulator over loopback HTTP, "
        f"{rounds} interleaved rounds. *Calls before create* are counted by the emulator per route (the same in "
        "every round); *created* is the batches the run made in all (more than 1 pays twice); wall time of the "
        "measured try min / median / max, and its median same-round ratio to the Airflow 3.3 first try. "
        "The account's batches and files were all created a day before the run started.",
        "",
        "| scenario | contender | calls before create | which | created | found earlier batch | ms min / med / max | × 3.3 first try |",
        "|---|---|---:|---|---:|---|---|---:|",
    ]
    baseline = results[("first try", "kluster, Airflow 3.3 (store)")]
    worst = 0
    for (scenario, label), outcomes in results.items():
        calls = sorted(o.calls for o in outcomes)
        worst = max(worst, calls[-1]) if label.startswith("kluster") else worst
        ms = [o.seconds * 1000 for o in outcomes]
        ratios = [o.seconds / b.seconds for o, b in zip(outcomes, baseline, strict=False) if b.seconds]
        count = str(calls[0]) if calls[0] == calls[-1] else f"{calls[0]}–{calls[-1]}"
        found = (
            "—" if scenario == "first try" else ("yes" if all(o.reattached for o in outcomes) else "**no**")
        )
        if label.startswith("OpenAI"):
            found = "no (new batch)" if scenario != "first try" else "—"
        lines.append(
            f"| {TITLES[scenario]} | {label} | {count} | {describe(outcomes[-1].before_create)} | "
            f"{outcomes[-1].created} | {found} | {min(ms):.0f} / {statistics.median(ms):.0f} / {max(ms):.0f} | "
            f"{statistics.median(ratios):.2f} |"
        )
    lines += [
        "",
        f"Most API calls any kluster submit made before creating: **{worst}**.",
    ]
    if not openai:
        lines.append("The OpenAI provider is not installed (the `bench` extra): its contender was skipped.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
