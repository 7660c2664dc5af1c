"""Local kluster.ai-compatible emulator (Files + Batches + Models + chat completions), like moto for AWS.

Python use::

    from airflow_provider_kluster.emulator import EmulatorServer

    with EmulatorServer(requests_per_second=1000, pre_schedule_delay=0.05) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)
        server.emulator.faults.add("GET /v1/batches/{id}", status=503, times=2)

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
    "parse_fault_spec",
]
