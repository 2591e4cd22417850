"""Metrics: what the server did, in Prometheus' terms, in a registry of its own (one per app).

Every counter the server keeps lives here, once: `/metrics` exposes them all, and `/health`'s
`inference` summary is read back from the same registry.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: a scrape shows what the server did, not when each series began

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
MODEL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
WINDOW_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 30.0)  # seconds of audio
MODEL_KINDS = ("partial", "final", "speculative", "upload")
REFUSALS = ("auth", "origin", "busy", "overloaded", "loading", "draining")
ENDINGS = ("client", "idle", "too_long", "slow_reader", "restart", "error", "bad_input")  # bad_input: Wyoming only
# How uploads (the OpenAI-compatible API) ended: answered, or refused with the status it got.
UPLOAD_RESULTS = ("ok", "bad_request", "auth", "too_large", "busy", "unavailable", "client_gone", "error")


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.sessions_open = Gauge("stt_sessions_open", "WebSocket sessions open now", registry=registry)
        self.sessions_ended = Counter(
            "stt_sessions_ended", "Sessions ended, by how: the client left, or the server closed them (why)",
            ["reason"], registry=registry,
        )
        self.refusals = Counter("stt_refusals", "Sockets refused at the door, by reason", ["reason"], registry=registry)
        self.audio_seconds = Counter("stt_audio_seconds", "Seconds of audio received", registry=registry)
        self.partial_latency = Histogram(
            "stt_partial_latency_seconds", "Newest audio a partial covers arrived -> the partial sent",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.final_latency = Histogram(
            "stt_final_latency_seconds", "Stop received -> final sent", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.model_seconds = Histogram(
            "stt_model_seconds", "Model calls by kind: partial batches, finals, speculative finals",
            ["kind"], buckets=MODEL_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "stt_batch_size", "Decodes per model call, counted as it starts", buckets=BATCH_BUCKETS, registry=registry
        )
        self.partial_window = Histogram(
            "stt_partial_window_seconds", "Seconds of audio a partial decode reads: its window, shorter on a loaded machine",
            buckets=WINDOW_BUCKETS, registry=registry,
        )
        self.scoring_rounds = Histogram(
            "stt_scoring_round_requests", "Sessions' requests for VAD and log-mel scored in one round (frontend.py)",
            buckets=BATCH_BUCKETS, registry=registry,
        )
        self.largest_batch = Gauge("stt_largest_batch", "Most decodes in one model call so far", registry=registry)
        self.queue_depth = Gauge("stt_queue_depth", "Decodes waiting for a worker", registry=registry)
        self.stale_dropped = Counter("stt_stale_dropped", "Decodes dropped unrun: their session moved on", registry=registry)
        self.decodes_skipped = Counter(
            "stt_decodes_skipped", "Partials resent unchanged because only silence came", registry=registry
        )
        self.speculative_runs = Counter(
            "stt_speculative_runs", "Finals started during a pause, ahead of the stop", registry=registry
        )
        self.speculative_finals = Counter(
            "stt_speculative_finals", "Finals decoded during a pause that the stop used", registry=registry
        )
        self.partial_batches_helped = Counter(
            "stt_partial_batches_helped",
            "Partial batches the worker kept for finals ran: more speakers streamed than the calibrated capacity",
            registry=registry,
        )
        self.skipped_speech_decodes = Counter(
            "stt_skipped_speech_decodes", "Finals that stopped reading early, and were read on", registry=registry
        )
        self.partials_replaced = Counter(
            "stt_partials_replaced", "Partials never sent: a newer one replaced them while the client was not reading",
            registry=registry,
        )
        self.uploads = Counter(
            "stt_uploads", "Uploads to the OpenAI-compatible API, by how they ended", ["result"], registry=registry
        )
        self.uploads_active = Gauge("stt_uploads_active", "Uploads in the server now, from headers to answer", registry=registry)
        self.upload_audio_seconds = Counter(
            "stt_upload_audio_seconds", "Seconds of uploaded audio transcribed", registry=registry
        )
        registry.register(_ModelThreadsCpu())
        tasks = Gauge("stt_asyncio_tasks", "asyncio tasks alive in the server's event loop", registry=registry)
        tasks.set_function(lambda: len(asyncio.all_tasks()) if _loop_running() else 0)
        for kind in MODEL_KINDS:  # every labelled series exists from the start, at 0
            self.model_seconds.labels(kind)
        for reason in REFUSALS:
            self.refusals.labels(reason)
        for reason in ENDINGS:
            self.sessions_ended.labels(reason)
        for result in UPLOAD_RESULTS:
            self.uploads.labels(result)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def inference(self) -> dict[str, int]:
        """The model-work summary /health gives (its field names are a contract)."""
        value = self.registry.get_sample_value
        return {
            "decodes": int(value("stt_batch_size_sum") or 0),
            "batches": int(value("stt_batch_size_count") or 0),
            "largest_batch": int(value("stt_largest_batch") or 0),
            "stale_dropped": int(value("stt_stale_dropped_total") or 0),
            "decodes_skipped": int(value("stt_decodes_skipped_total") or 0),
            "speculative_runs": int(value("stt_speculative_runs_total") or 0),
            "speculative_finals": int(value("stt_speculative_finals_total") or 0),
            "skipped_speech_decodes": int(value("stt_skipped_speech_decodes_total") or 0),
            "partial_batches_helped": int(value("stt_partial_batches_helped_total") or 0),
        }


class _ModelThreadsCpu:
    """CPU seconds of the process's threads that run no Python: CTranslate2's own (the model runs
    there, the Python thread that called it waits). What the model costs in CPU, apart from the
    server's own work around its calls; the calls' wall time (stt_model_seconds) also counts the
    waits for a busy core. Linux only (/proc); elsewhere the series is absent."""

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily

        tasks = "/proc/self/task"
        if not os.path.isdir(tasks):
            return
        python = {thread.native_id for thread in threading.enumerate()}
        ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
        for tid in os.listdir(tasks):
            if int(tid) in python:
                continue
            try:
                with open(f"{tasks}/{tid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        family = CounterMetricFamily(
            "stt_model_cpu_seconds", "CPU time of the threads the model computes on (no Python runs there)"
        )
        family.add_metric([], total)
        yield family


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
