"""KlusterHook.upload_file through kluster's uploads API (``/uploads``, in parts), against the emulator over HTTP."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import pytest

from airflow_provider_kluster.exceptions import (
    KlusterBadRequestError,
    KlusterConfigError,
    KlusterTransientAPIError,
)
from airflow_provider_kluster.hooks.kluster import UPLOAD_PART_SIZE, KlusterHook
from tests.conftest import TEST_API_KEY

MB = 1024 * 1024
PARTS = "POST /v1/uploads/{id}/parts"
COMPLETE = "POST /v1/uploads/{id}/complete"


@pytest.fixture
def hook(kluster_conn):
    return KlusterHook(kluster_conn)


@pytest.fixture
def big_file(tmp_path):
    """3.2 MB of random bytes: four parts of 1 MB (the last one short)."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(os.urandom(3 * MB + 200_000))
    return path


def _download(hook, file_id, tmp_path):
    return hook.download_file(file_id, tmp_path / "back" / "content.jsonl").read_bytes()


def test_large_file_goes_up_in_parts_and_comes_back_identical(hook, emulator, big_file, tmp_path):
    emulator.emulator.config.max_part_bytes = MB
    emulator.emulator.config.max_file_bytes = MB  # /files alone could not take this file
    file_id = hook.upload_file(big_file, multipart_threshold=MB, part_size=MB)
    assert _download(hook, file_id, tmp_path) == big_file.read_bytes()
    counters = emulator.emulator.counters
    assert counters["POST /v1/uploads"] == 1
    assert counters[PARTS] == 4
    assert counters[COMPLETE] == 1
    assert "POST /v1/files" not in counters
    info = hook.get_file(file_id)
    assert info["bytes"] == big_file.stat().st_size
    assert info["filename"].endswith("requests.jsonl")


def test_complete_sends_the_md5_of_the_whole_file(hook, emulator, big_file, monkeypatch):
    sent = []
    complete = emulator.emulator.complete_upload

    def spy(upload_id, part_ids, md5=None):
        sent.append(md5)
        return complete(upload_id, part_ids, md5)

    monkeypatch.setattr(emulator.emulator, "complete_upload", spy)
    hook.upload_file(big_file, multipart_threshold=MB, part_size=MB)
    assert sent == [hashlib.md5(big_file.read_bytes()).hexdigest()]


def test_parts_are_streamed_not_held_in_memory(hook, emulator, tmp_path):
    path = tmp_path / "large.jsonl"
    with path.open("wb") as fh:
        for _ in range(16):
            fh.write(os.urandom(MB))
    hook.upload_file(path, multipart_threshold=0, part_size=8 * MB)  # warm the client up first
    tracemalloc.start()
    try:
        hook.upload_file(path, multipart_threshold=0, part_size=8 * MB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # client and emulator together, in this process: far below one 8 MB part
    assert peak < 4 * MB, peak


def test_default_and_small_files_use_files_endpoint(hook, emulator, big_file, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"custom_id": "a"}\n')
    hook.upload_file(big_file)  # no threshold: as before, one /files upload
    hook.upload_file(small, multipart_threshold=MB)  # under the threshold
    counters = emulator.emulator.counters
    assert counters["POST /v1/files"] == 2
    assert "POST /v1/uploads" not in counters


def test_uploaded_name_is_the_given_filename(hook, emulator, big_file):
    file_id = hook.upload_file(
        big_file, filename="kluster-task-abc.jsonl", multipart_threshold=0, part_size=2 * MB
    )
    assert hook.get_file(file_id)["filename"].endswith("kluster-task-abc.jsonl")
    assert emulator.emulator.counters[PARTS] == 2


def test_part_too_large_is_a_bad_request_and_the_upload_is_cancelled(hook, emulator, big_file):
    emulator.emulator.config.max_part_bytes = MB // 2
    with pytest.raises(KlusterBadRequestError) as exc:
        hook.upload_file(big_file, multipart_threshold=MB, part_size=MB)
    message = str(exc.value)
    assert "too large" in message
    assert "HTTP 400" in message
    assert TEST_API_KEY not in message
    assert emulator.emulator.counters["POST /v1/uploads/{id}/cancel"] == 1
    (upload,) = emulator.emulator._uploads.values()
    assert upload.status == "cancelled"
    assert emulator.emulator.list_files() == []


def test_invalid_part_size_is_a_config_error(hook, big_file):
    for size in (0, UPLOAD_PART_SIZE + 1):
        with pytest.raises(KlusterConfigError):
            hook.upload_file(big_file, multipart_threshold=MB, part_size=size)


def test_missing_file_is_a_config_error(hook, tmp_path):
    with pytest.raises(KlusterConfigError, match="no such file"):
        hook.upload_file(tmp_path / "missing.jsonl", multipart_threshold=0)


@pytest.mark.parametrize(
    "fault",
    [{"status": 503}, {"drop_connection": True}, {"status": 503, "after_commit": True}],
    ids=["503", "dropped", "stored-but-answer-lost"],
)
def test_failed_parts_are_sent_again_from_the_file(hook, emulator, big_file, tmp_path, fault):
    rule = emulator.emulator.faults.add(route=PARTS, times=2, **fault)
    file_id = hook.upload_file(big_file, multipart_threshold=MB, part_size=MB)
    assert rule.fired == 2
    assert emulator.emulator.counters[PARTS] == 6
    # each retry re-read its part from the file: the content is whole, and the md5 sent matched
    assert _download(hook, file_id, tmp_path) == big_file.read_bytes()


def test_lost_complete_answer_does_not_make_a_second_file(hook, emulator, big_file, tmp_path):
    rule = emulator.emulator.faults.add(route=COMPLETE, times=1, status=503, after_commit=True)
    file_id = hook.upload_file(big_file, multipart_threshold=MB, part_size=MB)
    assert rule.fired == 1
    counters = emulator.emulator.counters
    assert counters[COMPLETE] == 2  # asked again, for the same upload
    assert counters["POST /v1/uploads"] == 1
    assert counters["uploads_completed"] == 1
    assert [f.id for f in emulator.emulator.list_files()] == [file_id]
    assert _download(hook, file_id, tmp_path) == big_file.read_bytes()


def test_lost_complete_answer_asks_find_created_first(hook, emulator, big_file):
    emulator.emulator.faults.add(route=COMPLETE, times=1, drop_connection=True, after_commit=True)
    asked = []

    def find_created():
        asked.append(True)
        (rec,) = emulator.emulator.list_files()
        return rec.id

    file_id = hook.upload_file(big_file, multipart_threshold=MB, part_size=MB, find_created=find_created)
    assert asked == [True]
    assert emulator.emulator.counters[COMPLETE] == 1  # found: not asked again
    assert [f.id for f in emulator.emulator.list_files()] == [file_id]


def test_complete_failing_every_time_is_transient_and_names_the_upload(hook, emulator, big_file):
    emulator.emulator.faults.add(route=COMPLETE, status=503)
    with pytest.raises(KlusterTransientAPIError) as exc:
        hook.upload_file(big_file, multipart_threshold=MB, part_size=MB)
    assert "complete upload upload_" in str(exc.value)
    assert TEST_API_KEY not in str(exc.value)
    assert emulator.emulator.counters[COMPLETE] == 3  # the connection's max_retries=2, plus the first
    assert emulator.emulator.list_files() == []
