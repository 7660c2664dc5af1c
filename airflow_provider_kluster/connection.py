"""The ``kluster`` connection type: its defaults and its form in the Airflow UI, written once.

Both :func:`airflow_provider_kluster.get_provider_info` (read by Airflow 3.2+) and
``KlusterHook.get_ui_field_behaviour`` (read by Airflow 3.1) take the form from here, and the hook reads its
defaults from here, so the form can never promise a default the hook does not apply.
"""

from __future__ import annotations

import copy
from typing import Any

CONN_TYPE = "kluster"
DEFAULT_CONN_ID = "kluster_default"
HOOK_NAME = "kluster.ai"

#: Where a newly created connection points unless the user says otherwise.
DEFAULT_BASE_URL = "https://api.kluster.ai/v1"
#: Seconds one HTTP request to the API may take.
DEFAULT_TIMEOUT = 60.0
#: Retries of one call on connection errors, 408, 409, 429 and 5xx.
DEFAULT_MAX_RETRIES = 5
#: Base of the batch page links shown in the Airflow UI.
DEFAULT_PLATFORM_URL = "https://platform.kluster.ai"
#: Most HTTP connections the async client shared by every wait of one connection in a triggerer opens to
#: kluster.ai, all of them kept alive between polls. The pool bounds a triggerer's polls to ``max_connections /
#: latency`` a second: 100 serves 3,000 waits polled every 5 s against a 100 ms API (600 a second; 50 served 61 %
#: of them, benchmarks/RESULTS.md), and 30,000 polled every 60 s at 200 ms. Every connection kept alive avoids the
#: churn of opening and closing hundreds (the client's own default allows 1,000 and keeps only 100).
DEFAULT_MAX_CONNECTIONS = 100

_CONN_FIELDS: dict[str, dict[str, Any]] = {
    "timeout": {
        "label": "Request timeout (seconds)",
        "schema": {"type": ["number", "null"], "default": int(DEFAULT_TIMEOUT)},
        "description": "Timeout of one HTTP request to the API.",
    },
    "max_retries": {
        "label": "Max retries",
        "schema": {"type": ["integer", "null"], "default": DEFAULT_MAX_RETRIES},
        "description": "Retries of one call on connection errors, 408, 409, 429 and 5xx.",
    },
    "max_connections": {
        "label": "Max connections (triggerer)",
        "schema": {"type": ["integer", "null"], "default": DEFAULT_MAX_CONNECTIONS, "minimum": 1},
        "description": "HTTP connections to the API that all waits of this connection in one triggerer share "
        "(all kept alive between polls).",
    },
    "platform_url": {
        "label": "Platform URL (extra link)",
        "schema": {"type": ["string", "null"], "default": DEFAULT_PLATFORM_URL},
        "description": "Base of the batch page links shown in the Airflow UI.",
    },
}

_UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["schema", "port", "login", "extra"],
    "relabeling": {"host": "Base URL", "password": "API key"},
    "placeholders": {"host": DEFAULT_BASE_URL, "password": "your kluster.ai API key"},
}


def conn_fields() -> dict[str, dict[str, Any]]:
    """Return the extra fields of the connection form (``conn-fields`` in the provider info)."""
    return copy.deepcopy(_CONN_FIELDS)


def ui_field_behaviour() -> dict[str, Any]:
    """Return the form layout in the hook's spelling: ``hidden_fields``, ``relabeling``, ``placeholders``."""
    return copy.deepcopy(_UI_FIELD_BEHAVIOUR)


def provider_ui_field_behaviour() -> dict[str, Any]:
    """Return the same layout in the provider info's spelling (``hidden-fields``, …)."""
    return {key.replace("_", "-"): value for key, value in ui_field_behaviour().items()}
