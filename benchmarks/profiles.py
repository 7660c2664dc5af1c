"""Where the time goes: cProfile of the paths ``make bench`` compares with their floors (figures only).

``bench.py`` says how far each path is from its floor; this says why, function by function, for what is left:

* ``trigger`` — ``--n`` :class:`~airflow_provider_kluster.triggers.kluster.KlusterBatchTrigger` waits in one event
  loop against the emulator (100 ms per poll), as ``trigger_scale.py`` runs them, profiled over ``--window``;
* ``join`` — ``join_results`` over a 64 MiB output file and its error file, records written;
* ``validate`` — ``validate_request_file`` over a 24 MiB request file;
* ``build`` — ``write_request_file`` from 25,000 prompt strings.

Each prints the functions with the most time of their own (``tottime``) and their share of the run. cProfile
slows Python code more than C code, so shares of Python functions are upper bounds.

    python benchmarks/profiles.py                     # all four
    python benchmarks/profiles.py join validate       # some
    python benchmarks/profiles.py trigger --n 1000 --window 20 --markdown /tmp/profiles.md
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOP = 12
#: cProfile's names of the event loop's wait for I/O.
_IDLE = frozenset(
    {"<method 'poll' of 'select.epoll' objects>", "<method 'select' of 'select.epoll' objects>"}
)


def _table(stats: pstats.Stats, title: str, top: int = TOP) -> str:
    """The ``top`` functions by own time, as markdown."""
    raw = dict(stats.stats)  # type: ignore[attr-defined]
    # Time blocked in the selector is the loop waiting for answers, not work: left out of the shares.
    idle = {key: value for key, value in raw.items() if key[2] in _IDLE}
    for key in idle:
        del raw[key]
    total = sum(tt for _, _, tt, _, _ in raw.values()) or 1e-9
    waited = sum(value[2] for value in idle.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [
        f"#### {title}",
        "",
        f"Own time {total:.2f} s"
        + (f" (and {waited:.2f} s blocked in the selector, left out)." if idle else "."),
        "",
        "| own time s | share | calls | cumulative s | function |",
        "|---:|---:|---:|---:|---|",
    ]
    for (filename, line, name), (_, calls, tt, ct, _) in rows:
        where = name if filename == "~" else f"{name} ({_short(filename)}:{line})"
        lines.append(f"| {tt:.3f} | {100 * tt / total:.0f} % | {calls:,} | {ct:.3f} | `{where}` |")
    return "\n".join(lines) + "\n"


def _short(filename: str) -> str:
    """A source path from the package or site-packages on, else its base name."""
    for marker in ("airflow_provider_kluster/", "site-packages/"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return marker + tail if marker == "airflow_provider_kluster/" else tail
    return os.path.basename(filename)


def _profile(call, *args, **kwargs) -> pstats.Stats:  # type: ignore[no-untyped-def]
    profiler = cProfile.Profile()
    profiler.enable()
    call(*args, **kwargs)
    profiler.disable()
    return pstats.Stats(profiler, stream=io.StringIO())


def profile_trigger(n: int, window: float) -> str:
    import trigger_scale as ts

    port = ts.free_port()
    home = tempfile.mkdtemp(prefix="profile-trigger-")
    pool = 50
    try:
        from airflow_provider_kluster.connection import DEFAULT_MAX_CONNECTIONS

        pool = DEFAULT_MAX_CONNECTIONS
    except ImportError:
        pass
    os.environ.update(ts.child_env(port, home, pool, None))
    emulator = ts.start_emulator(port)
    try:
        ids = ts.create_batches(port, n, 0.1)
        ids_file = os.path.join(home, "ids.json")
        Path(ids_file).write_text(json.dumps(ids))
        out = os.path.join(home, "trigger.prof")
        result = os.path.join(home, "result.json")
        command = [sys.executable, str(HERE / "trigger_scale.py"), "--child", "kluster", "--n", str(n)]
        command += ["--port", str(port), "--ids", ids_file, "--result", result, "--pool", str(pool)]
        command += ["--poll-interval", "5", "--warm", "7.5", "--window", str(window), "--profile", out]
        subprocess.run(
            command,
            env=ts.child_env(port, home, pool, None),
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=600,
        )
        figures = json.loads(Path(result).read_text())
    finally:
        emulator.terminate()
        emulator.wait(10)
    stats = pstats.Stats(out, stream=io.StringIO())
    title = (
        f"trigger: {n} waits, {window:g} s measured under cProfile ({figures['cpu_ms_per_poll'] or 0:.2f} ms CPU "
        f"per poll, {figures['served_pct']:.0f} % served; the whole child, warm-up included)"
    )
    return _table(stats, title)


def profile_join() -> str:
    import data_paths as dp

    from airflow_provider_kluster.results import join_results

    with tempfile.TemporaryDirectory() as tmp:
        output, errors, ids, n = dp.make_results(Path(tmp), 64 * 1024 * 1024)

        def run() -> None:
            with ids.open() as handle:
                join_results(
                    output_path=output,
                    error_path=errors,
                    expected_ids=(line[:-1] for line in handle),
                    records_path=Path(tmp) / "records.jsonl",
                )

        started = time.perf_counter()
        run()
        plain = time.perf_counter() - started
        stats = _profile(run)
    return _table(stats, f"join: 64 MiB, {n:,} requests ({plain:.2f} s without the profiler)")


def profile_validate() -> str:
    import data_paths as dp

    from airflow_provider_kluster.request_files import validate_request_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.jsonl"
        n = dp.make_requests(path, 24 * 1024 * 1024)
        started = time.perf_counter()
        validate_request_file(path, max_requests=None, max_bytes=None)
        plain = time.perf_counter() - started
        stats = _profile(validate_request_file, path, max_requests=None, max_bytes=None)
    return _table(stats, f"validate: 24 MiB, {n:,} requests ({plain:.2f} s without the profiler)")


def profile_build() -> str:
    import data_paths as dp

    from airflow_provider_kluster.request_files import write_request_file

    prompts = [f"{i}: {dp.FILLER}" for i in range(25_000)]
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "built.jsonl"
        started = time.perf_counter()
        write_request_file(prompts, dest, model=dp.MODEL)
        plain = time.perf_counter() - started
        stats = _profile(write_request_file, prompts, dest, model=dp.MODEL)
    return _table(stats, f"build: 25,000 prompts ({plain:.2f} s without the profiler)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["trigger", "join", "validate", "build"])
    parser.add_argument("--n", type=int, default=1000, help="waits of the trigger profile")
    parser.add_argument("--window", type=float, default=20.0, help="seconds the trigger profile measures")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.INFO)  # the builder's and validator's own lines are not what is measured
    sections = ["## Profiles", ""]
    for name in args.paths:
        if name == "trigger":
            sections.append(profile_trigger(args.n, args.window))
        elif name == "join":
            sections.append(profile_join())
        elif name == "validate":
            sections.append(profile_validate())
        elif name == "build":
            sections.append(profile_build())
        else:
            parser.error(f"unknown path {name!r}")
        print(sections[-1], flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
