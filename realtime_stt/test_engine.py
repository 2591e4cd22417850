"""The order in which inference workers take jobs."""

from __future__ import annotations

import numpy as np

from realtime_stt.engine import (
    PRIORITY_FINAL,
    PRIORITY_PARTIAL,
    PRIORITY_SPECULATIVE,
    PRIORITY_UPLOAD,
    SPECULATE_MAX_LOAD,
    Job,
    may_speculate,
    next_job,
    upload_pause,
)


def job(priority: int, seq: int) -> Job:
    return Job(priority, seq, np.zeros(0, dtype=np.float32), None, lambda: False, None)


def test_workers_take_finals_then_partials_then_speculation_oldest_first():
    speculative, partial, newer_partial, final = (
        job(PRIORITY_SPECULATIVE, 0), job(PRIORITY_PARTIAL, 2), job(PRIORITY_PARTIAL, 3), job(PRIORITY_FINAL, 4)
    )
    queue = [speculative, newer_partial, final, partial]
    assert next_job(queue, finals_only=False, final_ran=False) is final
    assert next_job([speculative, newer_partial, partial], finals_only=False, final_ran=False) is partial
    assert next_job([speculative], finals_only=False, final_ran=False) is speculative
    assert next_job([], finals_only=False, final_ran=False) is None


def test_after_a_final_a_waiting_partial_goes_before_the_next_final():
    final, partial = job(PRIORITY_FINAL, 1), job(PRIORITY_PARTIAL, 2)
    assert next_job([final, partial], finals_only=False, final_ran=True) is partial
    assert next_job([final], finals_only=False, final_ran=True) is final


def test_the_finals_worker_takes_no_partials():
    partial, speculative, final = job(PRIORITY_PARTIAL, 1), job(PRIORITY_SPECULATIVE, 2), job(PRIORITY_FINAL, 3)
    assert next_job([partial], finals_only=True, final_ran=False) is None
    assert next_job([partial, speculative], finals_only=True, final_ran=False) is speculative
    assert next_job([partial, final], finals_only=True, final_ran=True) is final


def test_upload_windows_come_after_every_live_job_and_only_where_uploads_are_taken():
    upload, speculative, partial = job(PRIORITY_UPLOAD, 0), job(PRIORITY_SPECULATIVE, 1), job(PRIORITY_PARTIAL, 2)
    final = job(PRIORITY_FINAL, 3)
    assert next_job([upload, speculative, partial, final], finals_only=False, final_ran=False) is final
    assert next_job([upload, speculative, partial], finals_only=False, final_ran=False) is partial
    assert next_job([upload, speculative], finals_only=True, final_ran=False) is speculative
    assert next_job([upload], finals_only=True, final_ran=True) is upload
    assert next_job([upload], finals_only=False, final_ran=False, uploads=False) is None
    assert next_job([upload, partial], finals_only=False, final_ran=False, uploads=False) is partial


def test_uploads_keep_to_a_small_share_of_a_worker_while_live_speakers_stream():
    assert upload_pause(0.5, live=False) == 0.0  # nobody streams: back to back
    pause = upload_pause(0.5, live=True)
    assert 0.5 / (0.5 + pause) == 0.1  # one tenth of the worker's time


def test_speculation_goes_to_the_worker_kept_for_finals_whenever_it_is_idle():
    speculative, partial = job(PRIORITY_SPECULATIVE, 1), job(PRIORITY_PARTIAL, 2)
    assert next_job([speculative], finals_only=False, final_ran=False, speculation=False) is None
    assert next_job([speculative, partial], finals_only=False, final_ran=False, speculation=False) is partial
    busy = lambda: 0.9  # one speaker's own partials kept the model this busy on a slow machine
    assert may_speculate(others_streaming=False, workers=2, finals_worker_busy=False, load=busy)
    assert not may_speculate(others_streaming=False, workers=2, finals_worker_busy=True, load=lambda: 0.0)
    assert not may_speculate(others_streaming=True, workers=2, finals_worker_busy=False, load=lambda: 0.0)
    # With one worker a speculation holds up the partials: only while the model is mostly idle.
    assert not may_speculate(others_streaming=False, workers=1, finals_worker_busy=False, load=busy)
    assert may_speculate(others_streaming=False, workers=1, finals_worker_busy=False, load=lambda: SPECULATE_MAX_LOAD)
