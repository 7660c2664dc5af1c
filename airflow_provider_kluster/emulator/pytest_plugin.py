"""Pytest fixtures serving a kluster.ai emulator over loopback HTTP.

Load with ``pytest_plugins = ["airflow_provider_kluster.emulator.pytest_plugin"]`` in a root
``conftest.py``, or import the fixtures into a test module.

* ``kluster_emulator_server`` — session-scoped :class:`EmulatorServer` with fast settings.
* ``kluster_emulator`` — the same server, after :meth:`KlusterEmulator.reset`, so each test starts clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_kluster.emulator.server import EmulatorServer

#: Settings of the session server: fast lifecycle, quick cancellation.
FAST_SETTINGS: dict[str, Any] = {
    "requests_per_second": 1000.0,
    "pre_schedule_delay": 0.05,
    "cancel_delay": 0.3,
    "finalize_delay": 0.05,
}


@pytest.fixture(scope="session")
def kluster_emulator_server() -> Iterator[EmulatorServer]:
    """A session-wide emulator server on a free loopback port."""
    server = EmulatorServer(**FAST_SETTINGS).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kluster_emulator(kluster_emulator_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The session server, reset (no files, batches, faults or counters) before the test."""
    kluster_emulator_server.emulator.reset()
    yield kluster_emulator_server
    kluster_emulator_server.emulator.faults.clear()
