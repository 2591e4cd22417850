"""The engine: one shared model, one queue of decodes, and the inference workers that take from it.

Finals go before partials and partials before speculation, and an uploaded file's windows after
all of them; the partials that are due from all sessions run as one batch; a job its requester no
longer wants is dropped unrun. Decodes run in worker threads (decoder.py), so the event loop keeps
serving every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from realtime_stt.calibration import Plan, calibrate, working_settings
from realtime_stt.capacity import LiveCosts, RecentPartials, capacity, loaded, partial_interval
from realtime_stt.decoder import DecodeOptions, Segment, Transcript, Voided, speech_chunks
from realtime_stt.frontend import Frontend, Heard
from realtime_stt.metrics import Metrics
from realtime_stt.settings import SAMPLE_RATE, Settings

PRIORITY_FINAL = 0
PRIORITY_PARTIAL = 1
PRIORITY_SPECULATIVE = 2  # a final decoded ahead of the stop, with time nobody else wants
# A step of an uploaded file's decode, at most one 30 s window: after every live job, so that a live
# partial or final waits at most one window behind an upload.
PRIORITY_UPLOAD = 3
KINDS = {PRIORITY_FINAL: "final", PRIORITY_PARTIAL: "partial", PRIORITY_SPECULATIVE: "speculative", PRIORITY_UPLOAD: "upload"}
LOAD_WINDOW_SECONDS = 3.0
SPECULATE_MAX_LOAD = 0.6
# A partial batch waits this long at most for the other streaming sessions' windows of the same
# grid point: their VAD and the event loop spread their arrivals over tens of ms on a busy machine,
# and a window that misses the batch costs a second call (a row alone costs about twice its share
# of a batch of four, tiny.en on 2 cores).
BATCH_GATHER_SECONDS = 0.04
LAG_WINDOW_SECONDS = 5.0
# While live speakers stream, uploads get at most this share of a worker's time: on a small machine
# an upload running flat out takes a core the live partials and finals share (docs/design.md).
UPLOAD_SHARE_WHILE_LIVE = 0.1
_NO_AUDIO = np.zeros(0, dtype=np.float32)  # an upload step carries its own work, not audio


@dataclass(order=True)
class Job:
    priority: int
    seq: int
    audio: np.ndarray = field(compare=False)
    options: DecodeOptions = field(compare=False)
    is_stale: Callable[[], bool] = field(compare=False)
    future: asyncio.Future[Transcript | None] = field(compare=False)
    requester: object = field(default=None, compare=False)  # the session that asked
    started: bool = field(default=False, compare=False)  # the worker has taken it; it will run
    submitted: float = field(default=0.0, compare=False)  # loop time it was queued
    work: Callable[[], Any] | None = field(default=None, compare=False)  # an upload's step, in place of a decode
    heard: Heard | None = field(default=None, compare=False)  # a partial's VAD and features, computed as the audio came
    # Asked between a running decode's steps (from its worker thread: reads only): true, it stops there.
    voided: Callable[[], bool] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class FileDecode:
    """An uploaded file on its way through the engine: its language, and the lazy decode whose
    every step (``Engine.next_segment``) is one job."""

    language: str | None
    duration: float
    steps: Iterator[Segment]


class Engine:
    """The shared model and its inference workers, which take finals before partials.

    The partials that are due from all sessions run as one batch. On CPU two workers, each with
    half the threads, run two model calls side by side: Whisper's decoder steps are too small to
    gain from more threads, so two calls at once nearly double the throughput (docs/design.md), and with
    the last worker taking only finals a final need not wait for a partial batch. A job whose
    requester no longer wants it (a partial overtaken by the final, a client that left) is dropped
    when its turn comes, not run.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        """Loads the model and calibrates it (blocking: call it in a worker thread); ModelLoadError
        if the model cannot be loaded. ``settings`` then holds the working values."""
        self.decoder, self.plan = calibrate(settings)
        self.settings = settings = working_settings(settings, self.plan)
        self.live = LiveCosts(self.plan.costs)  # the prior, scaled by the calls run for the speakers
        self.metrics = metrics
        self.device, self.workers = self.decoder.device, self.decoder.workers
        self.languages, self.multilingual = self.decoder.languages, self.decoder.multilingual
        self.can_translate = self.decoder.can_translate
        # Every session's VAD and log-mel frames, in rounds over all of them (frontend.py).
        self.frontend = Frontend(self.decoder.model.feature_extractor.mel_filters, metrics.scoring_rounds)
        metrics.queue_depth.set_function(lambda: len(self._queue))
        self._queue: list[Job] = []  # taken in Job order (finals, partials, speculation; oldest first)
        self._queued = asyncio.Event()
        self._partial_queued = asyncio.Event()  # a gathering partial batch waits on it
        self._partial_rows_running = 0  # windows in partial batches under way
        self._seq = itertools.count()
        self._workers: list[asyncio.Task[None]] = []
        self._busy: deque[tuple[float, float]] = deque()  # recent (start, end) of model calls
        self._running: dict[object, float] = {}  # model calls under way -> when they started
        self._finals_worker_busy = False  # the worker that takes no partials is running a job
        self._recent = RecentPartials(LOAD_WINDOW_SECONDS, LAG_WINDOW_SECONDS)  # who streams, how late
        self._capacity: tuple[object, int] = (None, 0)  # the live costs it was computed from, and it
        self._largest_batch = 0
        self._uploads_resume_at = 0.0  # loop time before which no upload step starts (upload_pause)

    async def start(self) -> None:
        # With two or more workers the last one takes no partials, so that a final need not wait for
        # a partial batch to end, and partials batch as fully as they can on the others.
        self._workers = [
            asyncio.create_task(self._work(finals_only=0 < index == self.workers - 1), name=f"inference-worker-{index}")
            for index in range(self.workers)
        ]
        self._workers.append(asyncio.create_task(self.frontend.run(), name="frontend"))

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def transcribe(
        self,
        audio: np.ndarray,
        options: DecodeOptions,
        *,
        priority: int,
        is_stale: Callable[[], bool] = lambda: False,
        requester: object = None,
        heard: Heard | None = None,
    ) -> Transcript | None:
        """Queue a decode; None when the job went stale before its turn."""
        return await self.submit(audio, options, priority=priority, is_stale=is_stale, requester=requester, heard=heard).future

    def submit(
        self,
        audio: np.ndarray,
        options: DecodeOptions,
        *,
        priority: int,
        is_stale: Callable[[], bool],
        requester: object = None,
        heard: Heard | None = None,
        voided: Callable[[], bool] | None = None,
    ) -> Job:
        """Queue a decode and return at once; its future gives the transcript, or None if it went
        stale before it ran, or ``voided`` said so while it ran (a decode of one window only).
        ``heard``: a partial window's VAD and features as its session computed them."""
        loop = asyncio.get_running_loop()
        job = Job(priority, next(self._seq), audio, options, is_stale, loop.create_future(), requester,
                  submitted=loop.time(), heard=heard, voided=voided)
        if priority == PRIORITY_PARTIAL:
            self._recent.asked(requester, loop.time())
            self._partial_queued.set()
        self._queue.append(job)
        self._queued.set()
        return job

    async def open_file(self, audio: np.ndarray, options: DecodeOptions, *, words: bool, is_stale: Callable[[], bool]) -> FileDecode | None:
        """Start an uploaded file's decode, as offline faster-whisper decodes it; None if it went stale.

        VAD and the features run in a plain thread, as the sessions' VAD does (no model call); the
        language, where it must be detected, is one job at the upload priority."""
        duration = audio.size / SAMPLE_RATE
        language = options.language or (None if self.multilingual else "en")
        chunks = await asyncio.to_thread(speech_chunks, audio)
        if not chunks:
            return FileDecode(language, duration, iter(()))
        if language is None:
            detected = await self._step(lambda: self.decoder.file_language(audio, chunks), is_stale)
            if detected is None:
                return None
            language = detected[0]
        steps = await asyncio.to_thread(self.decoder.file_segments, audio, chunks, replace(options, language=language), words)
        return FileDecode(language, duration, steps)

    async def next_segment(self, decode: FileDecode, is_stale: Callable[[], bool]) -> Segment | None:
        """The file's next segment, as one job at the upload priority; None at its end or once stale."""
        return await self._step(lambda: next(decode.steps, None), is_stale)

    async def _step(self, work: Callable[[], Any], is_stale: Callable[[], bool]) -> Any:
        loop = asyncio.get_running_loop()
        job = Job(PRIORITY_UPLOAD, next(self._seq), _NO_AUDIO, None, is_stale, loop.create_future(),
                  submitted=loop.time(), work=work)
        self._queue.append(job)
        self._queued.set()
        return await job.future

    def has_time_for(self, requester: object) -> bool:
        """Whether a speculative decode for ``requester`` would take time nobody else wants: no
        other session streaming (one whole-utterance decode would hold up every other speaker's
        partials, and under load most such runs go unused), and the worker kept for finals idle, or
        with one worker, the model mostly idle. Judged by the load alone, one speaker's own partials
        kept it above the bound on a busy 2-core machine, and the decode never started (README, "Finals")."""
        return may_speculate(
            others_streaming=self.others_streaming(requester), workers=self.workers,
            finals_worker_busy=self._finals_worker_busy, load=self.load,
        )

    def others_streaming(self, requester: object) -> bool:
        """Whether a session other than ``requester`` asked for a partial in the last LOAD_WINDOW_SECONDS."""
        return any(r is not requester for r in self._streaming())

    def _streaming(self) -> dict[object, float]:
        """The requesters that asked for a partial in the last LOAD_WINDOW_SECONDS (read-only)."""
        return self._recent.streaming(asyncio.get_running_loop().time())

    def load(self) -> float:
        """The share of the workers' last few seconds spent on model calls: speculation only uses spare time."""
        now = asyncio.get_running_loop().time()
        since = self._forget_busy(now)
        busy = sum(end - max(start, since) for start, end in self._busy)
        busy += sum(now - max(start, since) for start in self._running.values())
        return busy / (LOAD_WINDOW_SECONDS * self.workers)

    def partial_lag(self, quantile: float = 0.9) -> float:
        """How late partials are now: a quantile (the 90th percentile unless asked) of the time the
        partials of the last few seconds took from their request to their text (0 with none). The
        median is the sustained lag: a final or a burst that holds up one round moves it little."""
        return self._recent.lag(quantile, asyncio.get_running_loop().time())

    def partial_interval(self, *, speaking: bool, first_words: bool = False) -> float:
        """Seconds between a session's partials now: faster while the speaker speaks and the model
        has time, fastest before an utterance's first words show (capacity.partial_interval)."""
        settings = self.settings
        return partial_interval(
            settings.partial_every_ms,
            settings.fast_partial_every_ms,
            lag=self.partial_lag(),
            speakers=len(self._streaming()),
            capacity=self.capacity(),
            speaking=speaking,
            first_ms=settings.first_partial_every_ms,
            first_words=first_words,
            alone_seconds=self.live.costs().partial(1),
        )

    def loaded(self) -> bool:
        """The machine is more than half full now (capacity.loaded): sessions then keep their
        partial windows short, so that each partial costs less."""
        return loaded(self.settings.partial_every_ms, lag=self.partial_lag(), speakers=len(self._streaming()),
                      capacity=self.capacity())

    def forget(self, requester: object) -> None:
        """A session has ended: its partials no longer tell how late the live ones are (a burst that
        has ended must not keep refusing the next speakers)."""
        self._recent.forget(requester)

    def capacity(self) -> int:
        """Real-time speakers the workers serve within the bounds, by the live costs (capacity.py)."""
        settings, costs = self.settings, self.live.costs()
        if self._capacity[0] is not costs:  # a model call has run since: the costs are new
            self._capacity = (costs, capacity(costs, self.live.finals_share(), workers=self.workers,
                                              max_batch=settings.max_batch, cadence=settings.partial_every_ms / 1000))
        return self._capacity[1]

    def cost_per_speaker(self) -> dict[str, float]:
        """What one real-time speaker costs the workers now, in model seconds per second: a share of
        a round of partials at the current load (at least one speaker's), and its finals."""
        costs, speakers = self.live.costs(), max(1, len(self._streaming()))
        batch = min(speakers, self.settings.max_batch)
        partials = costs.partial(batch) / batch / (self.settings.partial_every_ms / 1000)
        return {"partials": round(partials, 4), "finals": round(self.live.finals_share(), 4)}

    def streaming(self) -> int:
        """Sessions that asked for a partial in the last few seconds."""
        return len(self._streaming())

    def _over_capacity(self) -> bool:
        """More speakers stream now than the partial workers serve in real time."""
        return len(self._streaming()) > self.capacity()

    def _forget_busy(self, now: float) -> float:
        """Drop model calls that ended before the load window; the window's start."""
        since = now - LOAD_WINDOW_SECONDS
        while self._busy and self._busy[0][1] < since:
            self._busy.popleft()
        return since

    async def _work(self, *, finals_only: bool) -> None:
        """One worker: takes the next job (partials in batches) and runs it, until cancelled."""
        final_ran = False
        # Uploads go to a worker that takes no partials, where there is one: a window (a second or
        # more) there holds up no partial batch.
        uploads = finals_only or self.workers == 1
        # So does speculation: a partial that waits for a whole-utterance decode comes late.
        speculation = finals_only or self.workers == 1
        loop = asyncio.get_running_loop()
        while True:
            gated = loop.time() < self._uploads_resume_at
            # Past the calibrated capacity one worker's partial batches queue behind each other, and
            # the worker kept for finals takes partials too: a final then waits for one batch at most.
            # It still takes a waiting final first (final_ran only turns the partial workers to partials).
            helping = finals_only and self._over_capacity()
            first = self._take_next(
                finals_only=finals_only and not helping, final_ran=final_ran and not finals_only, uploads=uploads and not gated,
                speculation=speculation,
            )
            if first is None:
                self._queued.clear()
                # An upload step held back by the gate is taken when the gate opens, or sooner work.
                wait = self._uploads_resume_at - loop.time() if uploads and gated and self._has_upload_steps() else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queued.wait(), wait)
                continue
            batch = self._live([first])
            self._finals_worker_busy |= finals_only and bool(batch)
            try:
                if batch and batch[0].work is not None:
                    await self._run_step(batch[0])
                    continue
                if batch and _batchable(batch[0]):
                    await self._gather(batch[0])
                    batch += self._live(self._take_compatible(batch[0], self.settings.max_batch - 1))
                if batch:
                    final_ran = batch[0].priority == PRIORITY_FINAL
                    if helping and batch[0].priority == PRIORITY_PARTIAL:
                        self.metrics.partial_batches_helped.inc()
                    await self._run(batch)
            finally:
                self._finals_worker_busy &= not finals_only

    async def _gather(self, first: Job) -> None:
        """Wait, BATCH_GATHER_SECONDS at most, until every streaming session not already in a
        batch under way has a window queued to share ``first``'s batch (or the batch is full)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BATCH_GATHER_SECONDS
        key = _batch_key(first.options)
        while loop.time() < deadline:
            expected = min(self.settings.max_batch, len(self._streaming()) - self._partial_rows_running)
            queued = 1 + sum(1 for job in self._queue if _batchable(job) and _batch_key(job.options) == key)
            if queued >= expected:
                return
            self._partial_queued.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._partial_queued.wait(), deadline - loop.time())

    def _take_next(self, *, finals_only: bool, final_ran: bool, uploads: bool, speculation: bool) -> Job | None:
        job = next_job(self._queue, finals_only=finals_only, final_ran=final_ran, uploads=uploads, speculation=speculation)
        if job is not None:
            self._queue.remove(job)
        return job

    async def _run(self, batch: list[Job]) -> None:
        metrics = self.metrics
        metrics.batch_size.observe(len(batch))
        if len(batch) > self._largest_batch:
            self._largest_batch = len(batch)
            metrics.largest_batch.set(len(batch))
        kind = KINDS[batch[0].priority]
        if batch[0].priority == PRIORITY_SPECULATIVE:
            metrics.speculative_runs.inc()
        for job in batch:
            job.started = True
        loop = asyncio.get_running_loop()
        token = object()
        self._running[token] = start = loop.time()
        rows = len(batch) if batch[0].priority == PRIORITY_PARTIAL else 0
        self._partial_rows_running += rows
        try:
            if _batchable(batch[0]):
                results = await asyncio.to_thread(
                    self.decoder.decode_batch, [j.audio for j in batch], [j.options for j in batch], [j.heard for j in batch]
                )
            else:
                results = [await asyncio.to_thread(self.decoder.decode, batch[0].audio, batch[0].options, batch[0].voided, batch[0].heard)]
        except Voided:  # speech came after a speculative final: it stopped before the decoder's steps
            if not batch[0].future.done():
                batch[0].future.set_result(None)
        except Exception as exc:  # handed to the sessions that asked, which report it
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
                if job.priority == PRIORITY_PARTIAL:
                    self._recent.answered(job.requester, loop.time() - job.submitted, loop.time())
            seconds = loop.time() - start
            if batch[0].priority == PRIORITY_PARTIAL:
                self.live.partial_ran(len(batch), seconds)
            else:  # a final, or one decoded ahead of the stop: the same call
                self.live.final_ran(batch[0].audio.size / SAMPLE_RATE, seconds)
        finally:
            self._partial_rows_running -= rows
            del self._running[token]
            self._busy.append((start, loop.time()))
            self._forget_busy(loop.time())
            metrics.model_seconds.labels(kind).observe(loop.time() - start)

    async def _run_step(self, job: Job) -> None:
        """One step of an upload. Its time is left out of ``load``: speculation, which comes before
        uploads, may still take it."""
        assert job.work is not None
        job.started = True
        start = asyncio.get_running_loop().time()
        try:
            result = await asyncio.to_thread(job.work)
        except Exception as exc:  # noqa: BLE001 (handed to the upload that asked, which reports it)
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)
        finally:
            now = asyncio.get_running_loop().time()
            self.metrics.model_seconds.labels(KINDS[PRIORITY_UPLOAD]).observe(now - start)
            live = bool(self._streaming())
            self._uploads_resume_at = now + upload_pause(now - start, live=live)

    def _has_upload_steps(self) -> bool:
        return any(job.priority == PRIORITY_UPLOAD for job in self._queue)

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs still wanted; the others are answered None without running."""
        live = []
        for job in jobs:
            if job.future.done():
                continue
            if job.is_stale() or job.priority == PRIORITY_SPECULATIVE and not self.has_time_for(job.requester):
                self.metrics.stale_dropped.inc()
                job.future.set_result(None)
            else:
                live.append(job)
        return live

    def _take_compatible(self, first: Job, limit: int) -> list[Job]:
        """Queued partials, oldest first, that can share ``first``'s batch."""
        key = _batch_key(first.options)
        taken = sorted(job for job in self._queue if _batchable(job) and _batch_key(job.options) == key)[:limit]
        for job in taken:
            self._queue.remove(job)
        return taken


