"""Realtime speech-to-text over WebSocket, on one shared faster-whisper model.

Run: ``uvicorn main:app --host 127.0.0.1 --port 8717``.

A client opens ``/ws``, may send a JSON config, then binary frames of int16 PCM (16 kHz mono), then
``{"type": "stop"}``. While audio arrives the server sends ``partial`` messages; after stop it sends a
``final``. The file reads top to bottom: settings, engine (the model and its one inference queue),
streaming policy (pure: words in, committed/tentative out), then the session and the app.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import math
import os
import re
import secrets
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any, Literal

import ctranslate2
import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens, merge_punctuations
from faster_whisper.vad import SpeechTimestampsMap, VadOptions, get_speech_timestamps, get_vad_model
from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
STATIC_DIR = Path(__file__).resolve().parent / "static"


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


class SettingsError(ValueError):
    """A setting from the environment has a value the server cannot use."""


DEFAULT_ALLOWED_ORIGINS = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class Settings:
    """Everything a user can change, read once from environment variables of the same name."""

    model_id: str = "large-v3-turbo"
    device: str = "auto"
    compute_type: str = "int8_float32"
    partial_every_ms: int = 500
    window_seconds: float = 6.0
    cpu_threads: int = os.cpu_count() or 1
    inference_workers: int | None = None  # None: 2 on a CPU with 2 or more threads, else 1
    max_sessions: int = 16
    max_utterance_seconds: float = 600.0
    final_mode: str = "full"
    trim_encoder_input: bool = True
    max_batch: int = 8
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        defaults = cls()
        origins = env.get("ALLOWED_ORIGINS", "").strip()
        return cls(
            model_id=env.get("MODEL_ID", "").strip() or defaults.model_id,
            device=_choice(env, "DEVICE", defaults.device, ("auto", "cpu", "cuda")),
            compute_type=env.get("COMPUTE_TYPE", "").strip() or defaults.compute_type,
            partial_every_ms=int(_number(env, "PARTIAL_EVERY_MS", defaults.partial_every_ms, 50, 10_000, int)),
            window_seconds=_number(env, "WINDOW_SECONDS", defaults.window_seconds, 1.0, 30.0, float),
            cpu_threads=int(_number(env, "CPU_THREADS", defaults.cpu_threads, 1, 256, int)),
            inference_workers=(
                int(_number(env, "INFERENCE_WORKERS", 1, 1, 64, int)) if env.get("INFERENCE_WORKERS", "").strip() else None
            ),
            max_sessions=int(_number(env, "MAX_SESSIONS", defaults.max_sessions, 1, 10_000, int)),
            max_utterance_seconds=_number(
                env, "MAX_UTTERANCE_SECONDS", defaults.max_utterance_seconds, 1.0, 7200.0, float
            ),
            final_mode=_choice(env, "FINAL_MODE", defaults.final_mode, ("auto", "tail", "full")),
            trim_encoder_input=_choice(env, "TRIM_ENCODER_INPUT", "true", ("true", "false", "1", "0"))
            in ("true", "1"),
            max_batch=int(_number(env, "MAX_BATCH", defaults.max_batch, 1, 64, int)),
            api_key=env.get("API_KEY") or None,
            allowed_origins=(
                tuple(o.strip().rstrip("/").lower() for o in origins.split(",") if o.strip())
                if origins
                else defaults.allowed_origins
            ),
        )


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float, kind: type) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}; use a value from {lo:g} to {hi:g}")
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={raw!r} is out of range; use a value from {lo:g} to {hi:g}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in allowed:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(allowed)}")
    return raw


# ----------------------------------------------------------------------------------------------
# Engine: owns the model and the one inference queue
# ----------------------------------------------------------------------------------------------


class ModelLoadError(RuntimeError):
    """The model named by MODEL_ID could not be loaded."""


@dataclass(frozen=True)
class Word:
    """One recognised word; times are seconds from the start of the utterance."""

    start: float
    end: float
    text: str  # as Whisper spells it, with its leading space where the language uses spaces
    probability: float = 1.0


@dataclass(frozen=True)
class DecodeOptions:
    language: str | None
    task: str = "transcribe"
    beam_size: int = 1
    prompt: str | None = None
    # Partials take greedy output as it is: temperature fallback re-decodes up to six times, and
    # the next partial comes half a second later anyway.
    temperatures: tuple[float, ...] = (0.0,)
    # Bounds a runaway decode (a loop on a second of audio would otherwise run to 448 tokens).
    # Whisper keeps at most 223 prompt tokens, so up to 220 new ones always fit its 448.
    max_new_tokens: int | None = None
    encoder: EncoderSpan | None = None  # None: Whisper's full 30 s
    # A whole-utterance final decodes as plain offline faster-whisper does: each 30 s window
    # conditioned on the text of the one before, and no word alignment. On ../shared/eval's
    # long-form file (tiny.en) dropping either raised the WER from 0.098 to 0.11-0.14; loops stay
    # bounded by the compression-ratio fallback, which resets that context, and repetition_start.
    # Audio that fits one window is decoded without timestamp tokens: they only serve to seek to the
    # next window, and a decode that ended before the audio did seeks there and decodes once more.
    offline: bool = False


@dataclass(frozen=True)
class EncoderSpan:
    """How many mel frames (100 a second) the encoder sees: the audio, then ``margin`` frames of
    Whisper's silence padding, at least ``floor`` frames in all.

    Whisper was trained on 30 s windows. Measured on ../shared/eval's English files (tiny.en, whole
    files): the bare audio alone makes it loop (mean WER 0.15 -> 8.6). Replaying real-time sessions
    over those files, the last partial covered 88.0 % of the final's words with a 10 s floor and 5 s
    margin, 90.0 % with 15 s and 10 s (20 % more replay time), 89.9 % with the full 30 s (over twice
    the time).
    Finals keep the full 30 s: even 15 s and 10 s raised base's pooled final WER from 0.122 to 0.143.
    """

    floor: int
    margin: int


PARTIAL_ENCODER = EncoderSpan(floor=1500, margin=1000)
# A batch of three or more partials encodes 10 s and 5 s: a batch of 8 five-second windows took
# 828 instead of 1171 ms (tiny.en, 2 cores), for the 2 points of coverage measured above.
BUSY_PARTIAL_ENCODER = EncoderSpan(floor=1000, margin=500)
_encoder_span: contextvars.ContextVar[EncoderSpan | None] = contextvars.ContextVar("encoder_span", default=None)
# Features already encoded by this thread's decode, and their encoder output: given back, not recomputed.
_encoded: contextvars.ContextVar[tuple[np.ndarray, Any] | None] = contextvars.ContextVar("encoded", default=None)


class TrimmedWhisperModel(WhisperModel):
    """faster-whisper that encodes only the frames that matter instead of a padded 30 s.

    ``transcribe`` pads each segment's features with exact zeros up to 3000 frames; real log-mel
    frames are never all zero, so the padding can be found and mostly cut off. The span comes from a
    context variable set by the decode that runs in this thread, not from state on the shared model.
    """

    def encode(self, features: np.ndarray) -> Any:
        done = _encoded.get()
        if done is not None and done[0].shape == features.shape and np.array_equal(done[0], features):
            return done[1]
        span = _encoder_span.get()
        if span is not None:
            frames = features if features.ndim == 2 else features[0]
            content = np.flatnonzero(np.any(frames != 0, axis=0))
            used = (int(content[-1]) + 1 if content.size else 0) + span.margin
            used = min(frames.shape[-1], max(span.floor, used + used % 2))
            features = features[..., :used]
        return super().encode(features)


def token_budget(seconds: float) -> int:
    """Generous room for speech (about 3 words, 5 tokens, a second) that still stops a loop early."""
    return min(220, 24 + int(12 * seconds))


@dataclass(frozen=True)
class Transcript:
    words: tuple[Word, ...]
    language: str | None
    aligned: bool = True  # False: each word carries its segment's times (a final longer than 30 s)
    # Where the language was detected on this audio: how sure Whisper was, and how much speech it heard.
    language_probability: float = 1.0
    speech_seconds: float = 0.0

    @property
    def text(self) -> str:
        return join_words(self.words)


PRIORITY_FINAL = 0
PRIORITY_PARTIAL = 1
PRIORITY_SPECULATIVE = 2  # a final decoded ahead of the stop, with time nobody else wants
LOAD_WINDOW_SECONDS = 3.0
SPECULATE_MAX_LOAD = 0.6
BATCH_GATHER_SECONDS = 0.01


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


class Engine:
    """The shared model and its inference workers, which take finals before partials.

    The partials that are due from all sessions run as one batch. On CPU two workers, each with
    half the threads, run two model calls side by side: Whisper's decoder steps are too small to
    spread over threads (a batch of 8 partials' generate took 133 ms on one thread, 228 ms on
    two; tiny.en, 2 cores), so two batches of 8 took 592 ms side by side against 1115 ms one after
    the other on two threads, and a final need not wait for a partial batch. A job whose
    requester no longer wants it (a partial overtaken by the final, a client that left) is dropped
    when its turn comes, not run.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model, self.device, self.workers = _load_model(settings)
        self.languages: tuple[str, ...] = tuple(self.model.supported_languages)
        self.multilingual: bool = bool(self.model.model.is_multilingual)
        # large-v3-turbo was fine-tuned on transcription only: its translations are not English.
        self.can_translate = self.multilingual and "turbo" not in settings.model_id.lower()
        self.stats = {
            "decodes": 0,
            "batches": 0,
            "largest_batch": 0,
            "stale_dropped": 0,
            "decodes_skipped": 0,  # partials resent unchanged because only silence came since
            "speculative_runs": 0,  # finals decoded during a pause, ahead of the stop
            "speculative_finals": 0,  # ... of which the stop used
            "skipped_speech_decodes": 0,  # finals that stopped reading early, and were read on
        }
        self._queue: list[Job] = []  # taken in Job order (finals, partials, speculation; oldest first)
        self._queued = asyncio.Event()
        self._seq = itertools.count()
        self._workers: list[asyncio.Task[None]] = []
        self._busy: deque[tuple[float, float]] = deque()  # recent (start, end) of model calls
        self._running: dict[object, float] = {}  # model calls under way -> when they started
        self._partial_asked: dict[object, float] = {}  # requester -> when it last asked for a partial

    def warm_up(self) -> None:
        """Run one real decode so the first user does not pay for lazy initialisation."""
        noise = np.random.default_rng(0).normal(0.0, 0.01, SAMPLE_RATE).astype(np.float32)
        self._decode(noise, DecodeOptions(language="en"), vad=False)

    async def start(self) -> None:
        # With two or more workers the last one takes no partials, so that a final need not wait for
        # a partial batch to end, and partials batch as fully as they can on the others.
        self._workers = [
            asyncio.create_task(self._work(finals_only=0 < index == self.workers - 1), name=f"inference-worker-{index}")
            for index in range(self.workers)
        ]

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
    ) -> Transcript | None:
        """Queue a decode; None when the job went stale before its turn."""
        return await self.submit(audio, options, priority=priority, is_stale=is_stale, requester=requester).future

    def submit(
        self,
        audio: np.ndarray,
        options: DecodeOptions,
        *,
        priority: int,
        is_stale: Callable[[], bool],
        requester: object = None,
    ) -> Job:
        """Queue a decode and return at once; its future gives the transcript, or None if it went stale."""
        loop = asyncio.get_running_loop()
        job = Job(priority, next(self._seq), audio, options, is_stale, loop.create_future(), requester)
        if priority == PRIORITY_PARTIAL:
            self._streaming(since=loop.time() - LOAD_WINDOW_SECONDS)
            self._partial_asked[requester] = loop.time()
        self._queue.append(job)
        self._queued.set()
        return job

    def has_time_for(self, requester: object) -> bool:
        """Whether a speculative decode for ``requester`` would take time nobody else wants: the
        model mostly idle, and no other session streaming (one whole-utterance decode would hold up
        every other speaker's partials; at 8 streams 12 of 15 such runs went unused)."""
        streaming = self._streaming(since=asyncio.get_running_loop().time() - LOAD_WINDOW_SECONDS)
        return not streaming - {requester} and self.load() <= SPECULATE_MAX_LOAD

    def _streaming(self, *, since: float) -> set[object]:
        """The requesters that asked for a partial since then; the others are forgotten."""
        for requester, asked in list(self._partial_asked.items()):
            if asked < since:
                del self._partial_asked[requester]
        return set(self._partial_asked)

    def load(self) -> float:
        """The share of the workers' last few seconds spent on model calls: speculation only uses spare time."""
        now = asyncio.get_running_loop().time()
        since = now - LOAD_WINDOW_SECONDS
        while self._busy and self._busy[0][1] < since:
            self._busy.popleft()
        busy = sum(end - max(start, since) for start, end in self._busy)
        busy += sum(now - max(start, since) for start in self._running.values())
        return busy / (LOAD_WINDOW_SECONDS * self.workers)

    async def _work(self, *, finals_only: bool) -> None:
        """One worker: takes the next job (partials in batches) and runs it, until cancelled."""
        final_ran = False
        while True:
            first = self._take_next(finals_only=finals_only, final_ran=final_ran)
            if first is None:
                self._queued.clear()
                await self._queued.wait()
                continue
            batch = self._live([first])
            if batch and _batchable(batch[0]):
                # The sessions that shared the last batch come back within a few ms of each other.
                await asyncio.sleep(BATCH_GATHER_SECONDS)
                batch += self._live(self._take_compatible(batch[0], self.settings.max_batch - 1))
            if batch:
                final_ran = batch[0].priority == PRIORITY_FINAL
                await self._run(batch)

    def _take_next(self, *, finals_only: bool, final_ran: bool) -> Job | None:
        job = next_job(self._queue, finals_only=finals_only, final_ran=final_ran)
        if job is not None:
            self._queue.remove(job)
        return job

    async def _run(self, batch: list[Job]) -> None:
        self.stats["decodes"] += len(batch)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        for job in batch:
            job.started = True
            self.stats["speculative_runs"] += job.priority == PRIORITY_SPECULATIVE
        loop = asyncio.get_running_loop()
        token = object()
        self._running[token] = start = loop.time()
        try:
            if _batchable(batch[0]):
                results = await asyncio.to_thread(self._decode_batch, [j.audio for j in batch], [j.options for j in batch])
            else:
                results = [await asyncio.to_thread(self._decode, batch[0].audio, batch[0].options)]
        except Exception as exc:  # handed to the sessions that asked, which report it
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            del self._running[token]
            self._busy.append((start, loop.time()))

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs still wanted; the others are answered None without running."""
        live = []
        for job in jobs:
            if job.future.done():
                continue
            if job.is_stale() or job.priority == PRIORITY_SPECULATIVE and not self.has_time_for(job.requester):
                self.stats["stale_dropped"] += 1
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

    def _decode(self, audio: np.ndarray, options: DecodeOptions, *, vad: bool = True) -> Transcript:
        _encoder_span.set(options.encoder if self.settings.trim_encoder_input else None)
        if options.offline and audio.size <= WINDOW_SAMPLES:
            return self._decode_window(audio, options)
        segments, info = self.model.transcribe(
            audio,
            language=options.language,
            task=options.task,
            beam_size=options.beam_size,
            initial_prompt=options.prompt or None,
            temperature=list(options.temperatures),
            max_new_tokens=options.max_new_tokens,
            word_timestamps=not options.offline,
            vad_filter=vad,
            # Conditioning on the decoder's own output is what makes Whisper loop on streams; the
            # committed text goes in as a prompt instead.
            condition_on_previous_text=options.offline,
        )
        segments = list(segments)
        if options.offline:
            # Without alignment a word carries its segment's times: enough for the text and loop check.
            words = tuple(
                Word(float(s.start), float(s.end), token)
                for s in segments
                for token in re.findall(r"\s*\S+", s.text)
            )
            return Transcript(words, info.language, aligned=False, language_probability=info.language_probability)
        words = tuple(
            Word(float(w.start), float(w.end), w.word, float(w.probability)) for s in segments for w in (s.words or ())
        )
        return Transcript(words, info.language, language_probability=info.language_probability)

    def _decode_window(self, audio: np.ndarray, options: DecodeOptions) -> Transcript:
        """An utterance that fits one 30 s window, decoded as offline faster-whisper would, without
        timestamp tokens, then aligned word by word.

        Timestamp tokens only serve to seek to the next window: a decode that ended before the audio
        did seeks there and runs again. The alignment, one decoder pass over the text, gives each word
        its time, so the session can tell where the decode stopped reading. The encoder runs once:
        language detection and the alignment use its output, and transcribe is handed it back.
        """
        model = self.model
        chunks = get_speech_timestamps(audio, VAD_OPTIONS)
        if not chunks:
            return Transcript((), options.language, language_probability=0.0)
        speech = np.concatenate([audio[c["start"] : c["end"]] for c in chunks])
        features = model.feature_extractor(speech)
        frames = min(N_FRAMES, features.shape[-1] - 1)  # what transcribe's one segment holds
        segment = pad_or_trim(features[:, :frames])
        encoded = WhisperModel.encode(model, segment)
        language, probability = options.language or (None if self.multilingual else "en"), 1.0
        if language is None:
            [found] = model.model.detect_language(encoded)
            language, probability = found[0][0][2:-2], float(found[0][1])
        token = _encoded.set((segment, encoded))
        try:
            segments, _ = model.transcribe(
                speech,
                language=language,
                task=options.task,
                beam_size=options.beam_size,
                initial_prompt=options.prompt or None,
                temperature=list(options.temperatures),
                max_new_tokens=options.max_new_tokens,
                without_timestamps=True,
                vad_filter=False,
            )
            segments = list(segments)
        finally:
            _encoded.reset(token)
        tokenizer = self._tokenizer(options.task, language)
        tokens = [t for s in segments for t in s.tokens if t < tokenizer.eot]
        [alignment] = model.find_alignment(tokenizer, [tokens], encoded, frames) if tokens else [[]]
        words = _aligned_words(SpeechTimestampsMap(chunks, SAMPLE_RATE), alignment)
        return Transcript(words, language, language_probability=probability, speech_seconds=speech.size / SAMPLE_RATE)

    def _decode_batch(self, audios: Sequence[np.ndarray], each: Sequence[DecodeOptions]) -> list[Transcript]:
        """Decode several sessions' windows (at most 30 s each) in one batch.

        What ``transcribe`` does for one window, done for all at once: VAD, log-mel features padded
        to one width, one encode, language detection for the windows that name none, one greedy
        generate (without timestamp tokens: word alignment gives the times), one word alignment per
        language. The decoder dominates a partial's cost, and a batch of 8 costs it about 3 times one
        (tiny.en, 2 cores).
        """
        options = each[0]  # task, beam size and encoder span are the same for all
        text_tokenizer = self._tokenizer(options.task, options.language or "en")  # encoding is language-free
        results = [Transcript((), item.language, language_probability=0.0) for item in each]
        busy = len(audios) > 2  # a batch this big means load: cadence comes first
        rows = []
        for index, (audio, item) in enumerate(zip(audios, each)):
            chunks = get_speech_timestamps(audio, VAD_OPTIONS)
            if chunks:  # else silence: nothing to decode
                previous = text_tokenizer.encode(" " + item.prompt.strip()) if item.prompt else []
                rows.append((index, audio, item, chunks, previous))
        # CTranslate2 wants the start-of-transcript token at one position in the whole batch, so
        # prompts are cut to a few lengths (the latest tokens kept) and batched per length. A busy
        # batch cuts them all to its shortest, for one generate.
        common = min((len(previous) for *_, previous in rows), default=0) if busy else MAX_TOKENS
        groups: dict[int, list[_Voiced]] = {}
        for index, audio, item, chunks, previous in rows:
            keep = max(n for n in PROMPT_BUCKETS if n <= min(len(previous), common))
            voiced = _Voiced(
                index,
                np.concatenate([audio[c["start"] : c["end"]] for c in chunks]),
                SpeechTimestampsMap(chunks, SAMPLE_RATE),
                previous[len(previous) - keep :],
                item.max_new_tokens or MAX_TOKENS // 2,
                item.language,
            )
            groups.setdefault(keep, []).append(voiced)
        span = BUSY_PARTIAL_ENCODER if busy and options.encoder is not None else options.encoder
        for group in groups.values():
            for voiced, transcript in zip(group, self._decode_group(group, options, span)):
                results[voiced.index] = transcript
        return results

    def _tokenizer(self, task: str, language: str) -> Tokenizer:
        return Tokenizer(self.model.hf_tokenizer, self.multilingual, task=task, language=language)

    def _decode_group(self, group: Sequence[_Voiced], options: DecodeOptions, span: EncoderSpan | None) -> list[Transcript]:
        model = self.model
        features = [model.feature_extractor(v.audio)[:, :-1] for v in group]
        frames = [f.shape[-1] for f in features]
        width = N_FRAMES
        if self.settings.trim_encoder_input and span is not None:
            width = min(N_FRAMES, max(span.floor, max(frames) + span.margin))
            width += width % 2
        batch = np.stack([np.pad(f[:, :width], ((0, 0), (0, width - min(f.shape[-1], width)))) for f in features])
        if self.device == "cpu" and len(batch) > 2:
            # Two windows at a time: on CPU one encode of 8 took 1.5 times as long as four of 2.
            # The array stays referenced here because the StorageView only borrows its memory.
            pairs = np.concatenate([np.asarray(WhisperModel.encode(model, batch[i : i + 2])) for i in range(0, len(batch), 2)])
            encoded = ctranslate2.StorageView.from_array(pairs)
        else:
            encoded = WhisperModel.encode(model, batch)
        languages = [(v.language or (None if self.multilingual else "en"), 1.0) for v in group]
        if any(language is None for language, _ in languages):
            # One decoder step on the encoder output already computed: detection costs next to nothing.
            detected = model.model.detect_language(encoded)
            languages = [
                given if given[0] is not None else (found[0][0][2:-2], float(found[0][1]))
                for given, found in zip(languages, detected)
            ]
        tokenizers = [self._tokenizer(options.task, language) for language, _ in languages]
        prompts = [model.get_prompt(t, v.previous, without_timestamps=True) for t, v in zip(tokenizers, group)]
        tokenizer = tokenizers[0]  # special tokens and suppression are the same in every language
        generated = model.model.generate(
            encoded,
            prompts,
            beam_size=options.beam_size,
            max_length=min(MAX_TOKENS, len(prompts[0]) + max(v.budget for v in group)),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
        )
        texts = []
        for result, voiced in zip(generated, group):
            tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot][: voiced.budget]
            average_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            # Whisper's own silence test: likely no speech, and not confident in what it wrote.
            silent = result.no_speech_prob > NO_SPEECH_THRESHOLD and average_logprob < LOGPROB_THRESHOLD
            texts.append([] if silent else tokens)
        # Alignment starts from one language's tokens for the whole batch: once per language present,
        # every row aligned (the encoder output is one batch), the other rows given a placeholder.
        alignments: list[list[dict]] = [[] for _ in group]
        for language in dict.fromkeys(language for language, _ in languages):
            rows = [i for i, (row_language, _) in enumerate(languages) if row_language == language and texts[i]]
            if not rows:
                continue
            aligned = model.find_alignment(
                tokenizers[rows[0]],
                [texts[i] if i in rows else [tokenizer.eot - 1] for i in range(len(group))],
                encoded,
                frames,
            )
            for i in rows:
                alignments[i] = aligned[i]
        return [
            Transcript(
                _aligned_words(voiced.time_map, alignment),
                language,
                language_probability=probability,
                speech_seconds=voiced.audio.size / SAMPLE_RATE if tokens else 0.0,
            )
            for voiced, tokens, alignment, (language, probability) in zip(group, texts, alignments, languages)
        ]


def _aligned_words(time_map: SpeechTimestampsMap, alignment: list[dict]) -> tuple[Word, ...]:
    """Aligned words, their times mapped from the speech alone back to the audio it was cut from."""
    merge_punctuations(alignment, PREPEND_PUNCTUATION, APPEND_PUNCTUATION)
    words = []
    for word in alignment:
        if not word["word"]:
            continue
        chunk = time_map.get_chunk_index((word["start"] + word["end"]) / 2)
        words.append(
            Word(
                time_map.get_original_time(float(word["start"]), chunk),
                time_map.get_original_time(float(word["end"]), chunk),
                word["word"],
                float(word["probability"]),
            )
        )
    return tuple(words)


@dataclass(frozen=True)
class _Voiced:
    """One window of a batch after VAD: its speech alone, and the map back to the window's times."""

    index: int
    audio: np.ndarray
    time_map: SpeechTimestampsMap
    previous: list[int]  # prompt tokens
    budget: int
    language: str | None  # None: detect it on this window


