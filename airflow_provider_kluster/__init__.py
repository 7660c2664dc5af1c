"""Apache Airflow provider for kluster.ai batch inference.

How the package is layered — dependencies run one way, from the Airflow-facing modules down to pure ones:

* **Pure modules** — ``batches`` (the batch object and wire constants), ``waiting`` (the waiting policy and the
  events it ends with), ``request_files``, ``results``, ``paths``, ``exceptions``, ``reattach``, ``connection``,
  ``masking``, ``parameters``, ``links``, ``cancelling`` (who may cancel), ``ti_state`` (reading a task instance
  back), ``jobs`` (shards, retries, settling a whole job), ``pricing`` and ``lineage`` — hold the provider's
  decisions and data. They never import the
  hook, ``openai`` or ``httpx2`` (not even for type checking), so each can be read and tested without a
  network client.
* **The hook** (``hooks.kluster``) is the only module that talks to kluster.ai.
* **Operators, sensors, triggers and the decorator** wire the two into Airflow; ``common_ai`` (optional extra)
  plugs the hook into Airflow's common.ai provider.

``ruff`` enforces this (``banned-api`` in ``pyproject.toml``, allowed only in the hook, operators, sensors,
triggers and the emulator), and ``tests/test_architecture.py`` checks what importing the pure modules loads.
"""

from __future__ import annotations

from airflow_provider_kluster.connection import (
    CONN_TYPE,
    DEFAULT_BASE_URL,
    HOOK_NAME,
    conn_fields,
    provider_ui_field_behaviour,
)

__version__ = "0.1.0"
__all__ = ["DEFAULT_BASE_URL", "__version__", "get_provider_info"]


def get_provider_info() -> dict:
    """Return the provider metadata Airflow reads through the ``apache_airflow_provider`` entry point.

    Keep ``package-name``, ``description`` and ``connection-types`` present: without them ``import airflow``
    itself fails on every machine where this package is installed.
    """
    return {
        "package-name": "airflow-provider-kluster",
        "name": "kluster.ai",
        "description": "Run kluster.ai batch inference from Airflow: upload, submit, wait, fetch results, cancel.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "kluster.ai",
                "external-doc-url": "https://docs.kluster.ai/",
                "tags": ["ai"],
            }
        ],
        "hooks": [
            {
                "integration-name": "kluster.ai",
                "python-modules": ["airflow_provider_kluster.hooks.kluster"],
            }
        ],
        "operators": [
            {
                "integration-name": "kluster.ai",
                "python-modules": [
                    "airflow_provider_kluster.operators.kluster",
                    "airflow_provider_kluster.operators.job",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": "kluster.ai",
                "python-modules": ["airflow_provider_kluster.sensors.kluster"],
            }
        ],
        "triggers": [
            {
                "integration-name": "kluster.ai",
                "python-modules": [
                    "airflow_provider_kluster.triggers.kluster",
                    "airflow_provider_kluster.triggers.job",
                ],
            }
        ],
        "extra-links": ["airflow_provider_kluster.links.KlusterBatchLink"],
        "task-decorators": [
            {
                "name": "kluster_batch",
                "class-name": "airflow_provider_kluster.decorators.kluster_batch.kluster_batch_task",
            }
        ],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": "airflow_provider_kluster.hooks.kluster.KlusterHook",
                "hook-name": HOOK_NAME,
                "conn-fields": conn_fields(),
                "ui-field-behaviour": provider_ui_field_behaviour(),
            }
        ],
    }
