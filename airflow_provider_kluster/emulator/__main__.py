"""Command line entry point: ``python -m airflow_provider_kluster.emulator`` / ``kluster-emulator``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from airflow_provider_kluster.emulator.faults import parse_fault_spec
from airflow_provider_kluster.emulator.models import pricing_per_million
from airflow_provider_kluster.emulator.state import (
    MAX_PART_BYTES,
    MAX_UPLOAD_BYTES,
    EmulatorConfig,
    KlusterEmulator,
)

FAULT_HELP = """\
Inject an HTTP fault (repeatable). Syntax: "<METHOD> <PATH>[:key=value]...", e.g.
  "POST /v1/batches:rate=0.5:status=503"
  "GET /v1/batches/{id}:times=3:status=429:retry_after=1"
  "GET /v1/files/{id}/content:times=1:drop"
  "POST /v1/batches:times=1:status=503:after_commit"
  "* *:latency=0.2"
keys: status, times, rate (0..1, seeded), retry_after, latency (s), message,
drop (close the connection without a response), malformed (invalid JSON body),
after_commit (run the request first - the batch is created, the file stored -
then answer with the fault or drop: the work was done but the answer was lost)."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI argument parser."""
    parser = argparse.ArgumentParser(
        prog="kluster-emulator",
        description="Local kluster.ai-compatible Files/Batches API emulator.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("KLUSTER_EMULATOR_API_KEY", "test-key"),
        help="accepted bearer key (default: $KLUSTER_EMULATOR_API_KEY or 'test-key')",
    )
    parser.add_argument("--data-dir", default=None, help="where files are stored (default: a temp dir)")
    parser.add_argument("--requests-per-second", type=float, default=50.0, help="batch processing rate")
    parser.add_argument(
        "--speedup", type=float, default=1.0, help="divide completion windows by this (86400: 24h = 1 s)"
    )
    parser.add_argument("--cancel-delay", type=float, default=2.0, help="seconds in 'cancelling'")
    parser.add_argument(
        "--pre-schedule-delay", type=float, default=0.5, help="seconds in 'pre_schedule' before validating"
    )
    parser.add_argument("--finalize-delay", type=float, default=0.2, help="seconds in 'finalizing'")
    parser.add_argument(
        "--timestamps",
        choices=("kluster", "int"),
        default="kluster",
        help="kluster: numeric strings, unset keys omitted; int: OpenAI-style integers",
    )
    parser.add_argument(
        "--upstream-url", default=None, help="forward batch requests to this OpenAI-style API"
    )
    parser.add_argument("--upstream-api-key", default=os.environ.get("KLUSTER_EMULATOR_UPSTREAM_API_KEY"))
    parser.add_argument("--seed", type=int, default=0, help="seed for faults and output shuffling")
    parser.add_argument("--model", action="append", dest="models", help="served model id (repeatable)")
    parser.add_argument("--max-file-bytes", type=int, default=100 * 1024 * 1024, help="upload size limit")
    parser.add_argument("--fault", action="append", default=[], help=FAULT_HELP)
    parser.add_argument("--fail-share", type=float, default=0.0, help="share of batch requests that fail")
    parser.add_argument(
        "--transient-share",
        type=float,
        default=0.0,
        help="share of custom_ids failing with HTTP 500/429 in the error file (seeded by custom_id)",
    )
    parser.add_argument(
        "--transient-repeats",
        type=int,
        default=1,
        help="executions of such a custom_id that fail before it succeeds (default: 1)",
    )
    parser.add_argument(
        "--lost-share",
        type=float,
        default=0.0,
        help="share of custom_ids that never come back (in neither file; seeded by custom_id)",
    )
    parser.add_argument(
        "--lost-repeats",
        type=int,
        default=1,
        help="executions of such a custom_id that are lost (default: 1)",
    )
    parser.add_argument(
        "--stall-after",
        type=int,
        default=None,
        help="every batch stops making progress after this many requests (stays in_progress)",
    )
    parser.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="MODEL=INPUT,OUTPUT",
        help="realtime price in USD per million tokens for ?extended=true (repeatable; async windows discounted)",
    )
    parser.add_argument(
        "--max-part-bytes", type=int, default=MAX_PART_BYTES, help="largest /v1/uploads part (default: 64 MB)"
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=int,
        default=MAX_UPLOAD_BYTES,
        help="largest /v1/uploads upload (default: 8 GB)",
    )
    parser.add_argument(
        "--upload-ttl",
        type=float,
        default=3600.0,
        help="seconds until an upload expires (divided by --speedup)",
    )
    parser.add_argument("--timeout-keep-alive", type=int, default=5, help="idle keep-alive seconds")
    parser.add_argument("--log-level", default="warning", help="uvicorn/emulator log level")
    return parser


def parse_price(spec: str) -> tuple[str, dict[str, object]]:
    """Parse ``--price MODEL=INPUT,OUTPUT`` (USD per million tokens) into ``(model, pricing object)``.

    :raises ValueError: on syntax errors.
    """
    model, sep, values = spec.rpartition("=")
    parts = values.split(",")
    if not sep or not model or len(parts) != 2:
        raise ValueError(f"--price must look like MODEL=INPUT,OUTPUT, got {spec!r}")
    try:
        return model, pricing_per_million(float(parts[0]), float(parts[1]))
    except ValueError as exc:
        raise ValueError(f"--price {spec!r}: {exc}") from None


def emulator_from_args(args: argparse.Namespace) -> KlusterEmulator:
    """Build the emulator (config and faults) that parsed CLI arguments describe.

    :raises ValueError: on invalid values.
    """
    faults = [parse_fault_spec(spec) for spec in args.fault]
    overrides: dict[str, object] = {"models": args.models} if args.models else {}
    config = EmulatorConfig(
        api_key=args.api_key,
        data_dir=args.data_dir,
        requests_per_second=args.requests_per_second,
        speedup=args.speedup,
        cancel_delay=args.cancel_delay,
        pre_schedule_delay=args.pre_schedule_delay,
        finalize_delay=args.finalize_delay,
        timestamps=args.timestamps,
        upstream_url=args.upstream_url,
        upstream_api_key=args.upstream_api_key,
        seed=args.seed,
        max_file_bytes=args.max_file_bytes,
        prices=dict(parse_price(spec) for spec in args.price),
        max_part_bytes=args.max_part_bytes,
        max_upload_bytes=args.max_upload_bytes,
        upload_ttl=args.upload_ttl,
        **overrides,  # type: ignore[arg-type]
    )
    emulator = KlusterEmulator(config)
    try:
        for fault in faults:
            emulator.faults.add(**fault)
        emulator.faults.configure(
            {
                "fail_share": args.fail_share,
                "transient_share": args.transient_share,
                "transient_repeats": args.transient_repeats,
                "lost_share": args.lost_share,
                "lost_repeats": args.lost_repeats,
                "stall_after": args.stall_after,
            },
            replace=False,
        )
    except ValueError:
        emulator.close()
        raise
    return emulator


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground until interrupted.

    :param argv: arguments (default: ``sys.argv[1:]``).
    :return: process exit code.
    """
    import uvicorn

    from airflow_provider_kluster.emulator.server import make_uvicorn_config

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        emulator = emulator_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uv_config = make_uvicorn_config(
        emulator,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    print(
        f"kluster emulator on http://{args.host}:{args.port}/v1 "
        f"(api key from --api-key / KLUSTER_EMULATOR_API_KEY), data in {emulator.data_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.Server(uv_config).run()
    finally:
        emulator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