N_FRAMES = 3000  # Whisper's 30 s window in mel frames
WINDOW_SAMPLES = N_FRAMES * SAMPLE_RATE // 100
MAX_TOKENS = 448  # Whisper's decoder length
NO_SPEECH_THRESHOLD = 0.6  # faster-whisper's defaults
LOGPROB_THRESHOLD = -1.0
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
VAD_OPTIONS = VadOptions()
VAD_FRAME = 512  # samples Silero scores at a time
VAD_CONTEXT = 64  # samples of the frame before that Silero sees with each frame


@dataclass(frozen=True)
class VadState:
    """Silero's recurrent state and the tail of the last frame it scored, carried between calls."""

    h: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), dtype=np.float32))
    c: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(VAD_CONTEXT, dtype=np.float32))


def speech_probabilities(audio: np.ndarray, state: VadState) -> tuple[np.ndarray, VadState]:
    """Silero's speech probability for each 512-sample frame of ``audio`` (whole frames; a worker-thread
    call), continuing from ``state``: frame by frame the same as faster-whisper's pass over the whole
    audio, whose scores depend on every frame before (measured: up to 0.84 apart without the state)."""
    frames = audio.reshape(-1, VAD_FRAME)
    contexts = np.concatenate([state.context[None], frames[:-1, -VAD_CONTEXT:]])
    batch = np.concatenate([contexts, frames], axis=1)
    output, h, c = get_vad_model().session.run(None, {"input": batch, "h": state.h, "c": state.c})
    return np.asarray(output, dtype=np.float32).reshape(-1), VadState(h, c, frames[-1, -VAD_CONTEXT:].copy())


