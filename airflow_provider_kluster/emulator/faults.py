"""Deterministic fault injection for the kluster.ai emulator.

Two kinds of faults exist:

* **HTTP faults** (:class:`FaultRule`) fire on matching requests before they reach the route: an error
  status (optionally with ``Retry-After``), extra latency, a dropped connection or a malformed 200 body.
  With ``after_commit`` the route runs first (the batch is created, the file stored) and only its answer
  is replaced by the fault: "the server did the work but the answer was lost".
* **Batch faults**: a batch can be made to *stick* in a status (:meth:`FaultInjector.stick_batch`), a share
  of the requests inside batches can be made to fail into the error file (:attr:`FaultInjector.fail_share`)
  and the cancellation delay can be overridden (:attr:`FaultInjector.cancel_delay`).
* **Per-request faults** keyed by ``custom_id`` (deterministic from seed + ``custom_id``, so the same
  requests are hit in every run): :attr:`FaultInjector.transient_share` fails a request into the error
  file with HTTP 500 ``server_error`` or 429 ``rate_limit_exceeded`` for its first
  :attr:`FaultInjector.transient_repeats` executions (sent again in a later batch, it succeeds);
  :attr:`FaultInjector.lost_share` makes a request vanish (in neither file; counted in ``total`` only) for
  its first :attr:`FaultInjector.lost_repeats` executions.
* **Stalled batches**: progress stops after N requests while the batch stays ``in_progress``
  (:attr:`FaultInjector.stall_after` for every batch, :meth:`FaultInjector.stall_batch` for one batch,
  every batch, or the next batch created). Cancellation and expiry still work.

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

import hashlib
import itertools
import random
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

_PLACEHOLDER = re.compile(r"\{[^}/]*\}")

#: What :meth:`FaultInjector.request_fate` may decide for one execution of a request.
LOST = "lost"
SERVER_ERROR = "server_error"
RATE_LIMITED = "rate_limit_exceeded"

#: ``stall_batch`` target meaning "the next batch created" (claimed by that batch).
NEXT_BATCH = "next"

_DOCUMENT_KEYS = frozenset(
    {
        "rules",
        "stuck",
        "fail_share",
        "cancel_delay",
        "transient_share",
        "transient_repeats",
        "lost_share",
        "lost_repeats",
        "stall_after",
        "stalled",
    },
)

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


def _share(name: str, value: Any) -> float:
    share = float(value or 0.0)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")
    return share


def _count(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be an integer >= 0")
    number = int(value)
    if number != float(value) or number < 0:
        raise ValueError(f"{name} must be an integer >= 0")
    return number


def unit_draw(seed: int, salt: str, custom_id: str) -> float:
    """A number in ``[0, 1)`` fixed by ``seed``, ``salt`` and ``custom_id`` (same in every run and process)."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{custom_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


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
        #: Share (0..1) of custom_ids whose first :attr:`transient_repeats` executions fail with 500/429.
        self.transient_share: float = 0.0
        #: How many executions of a chosen custom_id fail transiently before it succeeds.
        self.transient_repeats: int = 1
        #: Share (0..1) of custom_ids whose first :attr:`lost_repeats` executions never come back.
        self.lost_share: float = 0.0
        #: How many executions of a chosen custom_id are lost before it is answered.
        self.lost_repeats: int = 1
        #: Every batch stops making progress after this many requests (``None`` = never).
        self.stall_after: int | None = None
        self._stalled: dict[str, int] = {}

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

    def stall_batch(self, batch_id: str = NEXT_BATCH, after: int = 0) -> None:
        """Stop a batch's progress after ``after`` requests; it stays ``in_progress`` (counts frozen).

        :param batch_id: a batch id, ``"*"`` (every batch), or ``"next"`` (the next batch created claims it;
            a later ``"next"`` call before that replaces the pending one).
        :param after: requests the batch processes before it stalls (``0``: none).

        Cancelling the batch still works (``cancelling`` → ``cancelled``; the files keep what was done), and
        so does expiry of its completion window. :meth:`unstall_batch` lets it continue.
        """
        after_n = _count("after", after)
        assert after_n is not None
        with self._lock:
            self._stalled[batch_id] = after_n

    def unstall_batch(self, batch_id: str = "*") -> None:
        """Let a batch stalled with :meth:`stall_batch` continue (``"*"`` removes the wildcard entry)."""
        with self._lock:
            self._stalled.pop(batch_id, None)

    def claim_next_stall(self, batch_id: str) -> None:
        """Give a pending ``stall_batch("next", ...)`` to the batch just created (called by the emulator)."""
        with self._lock:
            after = self._stalled.pop(NEXT_BATCH, None)
            if after is not None:
                self._stalled[batch_id] = after

    def stall_limit(self, batch_id: str) -> int | None:
        """How many requests ``batch_id`` may process before it stalls (``None`` = no limit)."""
        with self._lock:
            limits = [
                v
                for v in (self.stall_after, self._stalled.get(batch_id), self._stalled.get("*"))
                if v is not None
            ]
            return min(limits) if limits else None

    def request_fate(self, custom_id: str, execution: int) -> str | None:
        """Decide what happens to execution number ``execution`` (1-based) of the request ``custom_id``.

        :return: :data:`LOST` (the request appears in neither file), :data:`SERVER_ERROR` (HTTP 500) or
            :data:`RATE_LIMITED` (HTTP 429) for a transient failure, or ``None`` (no per-request fault).
            Which custom_ids are hit, and which of 500/429 they get, depends only on the seed and the
            custom_id.
        """
        with self._lock:
            seed = self._seed
            lost_share, lost_repeats = self.lost_share, self.lost_repeats
            transient_share, transient_repeats = self.transient_share, self.transient_repeats
        if lost_share > 0 and execution <= lost_repeats and unit_draw(seed, "lost", custom_id) < lost_share:
            return LOST
        if (
            transient_share > 0
            and execution <= transient_repeats
            and unit_draw(seed, "transient", custom_id) < transient_share
        ):
            return RATE_LIMITED if unit_draw(seed, "transient-kind", custom_id) < 0.5 else SERVER_ERROR
        return None

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
            self._stalled.clear()
            self.fail_share = 0.0
            self.cancel_delay = None
            self.transient_share = 0.0
            self.transient_repeats = 1
            self.lost_share = 0.0
            self.lost_repeats = 1
            self.stall_after = None
            self.rng.seed(self._seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view of every fault (as served by ``GET /_emulator/faults``)."""
        with self._lock:
            return {
                "rules": [r.to_dict() for r in self._rules],
                "stuck": dict(self._stuck),
                "fail_share": self.fail_share,
                "cancel_delay": self.cancel_delay,
                "transient_share": self.transient_share,
                "transient_repeats": self.transient_repeats,
                "lost_share": self.lost_share,
                "lost_repeats": self.lost_repeats,
                "stall_after": self.stall_after,
                "stalled": dict(self._stalled),
            }

    def configure(self, data: dict[str, Any], *, replace: bool = True) -> None:
        """Apply a JSON document or a single rule.

        The document: ``{rules, stuck, fail_share, cancel_delay, transient_share, transient_repeats,
        lost_share, lost_repeats, stall_after, stalled}``, every key optional; ``stalled`` maps a batch id,
        ``"*"`` or ``"next"`` to the request count after which it stalls.

        :param data: either a rule dict (has ``route``) or the full document.
        :param replace: with a full document, drop existing rules, stuck and stalled batches first.
        """
        if "route" in data:
            self.add_rule(rule_from_dict(data))
            return
        unknown = set(data) - _DOCUMENT_KEYS
        if unknown:
            raise ValueError("unknown keys: {}".format(", ".join(sorted(unknown))))
        rules = [rule_from_dict(r) for r in data.get("rules") or []]
        stuck = data.get("stuck") or {}
        for status in stuck.values():
            if str(status).lower() not in STICKABLE_STATUSES:
                raise ValueError(f"cannot stick in {status!r}")
        stalled = {str(k): _count(f"stalled[{k!r}]", v) for k, v in (data.get("stalled") or {}).items()}
        scalars: dict[str, Any] = {}
        for key in ("transient_share", "lost_share"):
            if key in data:
                scalars[key] = _share(key, data[key])
        for key in ("transient_repeats", "lost_repeats"):
            if key in data:
                scalars[key] = _count(key, data[key])
        if "stall_after" in data:
            scalars["stall_after"] = _count("stall_after", data["stall_after"], allow_none=True)
        with self._lock:
            if replace:
                self._rules.clear()
                self._stuck.clear()
                self._stalled.clear()
            for key, value in scalars.items():
                setattr(self, key, value)
            self._stalled.update(stalled)  # type: ignore[arg-type]
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
