"""Make sure a stopped task's batch cancel lands: ``python -m airflow_provider_kluster.operators.finish_cancel``.

Started detached by the submit operator's ``on_kill`` as soon as it decides to cancel, because Airflow kills the
task 5 s after SIGTERM. Reads one JSON job from standard input — ``{"settings": {...}, "batch_id", "reason",
"budget", "not_before"}``, the API key inside the settings, never in arguments or environment. Its standard output
and error are its own log file (the task's log names it), never the task's pipes.

It waits until ``not_before`` (epoch seconds: while the task's own inline attempt may still land), then reads the
batch: one already cancelling or ended needs nothing more; otherwise it sends the cancel, retrying transient
failures within the budget. Exit status 0 when kluster confirmed the cancel (or the batch had ended), 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from airflow_provider_kluster.cancelling import cancel_done
from airflow_provider_kluster.exceptions import KlusterAPIError, KlusterNotFoundError
from airflow_provider_kluster.hooks.kluster import ClientSettings, KlusterHook
from airflow_provider_kluster.operators.kluster import CONFIRMED, cancel_until_confirmed


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [kluster cancel, pid {os.getpid()}] %(message)s",
    )
    log = logging.getLogger("airflow_provider_kluster.finish_cancel")
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    batch_id, reason = str(job["batch_id"]), str(job["reason"])
    hook = KlusterHook.from_settings(ClientSettings(**job["settings"]))
    log.info("Making sure the cancel of batch %s lands (%s)", batch_id, reason)
    not_before = job.get("not_before")
    if not_before is not None:
        time.sleep(max(0.0, float(not_before) - time.time()))
        try:
            batch = hook.get_batch(batch_id)
        except KlusterNotFoundError:
            log.warning("Batch %s no longer exists; nothing to cancel", batch_id)
            return 0
        except KlusterAPIError as exc:
            log.info("Could not read batch %s (%s); sending the cancel", batch_id, exc)
        else:
            if cancel_done(batch):
                log.info(
                    "Batch %s is already %s (the task's own cancel landed, or it ended): nothing more to do",
                    batch_id,
                    batch.status_text,
                )
                return 0
    outcome = cancel_until_confirmed(
        hook,
        batch_id,
        reason,
        budget=float(job["budget"]),
        log=log,
        where="detached process",
    )
    return 0 if outcome == CONFIRMED else 1


if __name__ == "__main__":
    sys.exit(main())
