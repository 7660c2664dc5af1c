"""Dependencies run one way: the pure modules never import the hook, the client or its transport.

The rule is stated in the package docstring and enforced by ruff (``banned-api``); these tests check the same
from two other sides — the source (every import, including type-checking-only and function-local ones) and what
importing the pure modules really loads.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

import airflow_provider_kluster

PACKAGE = pathlib.Path(airflow_provider_kluster.__file__).parent
PURE = [
    "batches",
    "waiting",
    "request_files",
    "results",
    "paths",
    "exceptions",
    "reattach",
    "connection",
    "links",
    "masking",
    "parameters",
    "cancelling",
    "jobs",
    "pricing",
    "ti_state",
    "lineage",
]
BANNED = ("openai", "httpx2", "airflow_provider_kluster.hooks")


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _banned(name: str) -> bool:
    return any(name == banned or name.startswith(banned + ".") for banned in BANNED)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_source_imports_nothing_banned(module):
    found = sorted(name for name in _imports(PACKAGE / f"{module}.py") if _banned(name))
    assert found == [], f"{module}.py imports {found}"


def test_the_check_sees_a_banned_import(tmp_path):
    """The source check is not vacuous: it catches a type-checking-only import of the hook."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from airflow_provider_kluster.hooks.kluster import KlusterHook\n"
    )
    assert any(_banned(name) for name in _imports(sample))


def test_importing_the_pure_modules_loads_no_client():
    code = (
        "import json, sys\n"
        + "".join(f"import airflow_provider_kluster.{m}\n" for m in PURE)
        + "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "airflow_provider_kluster.batches" in loaded
    assert [name for name in loaded if _banned(name)] == []


def test_the_pure_modules_are_every_module_outside_the_wiring():
    """A new top-level module is pure unless it is added to the ruff allow-list on purpose."""
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top_level == set(PURE)


def test_importing_any_module_warns_of_nothing_deprecated_in_ours():
    """Airflow 3.3 deprecates names we could import (``airflow.exceptions.AirflowFailException``, …); a user
    would see the warning on every parse of every DAG that uses us. Warnings raised by Airflow's own modules are
    not ours to fix and are ignored."""
    modules = sorted(
        "airflow_provider_kluster." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import json, warnings\n"
        "import airflow.sdk  # first: importing Airflow routes warnings to its logging, past the recorder\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        + "".join(
            f"    try:\n        import {m.removesuffix('.__init__')}\n"
            "    except ModuleNotFoundError as exc:  # an optional extra (common.ai) that is not installed\n"
            "        if exc.name.startswith('airflow_provider_kluster'):\n            raise\n"
            for m in modules
        )
        + f"ours = [f'{{w.filename}}:{{w.lineno}}: {{w.message}}' for w in seen if {str(PACKAGE)!r} in w.filename]\n"
        "print(json.dumps(ours))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
