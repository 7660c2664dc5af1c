"""Data paths against their floors: results join, validation, building, download and upload (figures only).

Each contender is timed against a floor doing the least the same job needs, in the same round:

* join — ``join_results`` (output + error file, the requests' ids, a records file; and once without the
  records file) against a bare ``json.loads`` loop over the same two files;
* validation — ``validate_request_file`` against a bare ``json.loads`` loop over the same request file;
* build — ``write_request_file`` from prompt strings against a bare loop building each line as a dict and
  writing ``json.dumps`` of it (compact UTF-8, as ours);
* download — ``KlusterHook.download_file`` and the openai SDK's ``files.content(id).content`` (then written to
  disk) against ``curl -o``, from the emulator in a separate process over loopback;
* upload — ``KlusterHook.upload_file`` against ``curl -F``, to the same emulator.

Every Python contender runs in a worker process of its own, started once (imports paid before any timing);
each run is timed inside the worker, and its memory growth is the peak RSS of the run (``VmHWM``, reset
before it through ``/proc/self/clear_refs``) less the RSS before it. curl runs as a fresh process, timed from
here (its memory is not measured). Rounds interleave the contenders, their order rotated from round to
round; a ratio is the floor's time divided by the contender's time *in the same round* (1 = as fast as the
floor, 0.5 = twice its time), so a shared, busy machine shifts both alike. Nothing is asserted.

    python benchmarks/data_paths.py --quick                    # 64 MiB join/download, under 2 minutes
    python benchmarks/data_paths.py --rounds 3 --markdown data_paths.md   # 1 GiB join/download
    python benchmarks/data_paths.py --quick --baseline /tmp/kluster-before   # before/after in the same run

``--baseline DIR`` adds ``join``, ``validate`` and ``build`` contenders importing the provider from another
source tree (e.g. ``git archive`` of an earlier commit, unpacked), timed in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
FILLER = "Summarise this paragraph in one sentence, keeping every number it names. " * 4

# -- the worker: one per contender, kept for every round --------------------------------------------------

WORKER = textwrap.dedent(
    """
    import gc, json, os, sys, time

    # Answers go to our stdout; anything else printed (logging, warnings) goes where stderr goes.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def status():
        found = {}
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    found[key] = int(value.split()[0])
        return found

    def bare_parse(paths):
        loads, lines = json.loads, 0
        for path in paths:
            with open(path, "rb") as handle:
                for raw in handle:
                    loads(raw)
                    lines += 1
        return lines

    def join(output, errors, ids, records):
        from airflow_provider_kluster.results import join_results
        with open(ids) as handle:
            manifest = join_results(output_path=output, error_path=errors,
                                    expected_ids=(line[:-1] for line in handle), records_path=records)
        return manifest["total"]

    def validate(path):
        from airflow_provider_kluster.request_files import validate_request_file
        return validate_request_file(path, max_requests=None, max_bytes=None).requests

    def prompts(n):
        filler = os.environ["BENCH_FILLER"]
        return [f"{i}: {filler}" for i in range(n)]

    def build(items, dest):
        from airflow_provider_kluster.request_files import write_request_file
        return write_request_file(items, dest, model=os.environ["BENCH_MODEL"]).requests

    def bare_build(items, dest):
        model, dumps = os.environ["BENCH_MODEL"], json.dumps
        with open(dest, "wb") as out:
            for i, prompt in enumerate(items):
                line = {"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "messages": [{"role": "user", "content": prompt}]}}
                out.write((dumps(line, ensure_ascii=False, separators=(",", ":")) + "\\n").encode())
        return len(items)

    def hook_download(file_id, dest):
        from airflow_provider_kluster.hooks.kluster import KlusterHook
        KlusterHook().download_file(file_id, dest)
        return 0

    def sdk_download(file_id, dest):
        import openai
        client = openai.OpenAI(base_url=os.environ["BENCH_BASE_URL"], api_key=os.environ["BENCH_API_KEY"])
        data = client.files.content(file_id).content
        with open(dest, "wb") as out:
            out.write(data)
        return 0

    def hook_upload(path):
        from airflow_provider_kluster.hooks.kluster import KlusterHook
        KlusterHook().upload_file(path)
        return 0

    OPS = {"bare_parse": bare_parse, "join": join, "validate": validate, "build": build,
           "bare_build": bare_build, "hook_download": hook_download, "sdk_download": sdk_download,
           "hook_upload": hook_upload}
    WARM = {"join": "airflow_provider_kluster.results", "validate": "airflow_provider_kluster.request_files",
            "build": "airflow_provider_kluster.request_files", "hook_download": "airflow_provider_kluster.hooks.kluster",
            "hook_upload": "airflow_provider_kluster.hooks.kluster", "sdk_download": "openai"}

    op = sys.argv[1]
    if op in WARM:
        __import__(WARM[op])
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for command in sys.stdin:
        args = json.loads(command)
        if op in ("build", "bare_build"):
            args = [prompts(args[0]), args[1]]
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = status()["VmRSS"]
        start = time.perf_counter()
        count = OPS[op](*args)
        seconds = time.perf_counter() - start
        peak = status()["VmHWM"]
        print(json.dumps({"seconds": seconds, "growth_kb": peak - before, "count": count}), file=answers, flush=True)
    """
)


class Worker:
    """A contender's process: started once, asked to run once a round."""

    def __init__(self, op: str, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, op],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def ready(self) -> None:
        self._answer()

    def run(self, *args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(list(args)) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker died (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the emulator, in a process of its own ----------------------------------------------------------------

SERVER = textwrap.dedent(
    """
    import json, os, sys
    from airflow_provider_kluster.emulator import EmulatorServer

    with EmulatorServer(api_key=os.environ["BENCH_API_KEY"], max_file_bytes=2**40, timeout_keep_alive=60) as server:
        file_id = server.emulator.add_file(sys.argv[1], purpose="batch_output", copy=False)
        print(json.dumps({"base_url": server.base_url, "file_id": file_id}), flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin
    """
)


def curl(config: str, *args: str) -> float:
    """Run curl with ``config`` (its header) on stdin, never on its command line; return the wall time."""
    start = time.perf_counter()
    subprocess.run(
        ["curl", "-sS", "--fail", "-K", "-", *args],
        input=config,
        text=True,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


# -- the data ---------------------------------------------------------------------------------------------


def _contents() -> list[str]:
    """JSON string literals of a few answers: ASCII with escapes, UTF-8 text, and ``\\u``-escaped text."""
    ascii_text = ('The answer is "42".\nSteps:\n' + "- a step, with a\ttab and a \\ backslash\n" * 14)[:600]
    unicode_text = ("Réponse : « oui » — 是的，答案在这里。 😀\n" * 20)[:400]
    return [
        json.dumps(ascii_text),
        json.dumps(ascii_text.replace("\n", " ")),
        json.dumps(unicode_text, ensure_ascii=False),
        json.dumps(unicode_text),
    ]


def make_results(directory: Path, size: int) -> tuple[Path, Path, Path, int]:
    """Write an output file of about ``size`` bytes (kluster's line format), an error file (1 in 50 requests
    failed with a 500) and the requests' ids (1 in 1000 without any line); return them and the count."""
    output, errors, ids = directory / "output.jsonl", directory / "errors.jsonl", directory / "ids.txt"
    contents = _contents()
    n = written = 0
    with output.open("w") as out, errors.open("w") as err, ids.open("w") as id_file:
        while written < size:
            custom_id = f"request-{n}"
            id_file.write(custom_id + "\n")
            if n % 50 == 7:
                err.write(
                    f'{{"id": "batch-req-{n}", "custom_id": "{custom_id}", "response": {{"status_code": 500, '
                    f'"request_id": "req-{n}", "body": {{"error": {{"message": "The server had an error", '
                    f'"type": "server_error", "code": "server_error"}}}}}}, "error": null}}\n'
                )
            elif n % 1000 != 999:
                line = (
                    f'{{"id": "batch-req-{n}", "custom_id": "{custom_id}", "response": {{"status_code": 200, '
                    f'"request_id": "req-{n}", "body": {{"id": "chatcmpl-{n}", "object": "chat.completion", '
                    f'"created": 1733270400, "model": "{MODEL}", "choices": [{{"index": 0, "message": '
                    f'{{"role": "assistant", "content": {contents[n % len(contents)]}}}, "logprobs": null, '
                    f'"finish_reason": "stop"}}], "usage": {{"prompt_tokens": {90 + n % 7}, '
                    f'"completion_tokens": {150 + n % 11}, "total_tokens": {240 + n % 7 + n % 11}}}}}}}, '
                    f'"error": null}}\n'
                )
                out.write(line)
                written += len(line.encode())
            n += 1
    return output, errors, ids, n


def make_requests(path: Path, size: int) -> int:
    """Write a request file of about ``size`` bytes; return its number of requests."""
    n = written = 0
    with path.open("w") as out:
        while written < size:
            line = json.dumps(
                {
                    "custom_id": f"request-{n}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": MODEL,
                        "messages": [
                            {"role": "system", "content": "You are a careful, terse assistant."},
                            {"role": "user", "content": f"{n}: {FILLER}"},
                        ],
                        "max_tokens": 200,
                        "temperature": 0.2,
                    },
                },
                separators=(",", ":"),
            )
            out.write(line + "\n")
            written += len(line) + 1
            n += 1
    return n


# -- the rounds --------------------------------------------------------------------------------------------

#: name -> (floor, what it is); a floor names itself.
CONTENDERS: dict[str, tuple[str, str]] = {
    "bare-parse-results": ("bare-parse-results", "bare `json.loads` loop over output + error file"),
    "join": ("bare-parse-results", "`join_results`, ids given, records file written"),
    "join-no-records": ("bare-parse-results", "`join_results`, ids given, no records file"),
    "join-baseline": ("bare-parse-results", "`join_results` from --baseline, records file written"),
    "bare-parse-requests": ("bare-parse-requests", "bare `json.loads` loop over the request file"),
    "validate": ("bare-parse-requests", "`validate_request_file` (duplicates checked)"),
    "validate-baseline": ("bare-parse-requests", "`validate_request_file` from --baseline"),
    "bare-build": ("bare-build", "bare loop: build each line's dict, write `json.dumps` of it"),
    "build": ("bare-build", "`write_request_file` from prompt strings"),
    "build-baseline": ("bare-build", "`write_request_file` from --baseline"),
    "curl-download": ("curl-download", "`curl -o` from the emulator"),
    "hook-download": ("curl-download", "`KlusterHook.download_file`"),
    "sdk-download": ("curl-download", "openai SDK `files.content(id).content`, written to disk"),
    "curl-upload": ("curl-upload", "`curl -F file=@… purpose=batch` to the emulator"),
    "hook-upload": ("curl-upload", "`KlusterHook.upload_file`"),
}
GROUPS = [
    ["bare-parse-results", "join", "join-no-records", "join-baseline"],
    ["bare-parse-requests", "validate", "validate-baseline"],
    ["bare-build", "build", "build-baseline"],
    ["curl-download", "hook-download", "sdk-download"],
    ["curl-upload", "hook-upload"],
]
OPS = {
    "bare-parse-results": "bare_parse",
    "join": "join",
    "join-no-records": "join",
    "join-baseline": "join",
    "bare-parse-requests": "bare_parse",
    "validate": "validate",
    "validate-baseline": "validate",
    "bare-build": "bare_build",
    "build": "build",
    "build-baseline": "build",
    "hook-download": "hook_download",
    "sdk-download": "sdk_download",
    "hook-upload": "hook_upload",
}


def run_rounds(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    sizes = {
        "results": (64 if args.quick else 1024) * 2**20
        if args.results_mb is None
        else args.results_mb * 2**20,
        "requests": (24 if args.quick else 95) * 2**20,
        "build": 25_000 if args.quick else 100_000,
    }
    t0 = time.perf_counter()
    output, errors, ids, requested = make_results(tmp, sizes["results"])
    requests_path = tmp / "requests.jsonl"
    request_count = make_requests(requests_path, sizes["requests"])
    facts = {
        "output_bytes": output.stat().st_size,
        "error_bytes": errors.stat().st_size,
        "requested": requested,
        "request_bytes": requests_path.stat().st_size,
        "request_count": request_count,
        "build_count": sizes["build"],
        "made_s": time.perf_counter() - t0,
    }
    print(
        f"made {facts['output_bytes'] / 2**20:.0f} MiB of results ({requested:,} requests) and a "
        f"{facts['request_bytes'] / 2**20:.0f} MiB request file in {facts['made_s']:.0f} s",
        flush=True,
    )
    key = secrets.token_urlsafe(24)
    env = {**os.environ, "BENCH_API_KEY": key, "BENCH_MODEL": MODEL, "BENCH_FILLER": FILLER}
    env.setdefault("AIRFLOW_HOME", str(tmp / "airflow"))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(output)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    workers: dict[str, Worker] = {}
    try:
        assert server.stdout is not None
        served = json.loads(server.stdout.readline())
        base_url, file_id = served["base_url"], served["file_id"]
        env["BENCH_BASE_URL"] = base_url
        env["AIRFLOW_CONN_KLUSTER_DEFAULT"] = json.dumps(
            {"conn_type": "kluster", "host": base_url, "password": key}
        )
        header = f'header = "Authorization: Bearer {key}"\n'
        names = [n for group in GROUPS for n in group if args.baseline or not n.endswith("-baseline")]
        if args.only:
            chosen = {n for n in names if any(n.startswith(o) for o in args.only)}
            names = [n for n in names if n in chosen or n in {CONTENDERS[c][0] for c in chosen}]
        for name in names:
            if name in OPS:
                # Away from any source tree: the package comes from this one, or from --baseline.
                tree = args.baseline if name.endswith("-baseline") else str(REPO)
                worker_env = {**env, "PYTHONPATH": os.pathsep.join([tree, env.get("PYTHONPATH", "")])}
                workers[name] = Worker(OPS[name], worker_env, tmp)
        for worker in workers.values():
            worker.ready()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_no in range(args.rounds):
            for group in GROUPS:
                group = [n for n in group if n in runs]
                shift = round_no % len(group) if group else 0
                for name in group[shift:] + group[:shift]:
                    result = run_one(
                        name,
                        workers,
                        tmp,
                        output,
                        errors,
                        ids,
                        requests_path,
                        file_id,
                        base_url,
                        header,
                        sizes,
                    )
                    result["round"] = round_no
                    runs[name].append(result)
                    print(f"round {round_no + 1}: {name:<20} {result['seconds']:7.2f} s", flush=True)
        return runs, facts
    finally:
        for worker in workers.values():
            worker.close()
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_one(
    name: str,
    workers: dict[str, Worker],
    tmp: Path,
    output: Path,
    errors: Path,
    ids: Path,
    requests_path: Path,
    file_id: str,
    base_url: str,
    header: str,
    sizes: dict[str, int],
) -> dict[str, Any]:
    records = tmp / "records.jsonl"
    dest = tmp / "downloaded.jsonl"
    built = tmp / "built.jsonl"
    try:
        if name == "bare-parse-results":
            return workers[name].run([str(output), str(errors)])
        if name in ("join", "join-baseline"):
            return workers[name].run(str(output), str(errors), str(ids), str(records))
        if name == "join-no-records":
            return workers[name].run(str(output), str(errors), str(ids), None)
        if name == "bare-parse-requests":
            return workers[name].run([str(requests_path)])
        if name.startswith("validate"):
            return workers[name].run(str(requests_path))
        if name in ("bare-build", "build", "build-baseline"):
            return workers[name].run(sizes["build"], str(built))
        if name in ("hook-download", "sdk-download"):
            return workers[name].run(file_id, str(dest))
        if name == "curl-download":
            return {"seconds": curl(header, "-o", str(dest), f"{base_url}/files/{file_id}/content")}
        if name == "hook-upload":
            return workers[name].run(str(requests_path))
        if name == "curl-upload":
            return {
                "seconds": curl(
                    header,
                    "-o",
                    os.devnull,
                    "-F",
                    "purpose=batch",
                    "-F",
                    f"file=@{requests_path}",
                    f"{base_url}/files",
                )
            }
        raise ValueError(name)
    finally:
        for leftover in (records, dest, built):
            leftover.unlink(missing_ok=True)


# -- the report --------------------------------------------------------------------------------------------


def spread(values: list[float | None], fmt: str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    return " / ".join(fmt.format(v) for v in (min(known), statistics.median(known), max(known)))


def report(runs: dict[str, list[dict[str, Any]]], facts: dict[str, Any], args: argparse.Namespace) -> str:
    per_request = {
        "join": facts["requested"],
        "join-no-records": facts["requested"],
        "join-baseline": facts["requested"],
        "bare-parse-results": facts["requested"],
        "validate": facts["request_count"],
        "validate-baseline": facts["request_count"],
        "bare-parse-requests": facts["request_count"],
        "build": facts["build_count"],
        "build-baseline": facts["build_count"],
        "bare-build": facts["build_count"],
    }
    command = " ".join(["python benchmarks/data_paths.py", *sys.argv[1:]]).replace(
        str(args.baseline or "\0"), "DIR"
    )
    lines = [
        "## Data paths",
        "",
        f"`{command}`: results {facts['output_bytes'] / 2**20:.0f} MiB output + "
        f"{facts['error_bytes'] / 2**20:.1f} MiB errors ({facts['requested']:,} requests, 2 % failed, 0.1 % "
        f"missing); request file {facts['request_bytes'] / 2**20:.0f} MiB ({facts['request_count']:,} "
        f"requests); build {facts['build_count']:,} prompts. {args.rounds} rounds, contenders interleaved in "
        f"rotating order. Times are min / median / max seconds; a ratio is the floor's time over the "
        f"contender's in the same round (higher is better, 1 = the floor's speed), min / median / max. Memory is "
        f"the largest peak-RSS growth of a run, per request where requests apply. Machine: {os.cpu_count()} "
        f"cores, shared.",
        "",
        "| contender | floor | seconds | ratio to floor | MiB/s (median) | memory growth |",
        "|---|---|---|---|---|---|",
    ]
    volume = {
        "results": (facts["output_bytes"] + facts["error_bytes"]) / 2**20,
        "requests": facts["request_bytes"] / 2**20,
        "download": facts["output_bytes"] / 2**20,
    }
    for group in GROUPS:
        for name in group:
            if name not in runs:
                continue
            floor, what = CONTENDERS[name]
            mine = runs[name]
            base = runs.get(floor, [])
            ratios = [
                b["seconds"] / m["seconds"] for m, b in zip(mine, base, strict=False) if m["seconds"] > 0
            ]
            seconds = [r["seconds"] for r in mine]
            mib = (
                volume["results"]
                if "parse-results" in floor
                else volume["requests"]
                if floor in ("bare-parse-requests", "curl-upload")
                else volume["download"]
                if floor == "curl-download"
                else None
            )
            rate = f"{mib / statistics.median(seconds):.0f}" if mib else "–"
            growth = [r["growth_kb"] for r in mine if "growth_kb" in r]
            if not growth:
                memory = "–"
            elif name in per_request:
                memory = (
                    f"{max(growth) * 1024 / per_request[name]:.0f} B/request ({max(growth) / 1024:.0f} MiB)"
                )
            else:
                memory = f"{max(growth) / 1024:.0f} MiB"
            lines.append(
                f"| `{name}`: {what} | `{floor}` | {spread(seconds, '{:.2f}')} "
                f"| {'1' if floor == name else spread(ratios, '{:.2f}')} | {rate} | {memory} |"
            )
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "Notes:",
    "",
    "- The join reads the ids (one per line, as the request file's `custom_id`s would come) inside the timed "
    "run; its floor parses the same output and error files and keeps nothing.",
    "- The build's prompts are made before the timing starts, in both contenders; the floor does no checking.",
    "- The SDK's `.content` holds the whole file in memory before it can be written: its memory growth is the "
    "file's size.",
    "- curl's memory is not measured (it is a process of its own, timed from outside).",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB of results, 24 MiB request file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results-mb", type=int, default=None, help="size of the output file (MiB)")
    parser.add_argument("--baseline", default=None, help="source tree for the *-baseline contenders")
    parser.add_argument("--only", nargs="+", default=None, help="contenders (or floors) by name prefix")
    parser.add_argument("--markdown", default=None, help="also write the report to this file")
    args = parser.parse_args()
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
    if shutil.which("curl") is None:
        parser.error("curl is needed for the floors of download and upload")
    with tempfile.TemporaryDirectory(prefix="kluster-data-paths-") as tmp:
        runs, facts = run_rounds(args, Path(tmp))
    text = report(runs, facts, args)
    print()
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
