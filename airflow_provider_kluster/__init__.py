"""Apache Airflow provider for kluster.ai batch inference."""

from __future__ import annotations

__version__ = "0.1.0"

#: Where a newly created connection points unless the user says otherwise.
DEFAULT_BASE_URL = "https://api.kluster.ai/v1"


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
                "python-modules": ["airflow_provider_kluster.operators.kluster"],
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
                "python-modules": ["airflow_provider_kluster.triggers.kluster"],
            }
        ],
        "extra-links": ["airflow_provider_kluster.links.KlusterBatchLink"],
        "connection-types": [
            {
                "connection-type": "kluster",
                "hook-class-name": "airflow_provider_kluster.hooks.kluster.KlusterHook",
                "hook-name": "kluster.ai",
                "conn-fields": {
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "schema": {"type": ["number", "null"], "default": 60},
                        "description": "Timeout of one HTTP request to the API.",
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["integer", "null"], "default": 5},
                        "description": "Retries of one call on connection errors, 408, 409, 429 and 5xx.",
                    },
                    "platform_url": {
                        "label": "Platform URL (extra link)",
                        "schema": {"type": ["string", "null"], "default": "https://platform.kluster.ai"},
                        "description": "Base of the batch page links shown in the Airflow UI.",
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "extra"],
                    "relabeling": {"host": "Base URL", "password": "API key"},
                    "placeholders": {"host": DEFAULT_BASE_URL, "password": "your kluster.ai API key"},
                },
            }
        ],
    }
