"""Local kluster.ai-compatible emulator (Files + Batches + Models + chat completions), like moto for AWS.

Python use::

    from airflow_provider_kluster.emulator import EmulatorServer

    with EmulatorServer(requests_per_second=1000, pre_schedule_delay=0.05) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)
        server.emulator.faults.add("GET /v1/batches/{id}", status=503, times=2)
        server.emulator.faults.transient_share = 0.1   # 10 % of custom_ids: 500/429 on their first run
        server.emulator.faults.lost_share = 0.01       # 1 %: in neither output nor error file
        server.emulator.faults.stall_batch("next", after=50)  # the next batch stops after 50 requests

Also served: ``/v1/uploads`` (multipart uploads up to 8 GB in parts of up to 64 MB) and
``GET /v1/models?extended=true`` (pricing per token, see :mod:`airflow_provider_kluster.emulator.models`).

Command line: ``python -m airflow_provider_kluster.emulator --port 8000`` (see ``--help``).
Pytest fixtures: :mod:`airflow_provider_kluster.emulator.pytest_plugin`.
"""

from __future__ import annotations

from airflow_provider_kluster.emulator.faults import FaultInjector, FaultRule, parse_fault_spec
from airflow_provider_kluster.emulator.server import EmulatorServer
from airflow_provider_kluster.emulator.state import (
    TERMINAL_STATUSES,
    BatchRecord,
    EmulatorConfig,
    FileRecord,
    KlusterEmulator,
    UploadError,
    UploadPart,
    UploadRecord,
)

__all__ = [
    "TERMINAL_STATUSES",
    "BatchRecord",
    "EmulatorConfig",
    "EmulatorServer",
    "FaultInjector",
    "FaultRule",
    "FileRecord",
    "KlusterEmulator",
    "UploadError",
    "UploadPart",
    "UploadRecord",
    "parse_fault_spec",
]
