"""Deterministic fault injection for the kluster.ai emulator.

Two kinds of faults exist:

* **HTTP faults** (:class:`FaultRule`) fire on matching requests before they reach the route: an error
  status (optionally with ``Retry-After``), extra latency, a dropped connection or a malformed 200 body.
  With ``after_commit`` the route runs first (the batch is created, the file stored) and only its answer
  is replaced by the fault: "the server did the work but the answer was lost".
* **Batch faults**: a batch can be made to *stick* in a status (:meth:`FaultInjector.stick_batch`), a share
  of the requests inside batches can be made to fail into the error file (:attr:`FaultInjector.fail_share`)
  and the cancellation delay can be overridden (:attr:`FaultInjector.cancel_delay`).

All randomness comes from a :class:`random.Random` seeded with the emulator seed, so a test run is
reproducible.

CLI / string syntax (``--fault``), parsed by :func:`parse_fault_spec`::

    "<METHOD> <PATH>[:key=value]..."
    e.g.  "POST /v1/batches:rate=0.5:status=503"
          "GET /v1/batches/{id}:times=3:status=429:retry_after=1"
          "GET /v1/files/{id}/content:times=1:drop"
          "POST /v1/batches:times=1:status=503:after_commit"
          "POST /v1/files:times=1:drop:after_commit"
          "* *:latency=0.2"

Keys: ``status``, ``times``, ``rate``, ``retry_after``, ``latency``, ``message``, ``drop`` (or
``drop_connection``), ``malformed`` (or ``malformed_body``), ``after_commit``. The flags (``drop``,
``malformed``, ``after_commit``) may be given bare or as ``=1``/``=0`` (also ``true``/``false``,
``yes``/``no``). Path placeholders may use any name (``{id}``, ``{batch_id}``); ``*`` matches any
method or path.
"""

from __future__ import annotations

import itertools
import random
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

_PLACEHOLDER = re.compile(r"\{[^}/]*\}")

#: Statuses a batch may be made to stick in.
STICKABLE_STATUSES = frozenset(
    {"pre_schedule", "validating", "in_progress", "finalizing", "cancelling"},
)


def normalize_route(route: str) -> str:
    """Normalise ``"get /v1/batches/{batch_id}"`` to ``"GET /v1/batches/{id}"``.

    :param route: ``"METHOD PATH"``, or just ``"PATH"`` (then the method is ``*``).
    :return: the normalised route key.
    """
    route = route.strip()
    if " " in route:
        method, path = route.split(None, 1)
    else:
        method, path = "*", route
    path = _PLACEHOLDER.sub("{id}", path.strip())
    if len(path) > 1:
        path = path.rstrip("/")
    return f"{method.upper()} {path}"


