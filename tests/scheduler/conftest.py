"""Session fixtures of the real-Airflow tests: one emulator and one Airflow cluster for every module here.

Starting Airflow (migrate + five processes) takes most of a minute on two cores, so every scenario of this folder
shares one cluster; each scenario triggers its own run and finds its batches by ``metadata.airflow_run_id``.

The cluster runs two triggerers (``triggerer`` and ``triggerer-2``) on a throwaway PostgreSQL server (the
``postgres`` fixture), as a production deployment does; ``KLUSTER_TEST_DB=sqlite`` runs it on SQLite instead
(quicker to set up, nothing to install). ``cluster.db_kind`` tells a test which one it runs on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from airflow_provider_kluster.emulator.server import EmulatorServer

from . import postgres as pg
from .harness import DB_ENV, AirflowCluster, requested_db_kind

DAGS = Path(__file__).parent / "dags"
API_KEY = "kl-scheduler-test-key"
#: Every DAG under ``dags/``: the cluster waits until each is parsed, then unpauses it.
DAG_IDS = (
    "kluster_on_call_deferred",
    "kluster_on_call_worker",
    "kluster_on_call_retry_worker",
    "kluster_crash_worker",
    "kluster_crash_triggerer",
    "kluster_crash_deadline",
)
#: Seconds without a heartbeat after which a (killed) triggerer's triggers go to another triggerer.
TRIGGERER_HEALTH_CHECK_THRESHOLD = 10
#: Two triggerers: a trigger of a dead or hung one is taken over by the other.
COMPONENTS = ("api-server", "scheduler", "triggerer", "triggerer-2", "dag-processor")


@pytest.fixture(scope="session")
def emulator_server():
    """The emulator on a free loopback port; every batch stays ``in_progress`` until cancelled or released."""
    server = EmulatorServer(
        api_key=API_KEY,
        requests_per_second=1000.0,
        pre_schedule_delay=0.05,
        cancel_delay=2.0,
    ).start()
    server.emulator.faults.stick_batch("*", "in_progress")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on loopback for the session (``None`` with ``KLUSTER_TEST_DB=sqlite``)."""
    if requested_db_kind() == "sqlite":
        yield None
        return
    reason = pg.available()
    if reason:
        pytest.fail(
            f"The real-scheduler tests run Airflow on PostgreSQL, which cannot be used here: {reason}. "
            f"Install it (Debian: apt-get install postgresql; .ci/run does), or run them on SQLite with "
            f"{DB_ENV}=sqlite.",
            pytrace=False,
        )
    server = pg.PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, emulator_server, postgres):
    """Airflow's processes, started once for the session, with every test DAG parsed and unpaused."""
    root = tmp_path_factory.mktemp("scheduler")
    dags = root / "dags"
    shutil.copytree(DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    conn = {
        "conn_type": "kluster",
        "host": emulator_server.base_url,
        "password": API_KEY,
        "extra": {"max_retries": 2, "timeout": 10},
    }
    env = {
        "AIRFLOW_CONN_KLUSTER_DEFAULT": json.dumps(conn),
        # Default 30 s: how long the triggers of a kill -9'd triggerer wait before a new triggerer takes them.
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": str(TRIGGERER_HEALTH_CHECK_THRESHOLD),
    }
    cluster = AirflowCluster(
        home=root / "airflow",
        dags_folder=dags,
        env=env,
        components=COMPONENTS,
        sql_alchemy_conn=postgres.url if postgres is not None else None,
    )
    cluster.start()
    try:
        with cluster.report_on_failure():
            for dag_id in DAG_IDS:
                cluster.api.wait_for_dag(dag_id, timeout=120)
                cluster.api.unpause(dag_id)
        yield cluster
    finally:
        cluster.stop()