PROMPT_BUCKETS = (0, 8, 16, 32, 48)


def next_job(queue: Sequence[Job], *, finals_only: bool, final_ran: bool) -> Job | None:
    """The job a worker takes next: finals, then partials, then speculation, oldest first.

    A worker that just ran a final takes a waiting partial before the next final: a burst of finals
    would stall every other speaker's partials, and one batch delays a final little. A finals-only
    worker takes no partials.
    """
    jobs = [job for job in queue if not (finals_only and job.priority == PRIORITY_PARTIAL)]
    if not jobs:
        return None
    job = min(jobs)
    if job.priority == PRIORITY_FINAL and final_ran:
        job = min((j for j in jobs if j.priority == PRIORITY_PARTIAL), default=job)
    return job


def _batch_key(options: DecodeOptions) -> tuple[Any, ...]:
    """Partials batch across languages (each row has its own language token, or detects one)."""
    return (options.task, options.beam_size, options.encoder)


def _batchable(job: Job) -> bool:
    """Partials batch; finals (long audio, temperature fallback) run alone."""
    return job.priority == PRIORITY_PARTIAL


def _load_model(settings: Settings) -> tuple[Any, str, int]:
    """The model, the device it runs on, and how many calls it runs at once."""
    model_id = settings.model_id
    hint = (
        "Set MODEL_ID to a local CTranslate2 Whisper directory (one holding model.bin, config.json and "
        "tokenizer.json), e.g. MODEL_ID=/models/faster-whisper-large-v3-turbo, or give this machine access "
        "to the Hugging Face hub."
    )
    looks_like_path = model_id.startswith((".", "/", "~")) or os.sep in model_id and not _is_hub_id(model_id)
    if looks_like_path and not Path(model_id).expanduser().is_dir():
        raise ModelLoadError(f"MODEL_ID={model_id!r}: no such directory. {hint}")
    device = settings.device
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    workers = settings.inference_workers or (2 if device == "cpu" and settings.cpu_threads >= 2 else 1)
    try:
        model = TrimmedWhisperModel(
            str(Path(model_id).expanduser()) if looks_like_path else model_id,
            device=device,
            compute_type=settings.compute_type,
            cpu_threads=max(1, settings.cpu_threads // workers),
            num_workers=workers,
        )
    except Exception as exc:
        raise ModelLoadError(f"MODEL_ID={model_id!r} could not be loaded ({type(exc).__name__}: {exc}). {hint}")
    return model, device, workers


def _is_hub_id(model_id: str) -> bool:
    """'Systran/faster-whisper-small' names a hub repository, not a relative path."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) is not None and not Path(model_id).exists()


# ----------------------------------------------------------------------------------------------
# Streaming policy (pure: words in, committed/tentative out)
# ----------------------------------------------------------------------------------------------


def join_words(words: Sequence[Word]) -> str:
    return "".join(w.text for w in words).strip()


def _norm(text: str) -> str:
    """Compare words without case or punctuation: 'me,' agrees with 'Me'."""
    return re.sub(r"[^\w']+", "", text.lower())


def repetition_start(words: Sequence[Word], max_ngram: int = 8, max_repeats: int = 3) -> int | None:
    """Where a decoding loop starts (after the loop's first round), else None.

    Whisper's classic failure on streams is a loop ('the the the the ...') that runs to the end of
    its output; such a tail must never be committed. A repetition followed by other words is
    speech ('words words words words, and that is all') and stays.
    """
    keys = [_norm(w.text) for w in words]
    best = None
    for n in range(1, max_ngram + 1):
        start = len(keys) - n  # walk back while the words repeat with period n
        while start > 0 and keys[start - 1] == keys[start - 1 + n]:
            start -= 1
        if len(keys) - start >= n * (max_repeats + 1) and (best is None or start + n < best):
            best = start + n  # keep the first round, drop the repeats
    return best


def repeated_head(before: Sequence[Word], after: Sequence[Word], most: int = 5) -> int:
    """How many of ``after``'s first words read ``before``'s last ones again (up to ``most``)."""
    tail = [_norm(w.text) for w in before[-most:]]
    head = [_norm(w.text) for w in after[:most]]
    return next((n for n in range(min(len(tail), len(head)), 0, -1) if tail[-n:] == head[:n]), 0)


def without_rereading(before: Sequence[Word], added: Sequence[Word], least: int = 2) -> list[Word]:
    """``added`` less the stretches (``least`` words or more) that read ``before``'s words again from
    the same audio: their times overlap. A stretch said twice lies in the audio twice, at two times,
    and stays."""
    matcher = SequenceMatcher(None, [_norm(w.text) for w in before], [_norm(w.text) for w in added], autojunk=False)
    dropped: set[int] = set()
    for block in matcher.get_matching_blocks():
        if block.size < least:
            continue
        old, new = before[block.a : block.a + block.size], added[block.b : block.b + block.size]
        if min(old[-1].end, new[-1].end) > max(old[0].start, new[0].start):
            dropped.update(range(block.b, block.b + block.size))
    return [word for index, word in enumerate(added) if index not in dropped]


@dataclass
class LanguageGuess:
    """An utterance's language, guessed from the partial decodes' detections until it is settled.

    Whisper's detection on a second of speech is often wrong, and sometimes sure of it; with more
    speech it is right, and sure when right (``python -m bench.language``; figures in README). It is
    settled by the first detection on at least SURE_SPEECH seconds of speech with SURE_PROBABILITY,
    or else, once MOST_SPEECH seconds were heard or the window is full, on the language with the
    most evidence (probability times speech, summed over the detections). Until then partials
    commit and show nothing, so no word of a wrong guess is left on screen.
    """

    SURE_SPEECH = 1.5
    SURE_PROBABILITY = 0.7
    MOST_SPEECH = 3.0

    language: str | None = None
    settled: bool = False
    evidence: dict[str, float] = field(default_factory=dict)

    def observe(self, language: str | None, probability: float, speech: float, *, window_full: bool) -> None:
        """Take one detection: ``language`` with ``probability`` on ``speech`` seconds of speech."""
        if self.settled:
            return
        if language is not None and speech > 0:
            self.evidence[language] = self.evidence.get(language, 0.0) + probability * speech
            if speech >= self.SURE_SPEECH and probability >= self.SURE_PROBABILITY:
                self.language, self.settled = language, True
                return
        if self.evidence and (window_full or speech >= self.MOST_SPEECH):
            self.language, self.settled = max(self.evidence, key=self.evidence.__getitem__), True


class LocalAgreement:
    """LocalAgreement-2 (Macháček et al. 2023) over a sliding decode window.

    Each ``update`` takes the words of a decode of the window (times in seconds from the utterance
    start) and commits the prefix that the previous hypothesis agrees with. Committed words never
    change; the rest of the latest hypothesis is tentative. The window keeps some committed audio
    before the uncommitted part, because Whisper misreads a word cut in half; it slides forward,
    preferably to a sentence end, once it spans more than ``window_seconds``.
    """

    SENTENCE_END = (".", "?", "!", "。", "？", "！")
    # Whisper's stock hallucinations on a window that ends in silence ('Okay.', 'Thank you.') can
    # repeat across two decodes; they come with low probability, so an agreed tail of such words
    # waits for more audio. A doubtful word followed by agreed, confident ones is committed.
    MIN_COMMIT_PROBABILITY = 0.5

    def __init__(self, window_seconds: float) -> None:
        self.window_seconds = window_seconds
        self.window_start = 0.0
        self.committed: list[Word] = []
        self.tentative: list[Word] = []

    @property
    def committed_end(self) -> float:
        return self.committed[-1].end if self.committed else 0.0

    def fresh(self, words: Sequence[Word]) -> list[Word]:
        """The part of a hypothesis that comes after the committed words.

        The window starts on committed audio, so a hypothesis opens by reading committed words
        again; they are told apart by time, and by text where times mislead. Word times come from
        aligning the text to the audio: a decode that skipped the committed speech crams its new
        words into that speech's time (tiny.en on ../shared/eval: 'The narrative would' squeezed
        into the sentence before it, a few words over a dozen committed ones), and dropping them by
        time alone would lose them for good.
        A head that repeats the committed tail (1 to 5 words) is dropped; a repetition loop is cut off.
        """
        split = next((i for i, w in enumerate(words) if w.start >= self.committed_end - 0.1), len(words))
        head, new = list(words[:split]), list(words[split:])
        if head:
            since = max(self.window_start, head[0].start)
            reread = [_norm(w.text) for w in self.committed if w.end > since]
            matcher = SequenceMatcher(None, reread, [_norm(w.text) for w in head], autojunk=False)
            last = [block for block in matcher.get_matching_blocks() if block.size][-1:]
            if len(head) < len(reread) / 2 and matcher.ratio() < 0.5:
                new = [*head, *new]  # too few words, and others, to be a reading of the committed ones
            elif last and last[0].a + last[0].size == len(reread):
                new = [*head[last[0].b + last[0].size :], *new]  # read up to the committed end
        if new and self.committed and new[0].start < self.committed_end + 1.0:
            new = new[repeated_head(self.committed, new) :]
        cut = repetition_start(new)
        return new if cut is None else new[:cut]

    def update(self, words: Sequence[Word], audio_end: float, *, commit: bool = True) -> list[Word]:
        """Take the hypothesis for the window ending at ``audio_end``; return the newly committed words.

        With ``commit`` false it only becomes the hypothesis the next one is compared with: nothing
        is committed and the window stays where it is.
        """
        hypothesis = self.fresh(words)
        if not commit:
            self.tentative = hypothesis
            return []
        agreed = 0
        for old, new in zip(self.tentative, hypothesis):
            if _norm(old.text) != _norm(new.text):
                break
            agreed += 1
        while agreed and hypothesis[agreed - 1].probability < self.MIN_COMMIT_PROBABILITY:
            agreed -= 1
        newly = hypothesis[:agreed]
        self.committed.extend(newly)
        self.tentative = hypothesis[agreed:]
        if audio_end - self.window_start > self.window_seconds:
            newly += self._slide(audio_end)
        return newly

    def _slide(self, audio_end: float) -> list[Word]:
        forced: list[Word] = []
        if audio_end - self.committed_end > self.window_seconds / 2:
            # Two decodes have not agreed for half a window: commit the older tentative words rather
            # than let the window (and every decode) grow without bound.
            limit = audio_end - self.window_seconds / 2
            count = next((i for i, w in enumerate(self.tentative) if w.end > limit), len(self.tentative))
            forced, self.tentative = self.tentative[:count], self.tentative[count:]
            self.committed.extend(forced)
        inside = [i for i, w in enumerate(self.committed) if w.end > self.window_start]
        if not inside:
            self.window_start = max(self.window_start, audio_end - self.window_seconds / 2)
            return forced
        cut = inside[-1]
        for i in reversed(inside):
            if self.committed[i].text.rstrip().endswith(self.SENTENCE_END):
                if audio_end - self.committed[i].end <= self.window_seconds:
                    cut = i
                break
        # Cut where the kept word ends rather than midway to the next one: aligned word starts are
        # often late, and a window that clips the next word's onset made tiny.en skip the whole
        # sentence after it (../shared/eval replays: 2 of 25 sessions of one file lost words that
        # way when cutting midway, none when cutting at the end; coverage 86.2 % -> 86.7 % overall).
        self.window_start = max(self.window_start, self.committed[cut].end)
        return forced

    # Shown tentative words stop before the first doubtful or cut-off one, and the newest word is
    # held back. Replaying real-time sessions over ../shared/eval's English files (tiny.en): 0.5 % of
    # partial updates rewrite a shown word (4.0 % counting the newest) and the last partial covers
    # 90.0 % of the final; showing every tentative word: 14.5 % (45.8 %) for 92.5 %.
    SHOW_MIN_PROBABILITY = 0.7

    def shown_tentative(self) -> list[Word]:
        """The tentative words worth showing: likely to survive the next decode."""
        shown = []
        for word in self.tentative[:-1]:
            if word.probability < self.SHOW_MIN_PROBABILITY or word.text.rstrip().endswith(("-", "...", "…")):
                break
            shown.append(word)
        return shown

    def prompt(self, max_chars: int = 200) -> str | None:
        """Committed text before the window: context for the decoder, never decoded again."""
        before = [w for w in self.committed if w.end <= self.window_start]
        return join_words(before)[-max_chars:] or None

    def final(self, words: Sequence[Word]) -> list[Word]:
        """The utterance's words: the committed ones, then what a last decode of the window adds."""
        return [*self.committed, *self.fresh(words)]


# ----------------------------------------------------------------------------------------------
# Session and app
# ----------------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed the socket or the transport broke."""


class SessionClosed(Exception):
    """The server closed the socket on a policy breach (already told the client why)."""


class ConfigMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["config"] = "config"
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    beam_size: int = Field(default=1, ge=1, le=10)


class StopMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["stop"]


class AudioBuffer:
    """Utterance audio as a list of int16 chunks, trimmed from the front, concatenated on demand."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.start = 0  # sample index (from the utterance start) of the first sample kept
        self.end = 0  # samples received so far

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)
            self.end += samples.size

    def since(self, sample: int) -> np.ndarray:
        """float32 audio from ``sample`` (clamped to what is kept) to the end."""
        skip, first = max(0, sample - self.start), 0
        while first < len(self._chunks) and skip >= self._chunks[first].size:
            skip -= self._chunks[first].size
            first += 1
        if first == len(self._chunks):
            return np.zeros(0, dtype=np.float32)
        audio = np.concatenate(self._chunks[first:])[skip:]
        return audio.astype(np.float32) / 32768.0

    def trim(self, sample: int) -> None:
        """Drop whole chunks that end before ``sample``."""
        while self._chunks and self.start + self._chunks[0].size <= sample:
            self.start += self._chunks.pop(0).size


class SpeechActivity:
    """Where in an utterance the speaker was talking, scored 32 ms at a time as the audio arrives.

    A frame counts as speech from Silero's lower threshold up: faster-whisper's VAD keeps a speech
    chunk going until the score falls below it, and whispered words score little more. Only the last
    speech frame matters to the session.
    """

    def __init__(self, threshold: float = VAD_OPTIONS.neg_threshold or VAD_OPTIONS.threshold - 0.15) -> None:
        self.threshold = threshold
        self.frames = 0  # frames scored
        self.last_speech = -1  # index of the last frame scored as speech, -1 before any
        self.vad_state = VadState()

    @property
    def scored_until(self) -> int:
        return self.frames * VAD_FRAME

    def add(self, probabilities: np.ndarray) -> None:
        loud = np.flatnonzero(probabilities >= self.threshold)
        if loud.size:
            self.last_speech = self.frames + int(loud[-1])
        self.frames += probabilities.size

    def heard(self) -> bool:
        return self.last_speech >= 0

    def silent_since(self, sample: int) -> bool:
        """No frame scored as speech ends after ``sample``."""
        return (self.last_speech + 1) * VAD_FRAME <= sample

    def trailing_silence(self) -> float:
        """Seconds since the speech stopped, as far as it is scored."""
        return (self.frames - 1 - self.last_speech) * VAD_FRAME / SAMPLE_RATE


@dataclass(frozen=True)
class Speculation:
    """A whole-utterance final decoded during a pause, for a stop that comes before more speech."""

    end: int  # samples it decoded; it stands while nothing after them is speech
    job: Job


@dataclass
class Utterance:
    policy: LocalAgreement
    audio: AudioBuffer = field(default_factory=AudioBuffer)
    speech: SpeechActivity = field(default_factory=SpeechActivity)
    decoded_until: int = 0  # samples covered by the last partial decode
    settled: bool = False  # the last partial decode came after the speaker had stopped
    speculation: Speculation | None = None
    language: LanguageGuess = field(default_factory=LanguageGuess)

    @property
    def seconds(self) -> float:
        return self.audio.end / SAMPLE_RATE

    @property
    def window_start(self) -> int:
        return int(self.policy.window_start * SAMPLE_RATE)


class Session:
    """One WebSocket: a receiver, a partial-maker and a speech watcher under one TaskGroup, so
    nothing outlives it."""

    MIN_PARTIAL_SECONDS = 0.3
    # A pause this long, with the model mostly idle, starts the final's decode before the stop: a
    # push-to-talk user lets go a few hundred ms after the last word, and if nothing more is said
    # the final is ready, or under way, when the stop comes.
    SPECULATE_AFTER_SILENCE = 0.2
    # The final decodes the whole utterance again (FINAL_MODE=full) as the offline decode does: on
    # ../shared/eval the committed words plus the tail lost words LocalAgreement had dropped early
    # (an opening 'And', 13-14 errors on each long-form file). FINAL_MODE=auto does so up to one
    # Whisper window and keeps the tail beyond, bounding the final's cost; tail always does. No
    # silence is padded after the last sample: 0.3-0.5 s of it raised the pooled final WER on both
    # tiny.en (0.094 -> 0.098) and base (0.122 -> 0.130), cutting short 'how to talk like this'.
    FULL_FINAL_SECONDS = 30.0
    # Greedy Whisper sometimes ends a window's decode early and seeks past the speech after it:
    # tiny.en on an AMD EPYC read "... not worth thinking about." and skipped the 11 s that
    # followed in a 41.9 s utterance (offline faster-whisper with beam 1 does the same). Speech
    # heard this long after the final's last word is decoded once more and added; Whisper's segment
    # ends can be a second early, and a shorter gap would decode the last words twice.
    SKIPPED_SPEECH_SECONDS = 3.0
    # Without timestamps, greedy Whisper ends its output at a pause of half a second or more. Such a
    # final's words are aligned to the audio; where the partials committed words ending more than
    # this after its last one, and the VAD heard speech this long after it, that audio is decoded
    # again, so what follows a pause is not lost. Tentative words are not enough evidence: a tail
    # decode after them can add words of its own.
    SKIPPED_SPEECH_HEARD_SECONDS = 1.0

    def __init__(self, ws: WebSocket, engine: Engine, settings: Settings) -> None:
        self.ws = ws
        self.engine = engine
        self.settings = settings
        self.config = ConfigMessage(language=None if engine.multilingual else "en")
        self.utterance = self._new_utterance()
        self._odd_byte = b""
        self._finalizing = False
        self._closed = False
        self._audio_arrived = asyncio.Event()
        self._audio_to_score = asyncio.Event()
        self._scoring = asyncio.Lock()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive())
                tasks.create_task(self._make_partials())
                tasks.create_task(self._watch_speech())
        except* (ClientGone, SessionClosed):
            pass
        finally:
            self._closed = True

    # -- transport ---------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self.ws.send_text(json.dumps(message, ensure_ascii=False))
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise ClientGone from exc

    async def _error(self, message: str) -> None:
        await self._send({"type": "error", "message": message})

    async def _close(self, code: int, reason: str) -> None:
        logger.info("closing session: %s (%d)", reason, code)
        try:
            await self.ws.close(code=code, reason=reason)
        except (RuntimeError, OSError):
            pass  # the client went first; nothing left to tell it
        raise SessionClosed(reason)

    # -- receiving ---------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (RuntimeError, OSError) as exc:
                raise ClientGone from exc
            if message["type"] == "websocket.disconnect":
                raise ClientGone
            if message.get("bytes") is not None:
                await self._on_audio(message["bytes"])
            elif message.get("text") is not None:
                await self._on_text(message["text"])

    async def _on_audio(self, data: bytes) -> None:
        data = self._odd_byte + data
        # A frame may end in the middle of a sample: keep the odd byte for the next frame.
        usable = len(data) - len(data) % 2
        self._odd_byte = data[usable:]
        samples = np.frombuffer(data[:usable], dtype="<i2")
        limit = self.settings.max_utterance_seconds
        if (self.utterance.audio.end + samples.size) / SAMPLE_RATE > limit:
            await self._close(1009, f"utterance longer than MAX_UTTERANCE_SECONDS={limit:g} s; send stop sooner")
        self.utterance.audio.append(samples)
        self._audio_arrived.set()
        self._audio_to_score.set()

    async def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            await self._error(f"invalid JSON: {exc.msg} at position {exc.pos}")
            return
        if not isinstance(message, dict):
            await self._error("a control message must be a JSON object")
            return
        kind = message.get("type", "config")
        try:
            if kind == "config":
                await self._configure(ConfigMessage.model_validate(message))
            elif kind == "stop":
                StopMessage.model_validate(message)
                await self._finalize()
            else:
                await self._error(f"unknown message type {kind!r}; expected 'config' or 'stop'")
        except ValidationError as exc:
            await self._error(_describe(exc))

    async def _configure(self, config: ConfigMessage) -> None:
        if self.utterance.audio.end:
            await self._error("config must come before the audio of an utterance; it was ignored")
            return
        changes = {name: getattr(config, name) for name in config.model_fields_set}
        language = changes.get("language")
        if language is not None:
            language = language.strip().lower()
            changes["language"] = None if language in ("", "auto") else language
            if changes["language"] is not None and changes["language"] not in self.engine.languages:
                known = ", ".join(self.engine.languages)
                await self._error(f"unsupported language {language!r}; this model knows: {known}, or auto")
                return
        if changes.get("task") == "translate" and not self.engine.can_translate:
            await self._error(
                f"model {self.settings.model_id!r} cannot translate: "
                + ("it is English-only" if not self.engine.multilingual else "it was not trained for translation")
                + "; use task 'transcribe' or a model such as large-v3"
            )
            return
        if "language" in changes and changes["language"] is None and not self.engine.multilingual:
            changes["language"] = "en"
        self.config = self.config.model_copy(update=changes)
        self.utterance = self._new_utterance()  # no audio yet: it starts under the new config

    # -- decoding ----------------------------------------------------------------------------

    def _new_utterance(self) -> Utterance:
        language = self.config.language
        return Utterance(LocalAgreement(self.settings.window_seconds), language=LanguageGuess(language, language is not None))

    def _window_options(self, utterance: Utterance, seconds: float, *, final: bool) -> DecodeOptions:
        return DecodeOptions(
            language=utterance.language.language if utterance.language.settled else None,
            task=self.config.task,
            beam_size=self.config.beam_size,
            prompt=utterance.policy.prompt(),
            temperatures=(0.0, 0.2, 0.4, 0.6) if final else (0.0,),
            max_new_tokens=token_budget(seconds),
            encoder=None if final else PARTIAL_ENCODER,
        )

    async def _make_partials(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.partial_every_ms / 1000
        earliest = 0.0
        while True:
            # Cadence, not polling: this waits only while new audio is pending.
            await self._audio_arrived.wait()
            # Every session ticks on one clock grid, so the partials that are due meet in the
            # engine's queue at the same moment and run as one batch. Under load a decode outlasts
            # the interval: the next one starts as soon as it returns, with the sessions that shared
            # its batch, so cadence stretches to the batch's time instead of work queueing. (Waiting
            # for the next grid point instead made it a whole interval longer.)
            now = loop.time()
            tick = max(earliest, math.ceil(now / interval) * interval) if now <= earliest else now
            await asyncio.sleep(max(0.0, tick - loop.time()))
            self._audio_arrived.clear()
            # The next grid point, also after a late start: a session that kept the phase of its
            # late start would meet the others' batches no more (at 8 streams 102 of 136 partial
            # decodes ran alone that way).
            earliest = (math.floor(tick / interval + 1e-9) + 1) * interval
            await self._partial()

    async def _partial(self) -> None:
        utterance = self.utterance
        audio_end = utterance.audio.end
        window_start = utterance.window_start
        if self._finalizing or audio_end <= utterance.decoded_until:
            return
        if (audio_end - window_start) / SAMPLE_RATE < self.MIN_PARTIAL_SECONDS:
            return
        await self._score_speech(utterance)
        quiet = utterance.speech.silent_since(utterance.decoded_until)
        if quiet and utterance.settled:
            # Nothing said since a decode that already came after the speaker stopped: the text
            # cannot change, so the partial is sent again without a decode.
            utterance.decoded_until = audio_end
            self.engine.stats["decodes_skipped"] += 1
            await self._send_partial(utterance)
            return
        audio = utterance.audio.since(window_start)[: audio_end - window_start]
        transcript = await self.engine.transcribe(
            audio,
            self._window_options(utterance, audio.size / SAMPLE_RATE, final=False),
            priority=PRIORITY_PARTIAL,
            is_stale=lambda: self._closed or self._finalizing or self.utterance is not utterance,
            requester=self,
        )
        if transcript is None or self._finalizing or self.utterance is not utterance:
            return  # overtaken by the final: a partial after it would be stale
        utterance.decoded_until = audio_end
        utterance.settled = quiet
        guess = utterance.language
        window_full = (audio_end - window_start) / SAMPLE_RATE >= self.settings.window_seconds
        guess.observe(transcript.language, transcript.language_probability, transcript.speech_seconds, window_full=window_full)
        policy = utterance.policy
        # Words are committed only in the settled language, so a guess that is then revised leaves
        # nothing behind; a hypothesis under the guess that is then settled on can agree at once.
        settled = guess.settled and transcript.language == guess.language
        policy.update(_shift(transcript.words, window_start / SAMPLE_RATE), audio_end / SAMPLE_RATE, commit=settled or not transcript.words)
        if not self._final_decodes_whole(utterance):
            utterance.audio.trim(utterance.window_start)
        await self._send_partial(utterance)

    async def _send_partial(self, utterance: Utterance) -> None:
        """The policy's text as it stands; it changes only with a decode, so a skipped one resends it.
        Before the language is settled nothing is shown: the words may be of a wrong guess."""
        policy = utterance.policy
        shown = policy.shown_tentative() if utterance.language.settled else []
        committed, tentative = join_words(policy.committed), join_words(shown)
        await self._send(
            {
                "type": "partial",
                "text": " ".join(t for t in (committed, tentative) if t),
                "committed": committed,
                "tentative": tentative,
                "language": utterance.language.language if utterance.language.settled else None,
            }
        )

    # -- speech activity and the speculative final -------------------------------------------

    async def _watch_speech(self) -> None:
        while True:
            await self._audio_to_score.wait()
            self._audio_to_score.clear()
            utterance = self.utterance
            await self._score_speech(utterance)
            self._maybe_speculate(utterance)

    async def _score_speech(self, utterance: Utterance) -> None:
        """Score the audio that arrived since the last call (in a worker thread; a few ms a second)."""
        async with self._scoring:
            speech, audio = utterance.speech, utterance.audio
            if speech.scored_until < audio.start:
                # Trimmed before it was scored (only a session whose final keeps the tail trims):
                # count it as speech, the safe side, and score on from where the audio is kept.
                speech.add(np.ones(-(-audio.start // VAD_FRAME) - speech.frames, dtype=np.float32))
                speech.vad_state = VadState()
            frames = audio.end // VAD_FRAME
            if frames <= speech.frames:
                return
            samples = audio.since(speech.scored_until)[: (frames - speech.frames) * VAD_FRAME]
            probabilities, speech.vad_state = await asyncio.to_thread(speech_probabilities, samples, speech.vad_state)
            speech.add(probabilities)

    def _maybe_speculate(self, utterance: Utterance) -> None:
        speech = utterance.speech
        if (
            self._finalizing
            or utterance is not self.utterance
            or not self._final_decodes_whole(utterance)
            or utterance.seconds > self.FULL_FINAL_SECONDS
            or not speech.heard()
            or speech.trailing_silence() < self.SPECULATE_AFTER_SILENCE
        ):
            return
        earlier = utterance.speculation
        if earlier is not None and speech.silent_since(earlier.end):
            return  # this pause already has one
        if not self.engine.has_time_for(self):
            return
        end = speech.scored_until
        job = self.engine.submit(
            utterance.audio.since(0)[:end],
            self._final_options(),
            priority=PRIORITY_SPECULATIVE,
            requester=self,
            # Not yet taken when the stop comes (self._finalizing), the final decodes afresh instead.
            is_stale=lambda: (
                self._closed or self._finalizing or self.utterance is not utterance or not speech.silent_since(end)
            ),
        )
        utterance.speculation = Speculation(end, job)

    async def _speculated(self, utterance: Utterance) -> Transcript | None:
        """The speculative final, if it is running or done and nothing was said after it."""
        speculation = utterance.speculation
        if speculation is None or not speculation.job.started:
            return None
        await self._score_speech(utterance)
        # Less than a frame (32 ms) may be left unscored at the end: too short to hold a word.
        if not utterance.speech.silent_since(speculation.end):
            return None
        transcript = await speculation.job.future
        if transcript is not None:
            self.engine.stats["speculative_finals"] += 1
        return transcript

    async def _finalize(self) -> None:
        """Decode what the user said and send the final; the socket is then ready for the next utterance."""
        self._finalizing = True
        utterance = self.utterance
        try:
            text, language = await self._final_text(utterance)
            await self._send(
                {
                    "type": "final",
                    "text": text,
                    "language": language,
                    "duration_s": round(utterance.seconds, 3),
                }
            )
        finally:
            self.utterance = self._new_utterance()
            self._odd_byte = b""
            self._finalizing = False

    def _final_options(self) -> DecodeOptions:
        return DecodeOptions(
            self.config.language,
            self.config.task,
            self.config.beam_size,
            temperatures=(0.0, 0.2, 0.4, 0.6),
            offline=True,
        )

    def _final_decodes_whole(self, utterance: Utterance) -> bool:
        mode = self.settings.final_mode
        return mode == "full" or (mode == "auto" and utterance.seconds <= self.FULL_FINAL_SECONDS)

    async def _final_text(self, utterance: Utterance) -> tuple[str, str | None]:
        if utterance.audio.end == 0:
            return "", self.config.language
        if self._final_decodes_whole(utterance):
            transcript = await self._speculated(utterance)
            if transcript is None:
                transcript = await self.engine.transcribe(
                    utterance.audio.since(0), self._final_options(), priority=PRIORITY_FINAL
                )
            assert transcript is not None  # finals are never stale
            words = [*transcript.words, *await self._skipped_speech(utterance, transcript)]
            loop = repetition_start(words)
            return join_words(words if loop is None else words[:loop]), transcript.language
        # Tail: the committed words stand; only the window after them is decoded again.
        window_start = utterance.window_start
        audio = utterance.audio.since(window_start)
        transcript = await self.engine.transcribe(
            audio, self._window_options(utterance, audio.size / SAMPLE_RATE, final=True), priority=PRIORITY_FINAL
        )
        assert transcript is not None
        words = utterance.policy.final(_shift(transcript.words, window_start / SAMPLE_RATE))
        return join_words(words), transcript.language

    async def _skipped_speech(self, utterance: Utterance, transcript: Transcript) -> list[Word]:
        """The words of speech that the final's decode skipped after its last word, if any."""
        words = transcript.words
        if not words:
            return []  # the same audio would decode the same way
        end, gap = words[-1].end, self.SKIPPED_SPEECH_SECONDS
        committed = utterance.policy.committed
        if transcript.aligned and committed and committed[-1].end - end > self.SKIPPED_SPEECH_HEARD_SECONDS:
            gap = self.SKIPPED_SPEECH_HEARD_SECONDS
        await self._score_speech(utterance)
        if utterance.speech.silent_since(int((end + gap) * SAMPLE_RATE)):
            return []
        self.engine.stats["skipped_speech_decodes"] += 1
        options = replace(self._final_options(), language=transcript.language, prompt=join_words(words)[-200:])
        tail = await self.engine.transcribe(utterance.audio.since(int(end * SAMPLE_RATE)), options, priority=PRIORITY_FINAL)
        assert tail is not None
        added = _shift(tail.words, end)
        return without_rereading(words, added[repeated_head(words, added) :])


def _shift(words: Sequence[Word], seconds: float) -> list[Word]:
    """Window-relative word times to utterance times."""
    return [replace(w, start=w.start + seconds, end=w.end + seconds) for w in words]


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "message"
        problems.append(f"{where}: {error['msg']}")
    return "invalid message: " + "; ".join(problems)


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Browsers always send Origin; a page from another site must not reach the model (CSWSH).

    Clients that send no Origin (Handy, scripts) are not browsers and pass. A page served by this
    server itself (Origin host equals Host) passes. Entries naming only a host ('localhost') allow
    it on any port and scheme; '*' allows every origin.
    """
    if origin is None or "*" in allowed:
        return True
    parts = urllib.parse.urlsplit(origin.lower())
    if host is not None and parts.netloc == host.lower():
        return True
    netloc_host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    return f"{parts.scheme}://{parts.netloc}" in allowed or netloc_host in allowed


def _denied(ws: WebSocket, settings: Settings) -> str | None:
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), settings.allowed_origins):
        return f"origin {ws.headers.get('origin')!r} is not allowed; add it to ALLOWED_ORIGINS"
    if settings.api_key is not None:
        header = ws.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ws.query_params.get("token", "")
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            return "missing or wrong API key: send 'Authorization: Bearer <key>' or ?token=<key>"
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; without ``settings`` they come from the environment, checked right here."""
    if settings is None:
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            raise SystemExit(f"error: {exc}") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
        logger.info("loading model %s (device=%s, compute_type=%s)", settings.model_id, settings.device,
                    settings.compute_type)
        try:
            engine = await asyncio.to_thread(Engine, settings)
        except ModelLoadError as exc:
            logger.error("%s", exc)
            raise
        await asyncio.to_thread(engine.warm_up)
        await engine.start()
        app.state.engine = engine
        logger.info("model ready on %s; languages: %d", engine.device, len(engine.languages))
        try:
            yield
        finally:
            app.state.engine = None
            await engine.close()

    app = FastAPI(title="Realtime speech-to-text", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.sessions = 0

    @app.get("/health")
    async def health() -> JSONResponse:
        engine: Engine | None = app.state.engine
        if engine is None:
            return JSONResponse({"status": "loading", "model": settings.model_id}, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "model": settings.model_id,
                "device": engine.device,
                "compute_type": settings.compute_type,
                "languages": list(engine.languages),
                "can_translate": engine.can_translate,
                "sessions": app.state.sessions,
                "max_sessions": settings.max_sessions,
                "inference_workers": engine.workers,
                "partial_every_ms": settings.partial_every_ms,
                "inference": engine.stats,
            }
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    @app.websocket("/ws")
    async def transcribe(ws: WebSocket) -> None:
        # Accept first so that every refusal reaches the client as a close code with a reason.
        await ws.accept()
        if (reason := _denied(ws, settings)) is not None:
            await ws.close(code=1008, reason=reason)
            return
        engine: Engine | None = app.state.engine
        if engine is None:
            await ws.close(code=1013, reason="model is still loading; try again shortly")
            return
        if app.state.sessions >= settings.max_sessions:
            await ws.close(code=1013, reason=f"server busy: MAX_SESSIONS={settings.max_sessions} reached; try again later")
            return
        app.state.sessions += 1
        try:
            await Session(ws, engine, settings).run()
        except Exception:
            logger.exception("session failed")
            try:
                await ws.close(code=1011, reason="internal server error")
            except (RuntimeError, OSError):
                pass
        finally:
            app.state.sessions -= 1

    return app


app = create_app()
