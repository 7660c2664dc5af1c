"""Assets and lineage: what a finished batch (or job) tells Airflow's asset events and OpenLineage.

* **Assets.** ``results_asset`` (an :class:`~airflow.sdk.Asset`, or a string: ``Asset(value)``, both its name and
  URI) is added to the task's ``outlets`` when the operator is built — Airflow must know outlets when it parses the
  DAG, so it cannot be templated; the rendered destination is in the event's extra. At the end of a successful
  ``execute`` the same extra (:func:`event_extra`: batch ids, models, request counts, tokens, cost, where the
  records are) is attached to every :class:`~airflow.sdk.Asset` among the task's outlets, the user's own included,
  so a DAG scheduled on the asset reads it from ``triggering_asset_events``. The extra is JSON-native and built
  only from the manifest: it never holds the API key.
* **OpenLineage.** :meth:`KlusterLineageMixin.get_openlineage_facets_on_start` and ``..._on_complete`` report the
  request file as input, the records file as output (with its row count) and a ``kluster`` run facet (models,
  completion window, batch ids, request counts, tokens, cost). ``apache-airflow-providers-openlineage`` (extra
  ``openlineage``) is imported only inside them: without it nothing here imports OpenLineage, and Airflow never
  calls them.

A pure module: it never imports the hook, the client or its transport; the operators pass what it needs.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk import Asset

from airflow_provider_kluster.exceptions import KlusterConfigError
from airflow_provider_kluster.paths import as_path

log = logging.getLogger(__name__)

#: Records read from a batch's records file to name the models that answered (the manifest does not name them).
MODEL_SCAN_RECORDS = 1000
#: The OpenLineage run facet's key.
RUN_FACET_KEY = "kluster"
#: Dataset namespace of files held by kluster.ai when the connection's base URL is not known.
DEFAULT_FILES_NAMESPACE = "kluster://api.kluster.ai"
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_COUNT_KEYS = ("total", "succeeded", "failed", "missing")


# -- Assets -------------------------------------------------------------------------------------------------


def as_asset(value: Asset | str | None) -> Asset | None:
    """Return ``value`` as an Asset: a string becomes ``Asset(value)`` (a URI such as ``s3://…`` or a name)."""
    if value is None or isinstance(value, Asset):
        return value
    if isinstance(value, str) and value.strip():
        return Asset(value)
    raise KlusterConfigError(
        f"results_asset must be an airflow.sdk.Asset, a non-empty string (its URI or name) or None; got {value!r}."
    )


def declare_results_asset(operator: Any, results_asset: Asset | str | None) -> Asset | None:
    """Add ``results_asset`` to ``operator.outlets`` (once) at construction; return it as an Asset."""
    asset = as_asset(results_asset)
    if asset is not None:
        outlets = list(getattr(operator, "outlets", None) or [])
        if asset not in outlets:
            operator.outlets = [*outlets, asset]
    return asset


def _json_native(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def event_extra(
    manifest: Mapping[str, Any],
    *,
    models: Iterable[str] = (),
    completion_window: str | None = None,
) -> dict[str, Any]:
    """Return the asset event extra for a results manifest (one batch) or a job manifest (``batches`` in it).

    Keys: ``kind`` (``batch`` or ``job``), ``batch_ids``, ``models``, ``completion_window``, ``status`` (a batch's),
    ``total``, ``succeeded``, ``failed``, ``missing``, ``usage`` (prompt, completion, total tokens), ``cost`` (a job's:
    ``estimate_usd``, ``actual_usd``, ``currency``, ``unit``; ``None`` for one batch), ``records_path``,
    ``manifest_path`` (a job's), ``attempts`` (a job's).
    """
    is_job = "batches" in manifest
    usage = manifest.get("usage") or {}
    seen = set(models)
    if is_job:
        seen.update(m for m in (manifest.get("usage_by_model") or {}) if m != "unknown")
        estimate = (manifest.get("cost") or {}).get("estimate") or {}
        seen.update(estimate.get("per_model") or {})
        batch_ids = [b["id"] for b in manifest.get("batches") or [] if b.get("id")]
    else:
        batch_ids = [manifest["batch_id"]] if manifest.get("batch_id") else []
    cost = None
    if is_job:
        given = manifest.get("cost") or {}
        cost = {
            "estimate_usd": (given.get("estimate") or {}).get("total_usd"),
            "actual_usd": given.get("actual_usd"),
            "currency": given.get("currency", "USD"),
            "unit": given.get("unit"),
        }
    extra: dict[str, Any] = {
        "kind": "job" if is_job else "batch",
        "batch_ids": batch_ids,
        "models": sorted(seen),
        "completion_window": completion_window,
        "status": None if is_job else manifest.get("status"),
        **{key: int(manifest.get(key) or 0) for key in _COUNT_KEYS},
        "usage": {key: int(usage.get(key) or 0) for key in _USAGE_KEYS},
        "cost": cost,
        "records_path": manifest.get("records_path"),
        "manifest_path": manifest.get("manifest_path"),
        "attempts": manifest.get("attempts"),
    }
    return _json_native(extra)


def models_in_records(records_path: Any, limit: int = MODEL_SCAN_RECORDS) -> list[str]:
    """Return the models named by the first ``limit`` records of a records file (empty when unreadable)."""
    found: set[str] = set()
    if not records_path:
        return []
    try:
        with as_path(records_path).open("rb") as records:
            for number, line in enumerate(records):
                if number >= limit:
                    break
                if line.strip():
                    model = json.loads(line).get("model")
                    if isinstance(model, str) and model:
                        found.add(model)
    except (OSError, ValueError, AttributeError) as error:
        log.info("Could not read the models from %s: %s", records_path, error)
    return sorted(found)


def outlet_assets(outlets: Iterable[Any]) -> list[Any]:
    """Return the outlets an event extra goes to: every Asset (and asset reference), no alias."""
    from airflow.sdk.definitions.asset import AssetRef

    return [outlet for outlet in outlets or [] if isinstance(outlet, (Asset, AssetRef))]


def attach_event_extra(
    context: Mapping[str, Any], outlets: Iterable[Any], extra: Mapping[str, Any]
) -> list[Any]:
    """Attach ``extra`` to the outlet event of every Asset in ``outlets``; return those assets.

    Does nothing where the context has no ``outlet_events`` (an ``execute`` called outside a task run).
    """
    events = context.get("outlet_events") if hasattr(context, "get") else None
    assets = outlet_assets(outlets)
    if events is None or not assets:
        return []
    for asset in assets:
        events[asset].extra.update(_json_native(dict(extra)))
    return assets


# -- OpenLineage -------------------------------------------------------------------------------------------


def dataset_name(location: Any) -> tuple[str, str]:
    """Return OpenLineage's ``(namespace, name)`` of a file: ``file`` and its path for a local one (as common.io
    translates ``file://`` assets), ``<scheme>://<bucket>`` and the key for object storage."""
    text = str(location)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme in ("", "file") or len(parts.scheme) == 1:  # a local path (or a Windows drive letter)
        path = parts.path if parts.scheme == "file" else text
        namespace = f"file://{parts.netloc}" if parts.scheme == "file" and parts.netloc else "file"
        return namespace, os.path.abspath(path) if parts.scheme == "" else path
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")


def files_namespace(base_url: str | None) -> str:
    """Return the namespace of files held by kluster.ai behind ``base_url`` (``kluster://<host[:port]>``)."""
    netloc = urllib.parse.urlsplit(base_url or "").netloc
    return f"kluster://{netloc}" if netloc else DEFAULT_FILES_NAMESPACE


def _facets_module() -> Any:
    return importlib.import_module("airflow.providers.common.compat.openlineage.facet")


@functools.cache
def _run_facet_class() -> Any:
    attrs = importlib.import_module("attrs")
    base = _facets_module().RunFacet

    @attrs.define
    class KlusterRunFacet(base):  # type: ignore[misc, valid-type]
        """What kluster.ai did in the run: models, window, batches, request counts, tokens, cost."""

        models: list = attrs.field(factory=list)
        completionWindow: str | None = None
        batchIds: list = attrs.field(factory=list)
        requestCounts: dict | None = None
        tokens: dict | None = None
        cost: dict | None = None
        status: str | None = None

    KlusterRunFacet.__module__ = __name__
    KlusterRunFacet.__qualname__ = "KlusterRunFacet"
    return KlusterRunFacet


def __getattr__(name: str) -> Any:
    """``KlusterRunFacet`` is built on first use (it needs OpenLineage), and can be unpickled by name."""
    if name == "KlusterRunFacet":
        return _run_facet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def operator_lineage(
    *,
    inputs: Iterable[tuple[str, str]] = (),
    outputs: Iterable[tuple[str, str]] = (),
    extra: Mapping[str, Any] | None = None,
    models: Iterable[str] = (),
    completion_window: str | None = None,
    batch_ids: Iterable[str] = (),
) -> Any:
    """Return an ``OperatorLineage`` with the datasets and the ``kluster`` run facet (needs OpenLineage).

    ``extra`` (an :func:`event_extra`) fills the facet and the output's row count after the run; without it the
    facet holds what is known before (``models``, ``completion_window``, ``batch_ids``).
    """
    facet = _facets_module()
    lineage_cls = importlib.import_module("airflow.providers.openlineage.extractors").OperatorLineage
    done = dict(extra or {})
    output_facets = {}
    if done:
        output_facets["outputStatistics"] = facet.OutputStatisticsOutputDatasetFacet(rowCount=done["total"])
    run_facets: dict[str, Any] = {
        RUN_FACET_KEY: _run_facet_class()(
            models=list(done.get("models") or sorted(set(models))),
            completionWindow=done.get("completion_window") or completion_window,
            batchIds=list(done.get("batch_ids") or batch_ids),
            requestCounts={key: done[key] for key in _COUNT_KEYS} if done else None,
            tokens=dict(done["usage"]) if done else None,
            cost=done.get("cost"),
            status=done.get("status"),
        )
    }
    ids = list(done.get("batch_ids") or batch_ids)
    if len(ids) == 1:
        run_facets["externalQuery"] = facet.ExternalQueryRunFacet(externalQueryId=ids[0], source="kluster.ai")
    return lineage_cls(
        inputs=[facet.InputDataset(namespace=ns, name=name) for ns, name in inputs],
        outputs=[
            facet.OutputDataset(namespace=ns, name=name, outputFacets=dict(output_facets))
            for ns, name in outputs
        ],
        run_facets=run_facets,
    )


class KlusterLineageMixin:
    """Asset events and OpenLineage for the results and job operators (mix in before ``BaseOperator``).

    The operator calls :meth:`publish_results` at the end of a successful ``execute``; its input and output
    locations are read from its own attributes: ``input_file``, ``destination``, ``batch_id``, ``model``,
    ``completion_window``.
    """

    _kluster_lineage: dict[str, Any] | None = None

    def publish_results(self, context: Any, manifest: Mapping[str, Any], batch: Any = None) -> dict[str, Any]:
        """Attach the manifest's event extra to every Asset outlet, keep it for OpenLineage; return the extra.

        :param batch: The batch (results operator): its completion window and input file.
        """
        models: list[str] = []
        if "batches" not in manifest:
            models = models_in_records(manifest.get("records_path"))
        elif getattr(self, "model", None):
            models = [str(getattr(self, "model", ""))]
        window = getattr(batch, "completion_window", None) or getattr(self, "completion_window", None)
        extra = event_extra(manifest, models=models, completion_window=window)
        assets = attach_event_extra(context, getattr(self, "outlets", None) or [], extra)
        if assets:
            logging.getLogger(type(self).__module__).info(
                "Asset event for %s: %d of %d requests succeeded",
                ", ".join(getattr(a, "uri", None) or getattr(a, "name", "") or str(a) for a in assets),
                extra["succeeded"],
                extra["total"],
            )
        self._kluster_lineage = {
            "extra": extra,
            "input_file_id": getattr(batch, "input_file_id", None),
        }
        return extra

    # OpenLineage: Airflow's OpenLineage listener calls these when the provider is installed.

    def _lineage_inputs(self, input_file_id: str | None) -> list[tuple[str, str]]:
        if getattr(self, "input_file", None):
            return [dataset_name(self.input_file)]  # type: ignore[attr-defined]
        if input_file_id:
            try:
                base_url = self.hook.settings.base_url  # type: ignore[attr-defined]
            except Exception:  # the connection is not needed for lineage: fall back to kluster's own host
                base_url = None
            return [(files_namespace(base_url), f"files/{input_file_id}")]
        return []

    def _lineage_outputs(self, extra: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        if extra and extra.get("records_path"):
            return [dataset_name(extra["records_path"])]
        destination = getattr(self, "destination", None)
        if destination is None:
            return []
        batch_id = getattr(self, "batch_id", None)
        name = f"{batch_id}.results.jsonl" if batch_id else "results.jsonl"
        return [dataset_name(f"{str(destination).rstrip('/')}/{name}")]

    def _lineage(self, *, complete: bool) -> Any:
        done = (self._kluster_lineage or {}) if complete else {}
        extra = done.get("extra")
        model = getattr(self, "model", None)
        batch_id = getattr(self, "batch_id", None)
        return operator_lineage(
            inputs=self._lineage_inputs(done.get("input_file_id")),
            outputs=self._lineage_outputs(extra),
            extra=extra,
            models=[model] if isinstance(model, str) and model else [],
            completion_window=getattr(self, "completion_window", None),
            batch_ids=[batch_id] if isinstance(batch_id, str) and batch_id else [],
        )

    def get_openlineage_facets_on_start(self) -> Any:
        """OpenLineage before the run: the request file, where the records go, the model and window."""
        return self._lineage(complete=False)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage after the run: also the batches, request counts, tokens and cost."""
        return self._lineage(complete=True)
