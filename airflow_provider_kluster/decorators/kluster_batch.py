"""``@task.kluster_batch``: a TaskFlow function returns the requests; the task runs them as one kluster.ai batch job.

.. code-block:: python

    @task.kluster_batch(model="klusterai/Meta-Llama-3.1-8B-Instruct-Turbo", max_completion_tokens=200)
    def summaries(articles: list[str]) -> list[str]:
        return [f"Summarise in one line: {text}" for text in articles]

The decorated task is a :class:`~airflow_provider_kluster.operators.job.KlusterBatchJobOperator` whose input is
the function's return value: every parameter of the job operator (``model``, ``max_completion_tokens``,
``destination``, ``max_requests``, ``max_attempts``, ``stall_timeout``, ``max_cost``, ``max_failed_ratio``,
``poll_interval``, ``deferrable``, ``kluster_conn_id``, …) is a keyword of the decorator, and the task returns the
job's manifest.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory
from airflow.sdk.definitions.context import context_merge

from airflow_provider_kluster.exceptions import KlusterConfigError
from airflow_provider_kluster.operators.job import KlusterBatchJobOperator
from airflow_provider_kluster.parameters import check_destination
from airflow_provider_kluster.paths import as_path, move_into_place, temp_sibling
from airflow_provider_kluster.request_files import write_request_file

try:
    from airflow.sdk.bases.decorator import determine_kwargs
except ImportError:  # Airflow < 3.2
    from airflow.utils.operator_helpers import determine_kwargs  # type: ignore[no-redef,attr-defined,unused-ignore]

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.bases.decorator import TaskDecorator

__all__ = ["INPUT_NAME", "REQUESTS_NAME", "kluster_batch_task"]

#: The file under ``destination`` that a returned list of requests is written to.
REQUESTS_NAME = "requests.jsonl"
#: The file under ``destination`` naming the job's input and the task instance that owns the folder.
INPUT_NAME = "input.json"
#: Folder under the system's temporary directory holding the default destinations.
DEFAULT_ROOT = "airflow-kluster-batch"
_RETURNS = (
    "return a list of prompt strings, chat bodies (with 'messages') or full batch lines (with 'body'), or the "
    "path (str, pathlib.Path or ObjectStoragePath) of a JSONL request file"
)


class _KlusterBatchDecoratedOperator(DecoratedOperator, KlusterBatchJobOperator):
    """Run the function once, keep its requests under ``destination``, then run them as a kluster.ai batch job.

    **What the function returns.** A list (or any iterable) of prompt strings, chat bodies or full batch lines —
    written to ``destination``/``requests.jsonl`` with ``model``, ``max_completion_tokens`` and ``body_defaults``
    filled in where an item sets none, exactly as the job operator's ``requests`` — or the path (``str``,
    ``pathlib.Path``, ``ObjectStoragePath`` or URI) of an existing JSONL request file, which is sent as it is
    (like the job operator's ``input_file``; ``model`` and the body defaults do not change it). Anything else
    (``None``, a dict, a string naming no file, an empty list, an item of no known form) fails the task with one
    sentence before anything is uploaded; every line is then validated as the job operator does.

    **Why the requests are kept in a file.** The function runs once per try, in the first ``execute``. A
    deferrable task is re-created by Airflow when the trigger fires and resumes in ``execute_complete``, where
    the function's return value is gone — and the job operator re-derives everything (shards, fingerprints,
    the merge) from its input on every wake-up. So the first ``execute`` turns a returned list into a request
    file, ``destination``/``requests.jsonl`` (beside the job's ``results.jsonl`` and ``manifest.json``), and
    records the job's input — that file, or the returned path — in ``destination``/``input.json`` together with
    the task instance it belongs to. Every resume finds ``input.json`` at the same place (``destination`` is
    rendered from the same run and map index) and runs the job from the file it names, without calling the
    function again. Not XCom: a job's requests may be far larger than XCom should hold. Not the deferral's
    kwargs: ``dag.test()`` and a trigger's failure replace them with the event, so they would not reach
    ``execute_complete``.

    **destination.** Optional. When given it is the job's folder, templated as usual; it must be reachable by
    whichever worker resumes the task (object storage, or a shared disk, on a deployment with several workers).
    Mapped tasks (``.expand()``) each need their own: template it with ``{{ ti.map_index }}``; a destination
    already used by another task instance of the same run is refused. When not given, the task uses
    ``<system temp dir>/airflow-kluster-batch/<dag_id>/<run_id>/<task_id>[/<map_index>]`` on the machine it runs
    on — right for ``dag.test()`` and single-machine deployments, not for several workers.

    **Retries.** A new try runs the function again; it must return the same requests for the try to reattach
    to the batches of earlier tries (the job operator refuses batches made from different input).
    """

    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *(name for name in KlusterBatchJobOperator.template_fields if name != "requests"),
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        "body_defaults": "json",
        "metadata": "json",
    }
    custom_operator_name: str = "@task.kluster_batch"
    # The rendered fields shown in the UI are refreshed after execute: input_file then names the request file.
    overwrite_rtif_after_execution: bool = True

    def __init__(
        self,
        *,
        python_callable: Callable,
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        destination: Any = None,
        **kwargs: Any,
    ) -> None:
        for name in ("input_file", "requests"):
            if name in kwargs:
                raise TypeError(
                    f"@task.kluster_batch takes its requests from the function's return value; do not pass {name}= "
                    f"(the function may {_RETURNS})."
                )
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            destination=destination,
            **kwargs,
        )
        #: ``destination`` was not given: each task instance derives its own from its identity.
        self._default_destination = destination is None

    # -- entry points ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        """Check the parameters, run the function once, keep its requests, then start the job."""
        destination = self._place(context)
        # Every parameter is checked before the function runs (the input is checked once it has returned).
        self.input_file, self.requests = str(destination / REQUESTS_NAME), None
        self.check_parameters()
        owner = _owner(context)
        self._refuse_shared(destination, owner)
        _write_json(destination / INPUT_NAME, {**owner, "input_file": None})  # claim the folder at once
        context_merge(context, self.op_kwargs)
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        returned = self.python_callable(*self.op_args, **kwargs)
        self.input_file = self._keep(returned, destination)
        _write_json(destination / INPUT_NAME, {**owner, "input_file": self.input_file})
        self.log.info(
            "The job's input: %s (kept in %s for resumes)", self.input_file, destination / INPUT_NAME
        )
        return super().execute(context)  # DecoratedOperator.execute → KlusterBatchJobOperator.execute

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume the job from the input the first ``execute`` recorded; the function is not called again."""
        destination = self._place(context)
        self.input_file, self.requests = self._kept_input(destination, _owner(context)), None
        return super().execute_complete(context, event)

    # -- the function's return value -------------------------------------------------------------------

    def _place(self, context: Context) -> Any:
        """Settle ``destination`` (the given one, rendered, or this task instance's default); return it as a path."""
        if self._default_destination:
            ti = context["ti"]
            parts = [ti.dag_id, ti.run_id, ti.task_id]
            map_index = getattr(ti, "map_index", -1)
            if map_index is not None and map_index >= 0:
                parts.append(str(map_index))
            self.destination = os.path.join(tempfile.gettempdir(), DEFAULT_ROOT, *map(_safe, parts))
        check_destination(self.destination)  # refuses an empty one in the job operator's words
        return as_path(self.destination)

    def _refuse_shared(self, destination: Any, owner: dict[str, Any]) -> None:
        """Refuse a destination another task instance of this run uses (mapped tasks sharing one folder)."""
        earlier = _read_json(destination / INPUT_NAME) or {}
        same_run = (earlier.get("dag_id"), earlier.get("run_id")) == (owner["dag_id"], owner["run_id"])
        if same_run and not _same_instance(earlier, owner):
            index = earlier.get("map_index")
            raise KlusterConfigError(
                f"destination {self.destination} is already used by task {earlier.get('task_id')}"
                f"{f' (map index {index})' if isinstance(index, int) and index >= 0 else ''} of this run; give "
                "each task instance its own, e.g. destination='.../{{ ti.task_id }}/{{ ti.map_index }}'."
            )

    def _kept_input(self, destination: Any, owner: dict[str, Any]) -> str:
        """Return the input file recorded by this task instance's first ``execute``; refuse anything else."""
        kept = _read_json(destination / INPUT_NAME)
        where = (
            "The destination must be reachable by every worker that may resume the task (object storage or a "
            "shared disk); clear the task to run its function again."
        )
        if kept is None:
            raise KlusterConfigError(
                f"@task.kluster_batch resumed, but {destination / INPUT_NAME}, written by its first execute, is "
                f"missing or unreadable. {where}"
            )
        if not _same_instance(kept, owner) or kept.get("run_id") != owner["run_id"]:
            raise KlusterConfigError(
                f"@task.kluster_batch resumed, but {destination / INPUT_NAME} belongs to task {kept.get('task_id')} "
                f"(map index {kept.get('map_index')}) of run {kept.get('run_id')}: another task instance wrote to "
                "the same destination. Give each its own, then clear the task."
            )
        input_file = kept.get("input_file")
        if not isinstance(input_file, str) or not as_path(input_file).exists():
            raise KlusterConfigError(
                f"@task.kluster_batch resumed, but its input {input_file}, kept by its first execute, is gone. "
                f"{where}"
            )
        return input_file

    def _keep(self, returned: Any, destination: Any) -> str:
        """Check what the function returned; write requests to ``destination``; return the job's input file."""
        if isinstance(returned, (str, os.PathLike)) or hasattr(returned, "fs"):
            if isinstance(returned, str) and not returned.strip():
                raise KlusterConfigError(
                    f"The @task.kluster_batch function returned an empty string; {_RETURNS}."
                )
            path = as_path(returned)
            if not path.exists():
                raise KlusterConfigError(
                    f"The @task.kluster_batch function returned {_shown(returned)}, which names no file. A returned "
                    "string is read as the path of a JSONL request file; to send prompts, return them in a list."
                )
            if self.model is not None or self.max_completion_tokens is not None or self.body_defaults:
                self.log.info(
                    "The function returned a request file: it is sent as it is (model, max_completion_tokens and "
                    "body_defaults fill in only requests returned as a list)"
                )
            return str(returned)
        if (
            returned is None
            or isinstance(returned, (Mapping, bytes, bytearray))
            or not isinstance(returned, Iterable)
        ):
            hint = " (one request goes in a list: [body])" if isinstance(returned, Mapping) else ""
            raise KlusterConfigError(
                f"The @task.kluster_batch function returned {_kind(returned)}{hint}; {_RETURNS}."
            )
        defaults = dict(self.body_defaults or {})
        if self.max_completion_tokens is not None:
            defaults.setdefault("max_completion_tokens", self.max_completion_tokens)
        target = destination / REQUESTS_NAME
        write_request_file(returned, target, model=self.model, body_defaults=defaults)
        return str(target)


def _owner(context: Context) -> dict[str, Any]:
    ti = context["ti"]
    return {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "map_index": getattr(ti, "map_index", -1),
    }


def _same_instance(kept: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    return all(kept.get(key) == owner[key] for key in ("dag_id", "task_id", "map_index"))


def _read_json(path: Any) -> dict[str, Any] | None:
    try:
        with path.open("r", encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Any, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with tmp.open("w", encoding="utf-8") as out:
        json.dump(value, out)
    move_into_place(tmp, path)


def _safe(part: str) -> str:
    """Return one path component of a default destination (run ids hold ``:`` and ``+``)."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", str(part))


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _shown(value: Any) -> str:
    text = repr(str(value))
    return text if len(text) <= 120 else f"{text[:117]}..."


def kluster_batch_task(python_callable: Callable | None = None, **kwargs: Any) -> TaskDecorator:
    """Turn a function returning requests into a kluster.ai batch job task: ``@task.kluster_batch(...)``.

    The function returns prompt strings, chat bodies or full batch lines (a list), or the path of a JSONL
    request file; the task validates them, submits them as one job (sharded, failures resent, stalls caught,
    within ``max_cost``), waits — deferrable by ``[operators] default_deferrable`` unless ``deferrable=`` says
    otherwise — merges the answers under ``destination`` and returns the job's manifest (see
    :class:`~airflow_provider_kluster.operators.job.KlusterBatchJobOperator`, whose parameters the decorator
    takes, and :class:`_KlusterBatchDecoratedOperator` for where the requests are kept between wake-ups).
    Works with ``.expand()``: one job per mapped task instance, each with its own destination.

    :param python_callable: The function (when used as ``@task.kluster_batch`` without parentheses).
    :param kwargs: Parameters of ``KlusterBatchJobOperator`` (all but ``input_file`` and ``requests``) and of
        ``BaseOperator``; ``multiple_outputs`` (default ``False``) unrolls the manifest into XComs.
    """
    kwargs.setdefault("multiple_outputs", False)
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_KlusterBatchDecoratedOperator,
        **kwargs,
    )
