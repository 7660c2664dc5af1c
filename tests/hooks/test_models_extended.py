"""KlusterHook.list_models_extended: the raw model objects of ``GET /models?extended=true``."""

from __future__ import annotations

import pytest

from airflow_provider_kluster.exceptions import KlusterAuthError, KlusterTransientAPIError
from airflow_provider_kluster.hooks.kluster import KlusterHook
from tests.conftest import TEST_API_KEY, conn_json
from tests.helpers import MODEL


@pytest.fixture
def hook(kluster_conn):
    return KlusterHook(kluster_conn)


def test_every_model_comes_with_its_pricing(hook, emulator):
    models = hook.list_models_extended()
    assert [m["id"] for m in models] == hook.list_models() == emulator.emulator.models
    for model in models:
        assert isinstance(model, dict)
        assert set(model["pricing"]["realtime"]) == {"input", "output"}
        assert {"24h", "48h", "72h", "asap"} <= set(model["pricing"]["asynchronous"])
    assert emulator.emulator.counters["GET /v1/models"] == 2


def test_prices_come_back_raw(hook, emulator):
    emulator.emulator.config.prices[MODEL] = {"realtime": {"input": 1.23e-6, "output": 4.56e-6}}
    llama = next(m for m in hook.list_models_extended() if m["id"] == MODEL)
    assert llama["pricing"]["realtime"] == {"input": 1.23e-6, "output": 4.56e-6}


def test_errors_are_mapped_without_the_key(hook, emulator, monkeypatch):
    emulator.emulator.faults.add(route="GET /v1/models", status=503)
    with pytest.raises(KlusterTransientAPIError, match="list models"):
        hook.list_models_extended()
    emulator.emulator.faults.clear()
    wrong = "kl-WRONG-key-0123456789"
    monkeypatch.setenv("AIRFLOW_CONN_BAD", conn_json(emulator.base_url, api_key=wrong))
    with pytest.raises(KlusterAuthError) as exc:
        KlusterHook("bad").list_models_extended()
    assert wrong not in str(exc.value)
    assert TEST_API_KEY not in str(exc.value)
