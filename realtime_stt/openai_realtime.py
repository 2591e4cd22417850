"""OpenAI's Realtime API for transcription, ``GET /v1/realtime?intent=transcription`` over WebSocket:
a thin adapter over the utterance pipeline, so that clients written for OpenAI (the ``openai`` SDK,
the Agents SDK, LiveKit, Pipecat) use the server as they are.

The client configures the session (GA ``session.update`` or beta ``transcription_session.update``),
appends base64 audio (PCM16 at 24 kHz, G.711 at 8 kHz; resampled to 16 kHz) and ends turns with
``input_audio_buffer.commit``, or lets server VAD end them where the speech stops. Each turn is one
item: ``speech_started`` and ``speech_stopped`` (server VAD), ``committed`` and ``conversation.item
.created``, transcription ``delta`` events while the speaker talks, carrying only words the pipeline
has committed (so the deltas are never revised), then ``completed`` with the final. The intent is
taken as transcription whatever it says; a conversation's ``session.update`` gets an ``error``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import WebSocket
from pydantic import ValidationError

from realtime_stt.engine import Engine
from realtime_stt.openai_realtime_events import (
    Append,
    AudioDecoder,
    BetaUpdate,
    Commit,
    EventError,
    GaUpdate,
    SessionConfig,
    TurnDetector,
    beta_session,
    check_session_type,
    error_event,
    ga_session,
    new_id,
    updated,
)
from realtime_stt.pipeline import Final, OptionsError, Partial, language_choice
from realtime_stt.protocol import BadMessage, SocketSession, describe, json_object, short
from realtime_stt.settings import SAMPLE_RATE, Settings
from realtime_stt.vad import VAD_FRAME

logger = logging.getLogger(__name__)

PER_MS = SAMPLE_RATE // 1000
MIN_COMMIT = 100 * PER_MS  # OpenAI commits no buffer shorter than 100 ms
# A client that sends faster than real time waits for the VAD's scores once this much audio is
# unscored, so that a turn server VAD ends holds little audio past the stop.
MOST_UNSCORED = 250 * PER_MS
# Server VAD: an utterance with no speech in it this long is dropped (all but the prefix padding),
# so that a client that streams silence neither fills MAX_UTTERANCE_SECONDS nor is decoded.
MOST_QUIET = 10 * SAMPLE_RATE
EVENTS = "session.update, transcription_session.update, input_audio_buffer.append, .commit and .clear"


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": new_id("event"), **fields}


class RealtimeSession(SocketSession):
    """One Realtime transcription session: the pipeline's utterance is the client's input buffer."""

    TOO_LONG_ADVICE = "commit sooner, or let server VAD end the turns"

    def __init__(self, ws: WebSocket, engine: Engine, settings: Settings, draining: asyncio.Event) -> None:
        super().__init__(ws, engine, settings, draining)
        self.engine = engine
        # Beta clients say so in a header; they get the beta events' names and shapes from the start.
        self.beta = "realtime=v1" in ws.headers.get("openai-beta", "").replace(" ", "")
        self.session_id = new_id("sess")
        self.config = SessionConfig(model=ws.query_params.get("model") or Path(settings.model_id).name)
        self.audio = AudioDecoder(self.config.format)
        self.detector: TurnDetector | None = TurnDetector(self.config.vad) if self.config.vad else None
        self.pipeline.on_speech = self._scored
        # Where the pipeline's utterance stands in the session's audio, in 16 kHz samples.
        self._received = 0  # all audio the client appended
        self._utterance_start = 0
        self._fed = 0  # samples of this utterance fed to the pipeline
        self._scored_frames = 0
        self._scoring = asyncio.Event()
        # Once a turn has ended (server VAD heard the stop, or a commit came), the next turn's audio
        # waits here in order until the ended turn's final is out: the pipeline's buffer is the ended
        # turn's until then. New audio queues behind it while it drains into the next utterance.
        self._held: list[np.ndarray] | None = None
        self._hold_from = 0
        self._turn_ended = False
        self._recent = np.zeros(0, dtype=np.int16)  # the prefix padding kept when quiet is dropped
        self._generation = 0  # counts utterances: a VAD event of one already ended is stale
        self._speech: deque[tuple[str, int, int]] = deque()  # (what, ms, generation) from the VAD
        self._speech_changed = asyncio.Event()
        self._item: str | None = None
        self._previous_item: str | None = None
        self._item_open = False  # server VAD: deltas wait for speech_started
        self._committed = ""  # the pipeline's committed words of this utterance
        self._sent = ""  # of those, what deltas carried
        self._arrived = time.monotonic()
        self._pending_language: tuple[str | None] | None = None  # for the next utterance

    async def run(self) -> str:
        await self._queue(self._session_event("created", self.beta))
        return await super().run()

    def _work(self) -> list[Coroutine[Any, Any, None]]:
        return [*super()._work(), self._follow_speech()]

    def _session_event(self, what: str, beta: bool) -> dict[str, Any]:
        if beta:
            return _event(f"transcription_session.{what}", session=beta_session(self.config, self.session_id))
        return _event(f"session.{what}", session=ga_session(self.config, self.session_id))

    async def _reject(self, message: str, code: str, param: str | None = None, client_event_id: str | None = None) -> None:
        await self._queue(error_event(message, code, param, client_event_id))

    # -- client events ------------------------------------------------------------------------

    async def _on_audio(self, data: bytes) -> None:
        await self._reject("binary frames are not part of the Realtime API: send audio as base64 in "
                           "input_audio_buffer.append", "invalid_event")

    async def _on_text(self, text: str) -> None:
        try:
            message = json_object(text, "a client event")
        except BadMessage as exc:
            await self._reject(str(exc), "invalid_json")
            return
        kind, event_id = message.get("type"), message.get("event_id")
        event_id = event_id if isinstance(event_id, str) else None
        handlers = {"session.update": self._update, "transcription_session.update": self._update,
                    "input_audio_buffer.append": self._append, "input_audio_buffer.commit": self._commit_asked,
                    "input_audio_buffer.clear": self._clear}
        try:
            handler = handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise EventError(f"unknown or unsupported event type {short(kind)}; a transcription session takes "
                                 f"{EVENTS}", "invalid_event_type", "type")
            await handler(message)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            await self._reject(describe(exc), "invalid_value", ".".join(map(str, loc)) or None, event_id)
        except EventError as exc:
            await self._reject(str(exc), exc.code, exc.param, event_id)

    async def _update(self, message: dict[str, Any]) -> None:
        beta = message["type"] == "transcription_session.update"
        if not beta:
            check_session_type(message)
        update = (BetaUpdate if beta else GaUpdate).model_validate(message)
        config = updated(self.config, update)
        if config.language != self.config.language:
            try:
                language_choice(self.engine, config.language)
            except OptionsError as exc:
                where = "session.input_audio_transcription" if beta else "session.audio.input.transcription"
                raise EventError(str(exc), "invalid_value", f"{where}.language") from None
            if self.pipeline.has_audio or self._held is not None:
                self._pending_language = (config.language,)  # the pipeline takes it with the next utterance
            else:
                self.pipeline.configure({"language": config.language})
        if config.format != self.config.format:
            self.audio = AudioDecoder(config.format)
        if config.vad != self.config.vad:
            self.detector = TurnDetector(config.vad) if config.vad else None
            if config.vad and config.vad.asked == "semantic_vad":
                logger.info("semantic_vad is served as server_vad with %d ms of silence", config.vad.silence_duration_ms)
        self.config = config
        await self._queue(self._session_event("updated", beta))

    async def _append(self, message: dict[str, Any]) -> None:
        event = Append.model_validate(message)
        try:
            data = base64.b64decode(event.audio, validate=True)
        except binascii.Error:
            raise EventError("audio is not valid base64", "invalid_value", "audio") from None
        await self._take(self.audio.decode(data))

    async def _commit_asked(self, message: dict[str, Any]) -> None:
        event = Commit.model_validate(message)
        async with self._finishing:
            await self._settle_speech()
            if self._held is None:
                await self._take(self.audio.flush())  # the buffer ends here: the resampler's tail is in it
            await self._commit(event.event_id, asked=True)

    async def _clear(self, message: dict[str, Any]) -> None:
        Commit.model_validate(message)
        async with self._finishing:
            await self._settle_speech()
            self.pipeline.discard()
            self.audio.flush()
            self._held = None
            await self._restart(self._received)
            await self._queue(_event("input_audio_buffer.cleared"))

    # -- audio into the pipeline ----------------------------------------------------------------

    async def _take(self, samples: np.ndarray) -> None:
        # In slices, so that server VAD paces even one append that holds a whole recording.
        for start in range(0, samples.size, MOST_UNSCORED // 2):
            piece = samples[start : start + MOST_UNSCORED // 2]
            self._received += piece.size
            if self._held is None:
                await self._feed_samples(piece)
                continue
            self._held.append(piece)
            if self._received - self._hold_from > self.settings.max_utterance_seconds * SAMPLE_RATE:
                await self._too_long()

    async def _feed_samples(self, samples: np.ndarray) -> None:
        if not samples.size:
            return
        if self.detector is not None:
            keep = self.detector.vad.prefix_padding_ms * PER_MS
            self._recent = np.concatenate([self._recent, samples])[-keep:] if keep else self._recent[:0]
        self._fed += samples.size
        await self._feed(samples.tobytes())
        while self.detector is not None and not self._turn_ended and self._fed - self._scored_frames * VAD_FRAME > MOST_UNSCORED:
            self._scoring.clear()
            await self._scoring.wait()

    def _hold(self) -> None:
        """The turn ends here: audio not yet fed is the next turn's."""
        self._turn_ended = True
        self._hold_from = self._utterance_start + self._fed
        if self._held is None:
            self._held = []

    # -- server VAD ---------------------------------------------------------------------------

    def _scored(self, first: int, scores: np.ndarray) -> None:
        """The pipeline scored frames of this utterance: server VAD reads them (here, in order)."""
        self._scored_frames = first + scores.size
        self._scoring.set()
        detector = self.detector
        if detector is None or self._turn_ended:
            return  # no server VAD, or the turn already ended
        start = self._utterance_start
        for what, frame in detector.add(first, scores):
            ms = (start + frame * VAD_FRAME) // PER_MS
            if what == "started":
                ms = max(start // PER_MS, ms - detector.vad.prefix_padding_ms)
            else:
                self._hold()  # what arrives after the stop is the next turn's
            self._speech.append((what, ms, self._generation))
        if not detector.heard and first * VAD_FRAME < MOST_QUIET <= self._scored_frames * VAD_FRAME:
            self._speech.append(("quiet", 0, self._generation))
        if self._speech:
            self._speech_changed.set()

    async def _follow_speech(self) -> None:
        while True:
            await self._speech_changed.wait()
            self._speech_changed.clear()
            async with self._finishing:
                await self._settle_speech()

    async def _settle_speech(self) -> None:
        """Tell the client what server VAD heard, in order, and end each turn where its speech
        stopped (``_finishing`` is held). A client's commit or clear, and a restart, settle first:
        the turns the VAD ended in the audio before them are committed on their own, as OpenAI's
        server would have done as that audio came, even where the VAD's scoring lagged behind."""
        while self._speech:
            what, ms, generation = self._speech.popleft()
            if generation != self._generation:
                continue  # that utterance was committed or cleared meanwhile
            if what == "started":
                self._item_open = True
                await self._queue(_event("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=self._current_item()))
                await self._send_delta()  # the words committed before the VAD heard the speech
            elif what == "stopped":
                await self._queue(_event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=self._current_item()))
                await self._commit(None)  # its restart feeds the held audio: the VAD may end more turns
            elif self.detector and not self.detector.heard and not self._turn_ended:
                await self._drop_quiet()

    async def _drop_quiet(self) -> None:
        keep, self._recent = self._recent, self._recent[:0]
        self.pipeline.discard()
        await self._restart(self._received - keep.size)
        await self._feed_samples(keep)

    # -- turns ----------------------------------------------------------------------------------

    def _current_item(self) -> str:
        if self._item is None:
            self._item = new_id("item")
        return self._item

    async def _publish_partial(self, partial: Partial) -> None:
        self._committed, self._arrived = partial.committed, partial.audio_arrived
        await self._send_delta()

    async def _send_delta(self) -> None:
        """The words committed since the last delta; Partial.committed only grows within an
        utterance, so the deltas of a turn, joined, are the committed words so far."""
        if self.detector is not None and not self._item_open:
            return
        if not self._committed.startswith(self._sent):
            logger.warning("committed words changed within an utterance; no delta sent for them")
            return
        delta = self._committed[len(self._sent):]
        if delta:
            self._sent = self._committed
            message = _event("conversation.item.input_audio_transcription.delta", item_id=self._current_item(),
                             content_index=0, delta=delta)
            await self._queue(message, self._arrived, kind="partial")

    async def _commit(self, client_event_id: str | None, *, asked: bool = False) -> None:
        """The buffer becomes an item, committed at once; its transcript follows when the final is
        decoded. ``_finishing`` is held."""
        buffered = self._fed
        if asked and buffered < MIN_COMMIT:
            await self._reject(f"buffer too small: expected at least 100 ms of audio, but the buffer holds "
                               f"{buffered / PER_MS:.2f} ms", "input_audio_buffer_commit_empty", None, client_event_id)
            return
        committed_at = time.monotonic()
        self._hold()
        item, previous = self._current_item(), self._previous_item
        self._previous_item = item
        await self._queue(_event("input_audio_buffer.committed", previous_item_id=previous, item_id=item))
        content = [{"type": "input_audio", "transcript": None}]
        user_item = {"id": item, "object": "realtime.item", "type": "message", "status": "completed", "role": "user",
                     "content": content}
        await self._queue(_event("conversation.item.created", previous_item_id=previous, item=user_item))
        try:
            if self.detector is None or self.detector.heard:
                final = await self.pipeline.finish()
            else:  # server VAD heard no speech in it: nothing to decode (Whisper would invent words)
                self.pipeline.discard()
                final = Final("", None, buffered / SAMPLE_RATE)
        except Exception:
            logger.exception("transcription failed")
            error = {"type": "server_error", "code": "transcription_failed", "message": "transcription failed", "param": None}
            await self._queue(_event("conversation.item.input_audio_transcription.failed", item_id=item,
                                     content_index=0, error=error))
        else:
            completed = _event("conversation.item.input_audio_transcription.completed", item_id=item, content_index=0,
                               transcript=final.text, usage={"type": "duration", "seconds": final.duration_s})
            await self._queue(completed, committed_at, kind="final")
        await self._restart(self._hold_from)

    async def _restart(self, start: int) -> None:
        """A new utterance from sample ``start`` of the session: the held audio goes into it."""
        self._generation += 1
        self._utterance_start, self._fed, self._scored_frames = start, 0, 0
        self._item, self._item_open = None, False
        self._committed = self._sent = ""
        if self.detector is not None:
            self.detector.reset()
        if self._pending_language is not None:
            self.pipeline.configure({"language": self._pending_language[0]})
            self._pending_language = None
        self._turn_ended = False
        self._scoring.set()  # a feed waiting on the scores of the last utterance waits no more
        held = self._held
        while held and not self._turn_ended:  # server VAD may end a turn within them: the rest waits
            await self._feed_samples(held.pop(0))
        if not self._turn_ended:
            self._held = None  # drained: audio goes straight to the pipeline again

    async def _finish_before_restart(self) -> None:
        await self._settle_speech()
        if self._fed >= MIN_COMMIT and (self.detector is None or self.detector.heard):
            await self._commit(None)