def next_job(
    queue: Sequence[Job], *, finals_only: bool, final_ran: bool, uploads: bool = True, speculation: bool = True
) -> Job | None:
    """The job a worker takes next: finals, then partials, then speculation, then uploads, oldest first.

    A worker that just ran a final takes a waiting partial before the next final: a burst of finals
    would stall every other speaker's partials, and one batch delays a final little. A finals-only
    worker takes no partials; a worker without ``uploads`` takes no upload steps, and one without
    ``speculation`` no speculative finals.
    """
    jobs = [
        job for job in queue
        if not (finals_only and job.priority == PRIORITY_PARTIAL or not uploads and job.priority == PRIORITY_UPLOAD
                or not speculation and job.priority == PRIORITY_SPECULATIVE)
    ]
    if not jobs:
        return None
    job = min(jobs)
    if job.priority == PRIORITY_FINAL and final_ran:
        job = min((j for j in jobs if j.priority == PRIORITY_PARTIAL), default=job)
    return job


def may_speculate(*, others_streaming: bool, workers: int, finals_worker_busy: bool, load: Callable[[], float]) -> bool:
    """Engine.has_time_for's rule: nobody else streams, and the worker kept for finals (which alone
    takes speculation) is idle; with one worker, which a speculation takes from the partials, the
    model was busy at most SPECULATE_MAX_LOAD of the last few seconds."""
    if others_streaming:
        return False
    return not finals_worker_busy if workers > 1 else load() <= SPECULATE_MAX_LOAD


def upload_pause(step_seconds: float, *, live: bool) -> float:
    """Seconds no upload step may start after one that took ``step_seconds``: none while nobody
    streams, else enough that uploads keep to UPLOAD_SHARE_WHILE_LIVE of the worker's time."""
    return step_seconds * (1 / UPLOAD_SHARE_WHILE_LIVE - 1) if live else 0.0


def _batch_key(options: DecodeOptions) -> tuple[Any, ...]:
    """Partials batch across languages (each row has its own language token, or detects one)."""
    return (options.task, options.beam_size, options.encoder)


def _batchable(job: Job) -> bool:
    """Partials batch; finals (long audio, temperature fallback) run alone."""
    return job.priority == PRIORITY_PARTIAL