@dataclass
class FaultRule:
    """One HTTP fault.

    :param route: ``"METHOD /v1/path/{id}"`` (placeholders of any name), ``"*"`` for every route.
    :param status: HTTP status to answer with (e.g. 503, 429, 500). ``None`` with ``malformed_body``
        means 200; ``None`` alone means "only add latency".
    :param times: fire on the next ``times`` matching requests, then stop (``None`` = unlimited).
    :param rate: probability of firing on each matching request (``None`` = always).
    :param retry_after: value of the ``Retry-After`` header (seconds) sent with the error.
    :param latency: seconds to sleep before answering (or before passing the request on).
    :param drop_connection: close the TCP connection without sending any response.
    :param malformed_body: answer with a body that is not valid JSON.
    :param message: error message placed in the JSON error body.
    :param after_commit: let the request be handled normally first (auth check and route: the batch is
        really created, the file really stored, counters move) and only then replace its answer by the
        fault — the ``status`` error (JSON error body, ``Retry-After`` when set), the malformed body, or
        ``drop_connection`` (the connection is closed without any response). Simulates "the server did
        the work but the answer was lost", the way a client retry creates a duplicate batch. Needs
        ``status``, ``malformed_body`` or ``drop_connection``; ``latency`` is still slept before the
        request is handled; ``times``/``rate``/``fired`` count firings as usual.
    """

    route: str = "*"
    status: int | None = None
    times: int | None = None
    rate: float | None = None
    retry_after: float | None = None
    latency: float = 0.0
    drop_connection: bool = False
    malformed_body: bool = False
    message: str | None = None
    after_commit: bool = False
    id: int = 0
    fired: int = 0
    _key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.route.strip() in ("", "*", "* *"):
            self._key = "* *"
        else:
            self._key = normalize_route(self.route)
        if self.rate is not None and not 0.0 <= float(self.rate) <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        if self.times is not None and int(self.times) < 0:
            raise ValueError("times must be >= 0")
        if self.status is not None and not 100 <= int(self.status) <= 599:
            raise ValueError("status must be an HTTP status code")
        if not isinstance(self.after_commit, bool):
            raise ValueError("after_commit must be true or false")
        if self.after_commit and not self.replaces_response:
            raise ValueError("after_commit needs status, malformed_body or drop_connection")

    @property
    def replaces_response(self) -> bool:
        """Whether firing answers instead of the route (otherwise the rule only adds latency)."""
        return self.drop_connection or self.malformed_body or self.status is not None

    @property
    def exhausted(self) -> bool:
        """Whether a ``times``-limited rule has fired its last time."""
        return self.times is not None and self.fired >= self.times

    def matches(self, method: str, route_key: str, path: str) -> bool:
        """Whether this rule applies to a request.

        :param method: the request method.
        :param route_key: the normalised route template key (see :func:`normalize_route`).
        :param path: the concrete request path.
        """
        rule_method, rule_path = self._key.split(" ", 1)
        if rule_method not in ("*", method.upper()):
            return False
        if rule_path == "*":
            return True
        _, tpl_path = route_key.split(" ", 1)
        return rule_path in (tpl_path, path.rstrip("/") or "/")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view of the rule."""
        data = asdict(self)
        data.pop("_key", None)
        data["exhausted"] = self.exhausted
        return data


_RULE_FIELDS = {
    "route",
    "status",
    "times",
    "rate",
    "retry_after",
    "latency",
    "drop_connection",
    "malformed_body",
    "message",
    "after_commit",
}


def rule_from_dict(data: dict[str, Any]) -> FaultRule:
    """Build a :class:`FaultRule` from a JSON-ish dict (unknown keys are rejected)."""
    unknown = set(data) - _RULE_FIELDS - {"id", "fired", "exhausted"}
    if unknown:
        raise ValueError("unknown fault keys: {}".format(", ".join(sorted(unknown))))
    kwargs = {k: v for k, v in data.items() if k in _RULE_FIELDS}
    return FaultRule(**kwargs)


def parse_fault_spec(spec: str) -> dict[str, Any]:
    """Parse the CLI syntax ``"POST /v1/batches:rate=0.5:status=503"`` into keyword arguments.

    :param spec: the fault specification (see the module docstring).
    :return: keyword arguments for :meth:`FaultInjector.add`.
    :raises ValueError: on syntax errors.
    """
    parts = spec.split(":")
    route = parts[0].strip() or "*"
    kwargs: dict[str, Any] = {"route": route}
    for part in parts[1:]:
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        key = key.strip().replace("-", "_")
        value = value.strip()
        if key in ("drop", "drop_connection"):
            kwargs["drop_connection"] = value.lower() not in ("0", "false", "no")
        elif key in ("malformed", "malformed_body"):
            kwargs["malformed_body"] = value.lower() not in ("0", "false", "no")
        elif key == "after_commit":
            kwargs["after_commit"] = value.lower() not in ("0", "false", "no")
        elif key in ("status", "times"):
            kwargs[key] = int(value)
        elif key in ("rate", "retry_after", "latency"):
            kwargs[key] = float(value)
        elif key == "message":
            kwargs[key] = value
        else:
            raise ValueError(f"unknown fault option {key!r} in {spec!r}")
    return kwargs


class FaultInjector:
    """Registry of HTTP and batch faults (thread-safe, seeded).

    :param seed: seed of the random generator used for ``rate`` rules and ``fail_share``.
    """

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._lock = threading.RLock()
        self._rules: list[FaultRule] = []
        self._ids = itertools.count(1)
        self.rng = random.Random(seed)
        self._stuck: dict[str, str] = {}
        #: Share (0..1) of the requests inside batches that fail into the error file.
        self.fail_share: float = 0.0
        #: Override of the emulator's cancellation delay in seconds (``None`` = use the config).
        self.cancel_delay: float | None = None

    # -- HTTP faults -------------------------------------------------------------------------
    def add(
        self,
        route: str = "*",
        *,
        status: int | None = None,
        times: int | None = None,
        rate: float | None = None,
        retry_after: float | None = None,
        latency: float = 0.0,
        drop_connection: bool = False,
        malformed_body: bool = False,
        message: str | None = None,
        after_commit: bool = False,
    ) -> FaultRule:
        """Register an HTTP fault; see :class:`FaultRule` for the arguments.

        :return: the rule (its ``id`` can be passed to :meth:`remove`; ``fired`` counts firings).
        """
        rule = FaultRule(
            route=route,
            status=status,
            times=times,
            rate=rate,
            retry_after=retry_after,
            latency=latency,
            drop_connection=drop_connection,
            malformed_body=malformed_body,
            message=message,
            after_commit=after_commit,
        )
        return self.add_rule(rule)

    def add_rule(self, rule: FaultRule) -> FaultRule:
        """Register an already built :class:`FaultRule`."""
        with self._lock:
            rule.id = next(self._ids)
            self._rules.append(rule)
        return rule

    def add_spec(self, spec: str) -> FaultRule:
        """Register a fault given in the CLI syntax (see :func:`parse_fault_spec`)."""
        return self.add(**parse_fault_spec(spec))

    def remove(self, rule_id: int) -> bool:
        """Remove one rule by id; return whether it existed."""
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    @property
    def rules(self) -> list[FaultRule]:
        """A copy of the registered rules."""
        with self._lock:
            return list(self._rules)

    def pick(self, method: str, route_key: str, path: str) -> FaultRule | None:
        """Return the first rule that fires for this request (and count the firing), or ``None``."""
        with self._lock:
            for rule in self._rules:
                if rule.exhausted or not rule.matches(method, route_key, path):
                    continue
                if rule.rate is not None and self.rng.random() >= rule.rate:
                    continue
                rule.fired += 1
                return rule
        return None

    # -- batch faults ------------------------------------------------------------------------
    def stick_batch(self, batch_id: str, status: str) -> None:
        """Make a batch (or every batch, with ``"*"``) stay in ``status`` once it reaches it.

        Expiry of the completion window and user cancellation still apply.
        """
        status = status.lower()
        if status not in STICKABLE_STATUSES:
            raise ValueError(
                "cannot stick in {!r}; choose one of {}".format(
                    status, ", ".join(sorted(STICKABLE_STATUSES))
                ),
            )
        with self._lock:
            self._stuck[batch_id] = status

    def unstick_batch(self, batch_id: str = "*") -> None:
        """Release a batch stuck with :meth:`stick_batch` (``"*"`` releases the wildcard entry)."""
        with self._lock:
            self._stuck.pop(batch_id, None)

    def is_stuck(self, batch_id: str, status: str) -> bool:
        """Whether ``batch_id`` must not leave ``status``."""
        with self._lock:
            return self._stuck.get(batch_id) == status or self._stuck.get("*") == status

    def should_fail_request(self) -> bool:
        """Draw whether one request inside a batch fails (according to :attr:`fail_share`)."""
        with self._lock:
            share = self.fail_share
            return share > 0 and self.rng.random() < share

    # -- housekeeping ------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove every fault and re-seed the random generator."""
        with self._lock:
            self._rules.clear()
            self._stuck.clear()
            self.fail_share = 0.0
            self.cancel_delay = None
            self.rng.seed(self._seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view of every fault (as served by ``GET /_emulator/faults``)."""
        with self._lock:
            return {
                "rules": [r.to_dict() for r in self._rules],
                "stuck": dict(self._stuck),
                "fail_share": self.fail_share,
                "cancel_delay": self.cancel_delay,
            }

    def configure(self, data: dict[str, Any], *, replace: bool = True) -> None:
        """Apply a JSON document ``{rules, stuck, fail_share, cancel_delay}`` or a single rule.

        :param data: either a rule dict (has ``route``) or the full document.
        :param replace: with a full document, drop existing rules first.
        """
        if "route" in data:
            self.add_rule(rule_from_dict(data))
            return
        unknown = set(data) - {"rules", "stuck", "fail_share", "cancel_delay"}
        if unknown:
            raise ValueError("unknown keys: {}".format(", ".join(sorted(unknown))))
        rules = [rule_from_dict(r) for r in data.get("rules") or []]
        stuck = data.get("stuck") or {}
        for status in stuck.values():
            if str(status).lower() not in STICKABLE_STATUSES:
                raise ValueError(f"cannot stick in {status!r}")
        with self._lock:
            if replace:
                self._rules.clear()
                self._stuck.clear()
            for rule in rules:
                self.add_rule(rule)
            for batch_id, status in stuck.items():
                self._stuck[batch_id] = str(status).lower()
            if "fail_share" in data:
                share = float(data["fail_share"] or 0.0)
                if not 0.0 <= share <= 1.0:
                    raise ValueError("fail_share must be between 0 and 1")
                self.fail_share = share
            if "cancel_delay" in data:
                delay = data["cancel_delay"]
                self.cancel_delay = None if delay is None else float(delay)
