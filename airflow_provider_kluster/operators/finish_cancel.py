"""Finish a batch's cancel that a stopped task could not: ``python -m airflow_provider_kluster.operators.finish_cancel``.

Started detached by the submit operator's ``on_kill`` when Airflow is about to kill the task (5 s after SIGTERM) and
kluster has not confirmed the cancel yet. Reads one JSON job from standard input — ``{"settings": {...},
"batch_id", "reason", "budget"}``, the API key inside the settings, never in arguments or environment — and
retries the cancel within the budget, logging to standard error (the task's log while Airflow still reads it).
Exit status 0 when kluster confirmed the cancel (or the batch had ended), 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import sys

from airflow_provider_kluster.hooks.kluster import ClientSettings, KlusterHook
from airflow_provider_kluster.operators.kluster import CONFIRMED, cancel_until_confirmed


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s [kluster cancel] %(message)s"
    )
    log = logging.getLogger("airflow_provider_kluster.finish_cancel")
    job = json.loads(sys.stdin.read())
    hook = KlusterHook.from_settings(ClientSettings(**job["settings"]))
    outcome = cancel_until_confirmed(
        hook,
        str(job["batch_id"]),
        str(job["reason"]),
        budget=float(job["budget"]),
        log=log,
        where="detached process",
    )
    return 0 if outcome == CONFIRMED else 1


if __name__ == "__main__":
    sys.exit(main())
