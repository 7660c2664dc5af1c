"""``make bench``: every side-by-side comparison in one run, written to ``benchmarks/RESULTS.md`` (figures only).

Runs, one after another (each interleaves its own contenders over its rounds and prints same-round ratios):

* ``trigger_scale.py`` — N waiting batches in one event loop: ours, the OpenAI provider's and common.ai's batch
  triggers, and a bare httpx2 loop (httpx2's pool, the SDK's pool, pooled like ours);
* ``data_paths.py`` — results join, validation, building against bare loops; download against ``curl -o`` and the
  SDK's ``.content``; upload against ``curl -F``;
* ``submit_calls.py`` — one submit's API calls before it creates, with 2,000 batches and 2,000 files in the
  account;
* ``profiles.py`` (not with ``--quick``) — cProfile of the trigger, join, validation and build paths.

``RESULTS.md`` gets a header (date, machine, load before and after, Python and package versions, commit), each
script's section, and ``benchmarks/NOTES.md`` (the targets and what the profiles explain), verbatim. The peers
come from the ``bench`` extra: ``make bench`` installs it into ``.venv-bench``, never into the test venv.

    python benchmarks/bench.py --quick            # under 5 minutes: 200 waits, 64 MiB join, 3 rounds
    python benchmarks/bench.py                    # 1,000 and 3,000 waits, 1 GiB join, 3 rounds or more
    python benchmarks/bench.py --output /tmp/R.md # write elsewhere
    python benchmarks/bench.py --baseline /tmp/kluster-before   # adds *-baseline contenders: before/after

Nothing is asserted, and the test suite never runs this.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGES = (
    "apache-airflow",
    "openai",
    "httpx2",
    "httpcore2",
    "apache-airflow-providers-openai",
    "apache-airflow-providers-common-ai",
)


def _steps(quick: bool, rounds: int | None, baseline: str | None) -> list[tuple[str, list[str]]]:
    """The scripts to run, with their arguments, in order."""
    before = ["--baseline", baseline] if baseline else []
    if quick:
        return [
            ("trigger_scale", ["--quick", *before]),
            ("data_paths", ["--quick", *before]),
            ("submit_calls", ["--quick"]),
        ]
    r = ["--rounds", str(rounds)] if rounds else []
    return [
        ("trigger_scale", ["--n", "1000,3000", *(r or ["--rounds", "3"]), *before]),
        ("data_paths", [*(r or ["--rounds", "3"]), *before]),
        ("submit_calls", r or ["--rounds", "5"]),
        ("profiles", []),  # where the time goes, for what is left between each path and its floor
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def header(command: str, started: dt.datetime, load_before: str, load_after: str, wall: float) -> str:
    versions = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    return "\n".join(
        [
            "# Benchmark results",
            "",
            f"Written by `{command}` (`benchmarks/bench.py`); figures only, nothing asserted. Re-run it to refresh;",
            "the analysis after the figures comes from `benchmarks/NOTES.md`.",
            "",
            "| | |",
            "|---|---|",
            f"| date | {started:%Y-%m-%d %H:%M} UTC |",
            f"| machine | {os.cpu_count()} cores ({_cpu_model()}), {_memory_gib()} RAM, {platform.platform()} |",
            f"| load average (1/5/15 min) | before {load_before}; after {load_after} |",
            f"| Python | {platform.python_version()} |",
            f"| packages | {versions} |",
            f"| commit | {_commit()} |",
            f"| whole run | {wall / 60:.1f} min |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run (under 5 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every script (default: theirs)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--only", default=None, help="comma-separated scripts (trigger_scale,data_paths,...)")
    parser.add_argument(
        "--baseline", default=None, help="another source tree (e.g. a git archive of a release): before/after"
    )
    args = parser.parse_args(argv)

    started = dt.datetime.now(dt.timezone.utc)
    load_before = _load()
    t0 = time.monotonic()
    sections: list[str] = []
    failed: list[str] = []
    steps = _steps(args.quick, args.rounds, args.baseline)
    if args.only:
        wanted = set(args.only.split(","))
        steps = [s for s in steps if s[0] in wanted]
    with tempfile.TemporaryDirectory(prefix="kluster-bench-") as tmp:
        for name, extra in steps:
            out = Path(tmp) / f"{name}.md"
            cmd = [sys.executable, str(HERE / f"{name}.py"), *extra, "--markdown", str(out)]
            print(f"\n=== {' '.join(cmd[1:])}", flush=True)
            began = time.monotonic()
            code = subprocess.call(cmd, cwd=ROOT)
            took = time.monotonic() - began
            if code != 0 or not out.exists():
                failed.append(name)
                sections.append(f"## {name}\n\n`{name}.py` failed (exit code {code}) after {took:.0f} s.\n")
                continue
            sections.append(out.read_text().rstrip() + f"\n\n({name}: {took:.0f} s)\n")
    command = "make bench-quick" if args.quick else "make bench"
    text = header(command, started, load_before, _load(), time.monotonic() - t0) + "\n" + "\n".join(sections)
    notes = HERE / "NOTES.md"
    if notes.exists():
        text += "\n" + notes.read_text()
    args.output.write_text(text)
    print(f"\nwrote {args.output} ({(time.monotonic() - t0) / 60:.1f} min)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
