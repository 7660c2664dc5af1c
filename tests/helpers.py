"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import pathlib
import time

from airflow_provider_kluster.batches import KlusterBatch

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO.parent / "shared" / "kluster-api" / "examples"
MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def request_lines(n: int, model: str = MODEL, prefix: str = "request") -> list[dict]:
    """Return ``n`` valid batch input lines."""
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
        }
        for i in range(n)
    ]


def write_jsonl(path: pathlib.Path, lines: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def wait_for(hook, batch_id: str, *, until=lambda b: b.is_terminal, timeout: float = 30.0) -> KlusterBatch:
    """Poll a batch through the hook until ``until`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        batch = hook.get_batch(batch_id)
        if until(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status_text} after {timeout}s")
        time.sleep(0.05)
