# Everything runs in .venv, created on first use with uv (installed with pip if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
STAMP := $(VENV)/.installed
# A throwaway AIRFLOW_HOME so the suite and the demo never touch ~/airflow.
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False

.PHONY: venv test test-oldest test-32 lint demo emulator benchmark bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) -e ".[test,common-ai,openlineage]"
	@touch $(STAMP)

## test: run the whole suite against the local emulator (creates .venv if needed)
test: venv
	AIRFLOW__CORE__UNIT_TEST_MODE=True $(PY) -m pytest tests

## test-oldest: the suite on the oldest Airflow we support (3.1), in .venv-airflow31 (real-scheduler tests skip)
test-oldest:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python $(PYTHON) .venv-airflow31
	$(UV) pip install --quiet --python .venv-airflow31/bin/python "apache-airflow>=3.1,<3.2" -e ".[test]"
	AIRFLOW__CORE__UNIT_TEST_MODE=True .venv-airflow31/bin/python -m pytest tests -m "not scheduler"

## test-32: the same suite on Airflow 3.2, in .venv-airflow32 (real-scheduler and browser tests skip)
# Resolved as PyPI stood the day after 3.2.2's release (2026-05-29): newer cadwyn, fastapi, pydantic and svcs break
# Airflow 3.2.2's own execution API ("needs a discriminator field", KeyError 'svcs_registry'), so dag.test() fails
# in a venv resolved today. The openai client stack we need (openai 3, httpx2, httpcore2, and the idna and jiter
# they ask for) came later and is taken as of AIRFLOW32_CLIENT_DATE.
AIRFLOW32_DATE := 2026-05-30T00:00:00Z
AIRFLOW32_CLIENT_DATE := 2026-12-05T00:00:00Z
AIRFLOW32_RESOLUTION := --exclude-newer $(AIRFLOW32_DATE) $(foreach p,openai httpx2 httpcore2 idna jiter,--exclude-newer-package $(p)=$(AIRFLOW32_CLIENT_DATE))
test-32:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python $(PYTHON) .venv-airflow32
	$(UV) pip install --quiet --python .venv-airflow32/bin/python "apache-airflow>=3.2,<3.3" -e ".[test]" $(AIRFLOW32_RESOLUTION)
	AIRFLOW__CORE__UNIT_TEST_MODE=True .venv-airflow32/bin/python -m pytest tests -m "not scheduler"

## lint: ruff (style, imports, the one-way dependency rule) and mypy (types) over the package
lint: venv
	$(PY) -m ruff check airflow_provider_kluster tests example_dags benchmarks scripts
	$(PY) -m ruff format --check airflow_provider_kluster tests example_dags benchmarks scripts
	$(PY) -m mypy

## demo: run the example DAG end to end against the emulator (or the real kluster.ai with KLUSTER_API_KEY set)
demo: venv
	$(PY) scripts/demo.py

emulator: venv
	$(PY) -m airflow_provider_kluster.emulator --port 8000

benchmark: venv
	$(PY) benchmarks/download_rss.py
	$(PY) benchmarks/many_triggers.py
	$(PY) benchmarks/job_scale.py rss
	$(PY) benchmarks/job_scale.py calls

## bench: every side-by-side comparison (ours vs providers-openai, common.ai, bare httpx2 loops, curl) in one run,
## written to benchmarks/RESULTS.md; the peers come from the bench extra, in .venv-bench (never the test venv)
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(BENCH_VENV)
	$(UV) pip install --quiet --python $(BENCH_VENV)/bin/python -e ".[bench]"
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/bench.py $(if $(QUICK),--quick)

## bench-quick: the same, short (under 5 minutes)
bench-quick: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) $(BENCH_VENV) .venv-airflow31 .venv-airflow32 .airflow .pytest_cache
