from __future__ import annotations

import json
import subprocess
import sys

from airflow_provider_kluster import get_provider_info
from airflow_provider_kluster.hooks.kluster import KlusterHook


def test_provider_info_has_what_airflow_requires():
    info = get_provider_info()
    assert info["package-name"] == "airflow-provider-kluster"
    assert info["description"]
    (conn_type,) = info["connection-types"]
    assert conn_type["connection-type"] == "kluster"
    assert conn_type["hook-class-name"] == f"{KlusterHook.__module__}.{KlusterHook.__name__}"
    assert conn_type["ui-field-behaviour"]["relabeling"] == {"host": "Base URL", "password": "API key"}
    assert {"timeout", "max_retries"} <= set(conn_type["conn-fields"])


def test_every_module_named_in_provider_info_holds_its_kind():
    """Each module Airflow is told about imports and defines a class of the kind it is listed under."""
    import importlib
    import inspect

    from airflow.sdk import BaseHook, BaseOperator, BaseOperatorLink, BaseSensorOperator
    from airflow.triggers.base import BaseTrigger

    info = get_provider_info()
    bases = {
        "hooks": BaseHook,
        "operators": BaseOperator,
        "sensors": BaseSensorOperator,
        "triggers": BaseTrigger,
    }
    for kind, base in bases.items():
        modules = [module for entry in info[kind] for module in entry["python-modules"]]
        assert modules, f"provider info lists no {kind}"
        for name in modules:
            module = importlib.import_module(name)
            own = [
                cls
                for _, cls in inspect.getmembers(module, inspect.isclass)
                if cls.__module__ == name and issubclass(cls, base)
            ]
            assert own, f"{name} (listed under {kind}) defines no {base.__name__}"
    assert info["extra-links"]
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), BaseOperatorLink)


def test_hook_ui_behaviour_matches_provider_info():
    conn_type = get_provider_info()["connection-types"][0]["ui-field-behaviour"]
    ui = KlusterHook.get_ui_field_behaviour()
    assert ui["hidden_fields"] == conn_type["hidden-fields"]
    assert ui["relabeling"] == conn_type["relabeling"]


def _airflow(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "airflow", *args], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_airflow_lists_the_provider_and_its_connection_type():
    assert "airflow-provider-kluster" in _airflow("providers", "list", "-o", "plain")
    hooks = _airflow("providers", "hooks", "-o", "plain")
    assert "kluster" in hooks
    assert "KlusterHook" in hooks


def test_cli_connection_keeps_the_kluster_type(airflow_db):
    _airflow(
        "connections",
        "add",
        "k_cli",
        "--conn-type",
        "kluster",
        "--conn-host",
        "https://api.kluster.ai/v1",
        "--conn-password",
        "kl-cli-secret-123",
    )
    listed = _airflow("connections", "list", "-o", "json")
    (payload,) = [line for line in listed.splitlines() if line.startswith("[{")]
    conns = {c["conn_id"]: c for c in json.loads(payload)}
    assert conns["k_cli"]["conn_type"] == "kluster"
